"""A cost model of serving MoE models at the paper's scale (§5, Table 6, Figures 10-15).

``predict(model, gpus, hardware="A100-40GB", tp=..., ep=..., exchange=..., batch=...)`` predicts
the latency of one decode step (one new token for every sequence in the batch) and splits it:

- ``weight_reads``: parameters each GPU streams from HBM (inference is memory-bandwidth bound,
  §5.1): its tensor slice of the non-expert layers, and of its local experts only those the
  step's tokens touch;
- ``kv_reads``: the attention's KV cache;
- ``compute``: the matmul time *beyond* the reads (roofline: a layer takes max(reads, FLOPs /
  rate); below the ridge point this is 0);
- ``exchange``: the two all-to-alls of every MoE layer, latency-bandwidth model
  t = Σ messages·α + bytes / bandwidth, with the paper's message counts (§5.3): flat p - 1,
  hierarchical (G - 1) + (p/G - 1) at 2x volume, parallelism-coordinated p/L - 1;
- ``allgather``: the tensor-parallel collectives: the all-gather over L after a coordinated
  exchange, expert slicing's all-gather / reduce-scatter, and the tensor-sliced layers'
  all-reduces.

The components add up (no overlap of communication with computation is assumed). Throughput
is batch · dp / latency and the cost of a token is GPUs / throughput (GPU-seconds).

Layout: ``gpus`` = tp · dp for the non-expert layers (tensor slicing inside a node, data
parallel replicas across nodes, §5.2) and = ep · es for the experts (expert parallelism, and
expert slicing when there are more GPUs than experts). ``batch`` is the number of sequences
*per data-parallel replica*, as each DeepSpeed rank serves its own queries; the step's global
batch is batch · dp, and those tokens decide how many experts each GPU must read.

Constants: memory bandwidth, bf16/fp16 rate, memory size, NVLink and per-GPU inter-node
bandwidth are datasheet values (comments below). The per-message costs α are *assumptions* (the
effective cost of one more peer in an NCCL all-to-all, a few microseconds; no datasheet gives
it). `calibrate()` measures this machine's matmul rate and memory bandwidth instead.

Not modelled: kernel-launch and framework overheads, the gate / dispatch kernels (the paper's
optimised ones are assumed), load imbalance between experts, prefill.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from .config import check_int
from .exchanges import check_exchange, hops
from .model import PRESETS, GPTConfig, preset
from .sizing import BYTES_PER_PARAM, PAPER_SIZES_B, block_params

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    """One accelerator and the links between accelerators (bytes/s, FLOP/s, seconds)."""

    name: str
    memory_bytes: float
    memory_bw: float  # HBM bandwidth
    flops: float  # dense fp16/bf16 tensor rate
    gpus_per_node: int
    nvlink_bw: float  # per GPU, one direction
    internode_bw: float  # per GPU, one direction (the node's NICs / GPUs)
    nvlink_latency: float = 2e-6  # ASSUMED per-message cost inside a node
    internode_latency: float = 4e-6  # ASSUMED per-message cost across nodes
    source: str = ""


HARDWARE: dict[str, Hardware] = {
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4 40GB): HBM2 1,555 GB/s, BF16/FP16 tensor
    # 312 TFLOPS dense, NVLink 3 600 GB/s (both directions together). DGX A100 / Azure NDv4
    # (the paper's machines): 8x 200 Gb/s HDR InfiniBand per 8-GPU node = 25 GB/s per GPU.
    "A100-40GB": Hardware("A100-40GB", 40 * GB, 1555 * GB, 312e12, 8, 300 * GB, 25 * GB,
                          source="A100 datasheet; DGX A100 / NDv4 (8x HDR 200 Gb/s)"),
    # NVIDIA H100 datasheet (SXM5 80GB): HBM3 3.35 TB/s, BF16 989 TFLOPS dense (1,979 with
    # sparsity), NVLink 4 900 GB/s. DGX H100: 8x ConnectX-7 400 Gb/s NDR = 50 GB/s per GPU.
    "H100": Hardware("H100", 80 * GB, 3350 * GB, 989e12, 8, 450 * GB, 50 * GB,
                     source="H100 SXM5 datasheet; DGX H100 (8x NDR 400 Gb/s)"),
    # NVIDIA H200 datasheet (SXM 141GB): HBM3e 4.8 TB/s, BF16 989 TFLOPS dense, NVLink 900 GB/s.
    # DGX H200: 8x ConnectX-7 400 Gb/s NDR = 50 GB/s per GPU. Measured on one H200 (torch 2.11,
    # 2026-11): a 2 GiB device copy at 4.2 TB/s (read + write) and an 8192^3 bf16 matmul at
    # 794 TFLOP/s, i.e. 88% and 80% of these datasheet peaks, which the model uses as they are.
    "H200": Hardware("H200", 141 * GB, 4800 * GB, 989e12, 8, 450 * GB, 50 * GB,
                     source="H200 SXM datasheet; DGX H200 (8x NDR 400 Gb/s)"),
}

COMPONENTS = ("weight_reads", "kv_reads", "compute", "exchange", "allgather")
COMPONENT_LABELS = {
    "weight_reads": "weight reads (HBM)", "kv_reads": "KV-cache reads",
    "compute": "compute beyond the reads", "exchange": "all-to-all exchange",
    "allgather": "all-gather / all-reduce (TP, slicing)",
}

# §5.5 Table 6: the paper's name -> (moelab preset, the paper's MP = tensor-slicing degree,
# the published size in billions, from moelab.sizing.PAPER_SIZES with its source). EP is 128 for
# all of them.
TABLE6 = {name: (preset_name, mp, PAPER_SIZES_B[preset_name]) for name, preset_name, mp in (
    ("1.3B+MoE-128", "paper_1_3b_moe128", 1),
    ("2.4B+MoE-128", "serve_2_4b_moe128", 1),
    ("8B+MoE-128", "serve_8b_moe128", 4),
    ("24B+MoE-128", "serve_24b_moe128", 8),
    ("47B+MoE-128", "serve_47b_moe128", 8),
)}
# §3 / Fig. 14: the dense model of equal quality (1.3B+MoE-128 matches 6.7B dense).
DENSE_EQUIVALENT = {"1.3B+MoE-128": "paper_6_7b"}
VARIANTS = ("moe", "pr_moe", "pr_moe_mos")


# --------------------------------------------------------------------------------- models

def serving_config(model: str | GPTConfig, variant: str = "moe") -> GPTConfig:
    """A Table 6 model (its paper name, a preset name or a GPTConfig) as MoE, PR-MoE or
    PR-MoE + MoS.

    PR-MoE (§4.1): half the experts in every MoE layer but the last two (the paper's "64/128"
    for 128 experts) and a dense MLP beside the experts (Residual). MoS (§4.2): the student is
    the PR-MoE with 1/8 of the layers removed (24 -> 21 as in the paper). For 1.3B+MoE-128 these
    are moelab's paper_1_3b_pr_moe_64_128 (31B) and paper_1_3b_mos_l21 (27B).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    if isinstance(model, GPTConfig):
        config = model
    elif model in TABLE6:
        config = PRESETS[TABLE6[model][0]]
    elif model in PRESETS:
        config = preset(model)
    else:
        raise ValueError(f"unknown model {model!r}; use one of {list(TABLE6)}, a preset name "
                         f"({sorted(PRESETS)}) or a GPTConfig")
    if variant == "moe":
        return config
    schedule = config.expert_schedule
    if not schedule or len(set(schedule)) != 1:
        raise ValueError(f"variant {variant!r} starts from a standard MoE (one expert count in "
                         f"every MoE layer); {config.name} has schedule {schedule or 'dense'}")
    experts = schedule[0]
    pr = config.replace(experts=f"{experts // 2}/{experts}", residual=True,
                 name=f"{config.name}_pr_moe")
    if variant == "pr_moe":
        return pr
    return pr.replace(n_layer=config.n_layer - config.n_layer // 8,
                   name=f"{config.name}_pr_moe_mos")


def layer_params(config: GPTConfig) -> list[dict]:
    """Parameters of every block, split as the serving model reads them: ``shared`` (attention,
    norms, dense FFN, gate, residual MLP or shared experts: tensor-sliced) and, for MoE blocks,
    ``experts`` (count) and ``expert`` (one routed expert's FFN); from `moelab.sizing.block_params`,
    so they sum to `moelab.sizing.size` (tested)."""
    return [{"shared": b["attention"] + b["ffn"] + b["gate"] + b["residual"],
             "experts": b["experts"], "expert": b["expert"], "residual": b["residual"] > 0}
            for b in block_params(config)]


def embedding_params(config: GPTConfig) -> int:
    """Token + position embeddings, an untied LM head, and the final LayerNorm."""
    head = 0 if config.tie_embeddings else config.vocab_size * config.d_model
    return config.vocab_size * config.d_model + config.block_size * config.d_model + head \
        + 2 * config.d_model


# --------------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class Layout:
    """How ``gpus`` GPUs hold the model: tp · dp for the non-expert layers, ep · es for the
    experts (each MoE layer with E experts uses min(ep, E) expert-parallel ranks)."""

    gpus: int
    tp: int
    dp: int
    ep: int
    es: int
    exchange: str
    gpus_per_node: int

    @classmethod
    def build(cls, config: GPTConfig, gpus: int, hardware: Hardware, tp: int = 1,
              dp: int | None = None, ep: int | None = None, es: int | None = None,
              exchange: str = "flat") -> Layout:
        check_int("gpus", gpus)
        check_int("tp", tp)
        node = hardware.gpus_per_node
        check_exchange(exchange)
        if gpus % tp:
            raise ValueError(f"tp={tp} does not divide gpus={gpus}: the non-expert layers need "
                             f"gpus = tp · dp")
        if tp > node or node % tp:
            raise ValueError(f"tp={tp} must divide the {node} GPUs of a node: tensor slicing "
                             f"stays inside a node (§5.2)")
        if config.n_head % tp:
            raise ValueError(f"tp={tp} must divide n_head={config.n_head}")
        if dp is None:
            dp = gpus // tp
        check_int("dp", dp)
        if tp * dp != gpus:
            raise ValueError(f"tp · dp = {tp} · {dp} = {tp * dp} but gpus={gpus}")
        schedule = config.expert_schedule
        if not schedule:
            if (ep or 1) != 1 or (es or 1) != 1:
                raise ValueError(f"{config.name} is dense: it has no experts to spread "
                                 f"(ep and es must be 1)")
            if exchange != "flat":
                raise ValueError("a dense model has no expert exchange; use exchange='flat'")
            return cls(gpus, tp, dp, 1, 1, exchange, node)
        most = max(schedule)
        if ep is None:
            ep = min(gpus, most) if es is None else gpus // es
        check_int("ep", ep)
        if ep > most:
            raise ValueError(f"ep={ep} is more than the largest expert count {most}; use "
                             f"expert slicing (es) to spread the experts over more GPUs")
        if gpus % ep:
            raise ValueError(f"ep={ep} does not divide gpus={gpus}: the experts need "
                             f"gpus = ep · es")
        if es is None:
            es = gpus // ep
        check_int("es", es)
        if ep * es != gpus:
            raise ValueError(f"ep · es = {ep} · {es} = {ep * es} but gpus={gpus}")
        for count in set(schedule):
            ranks = min(ep, count)
            if count % ranks or gpus % ranks:
                raise ValueError(f"a layer with {count} experts on min(ep, E) = {ranks} ranks "
                                 f"does not split evenly over gpus={gpus}")
            if exchange == "tp_coordinated" and ranks % tp:
                raise ValueError(f"the coordinated exchange runs among ranks with the same TP "
                                 f"rank: tp={tp} must divide the {ranks} expert ranks")
        if exchange == "tp_coordinated" and tp == 1:
            raise ValueError("exchange='tp_coordinated' needs tp > 1 (with tp=1 it is the "
                             "flat exchange)")
        return cls(gpus, tp, dp, ep, es, exchange, node)


# ------------------------------------------------------------------------------ the model

@dataclass(frozen=True)
class Prediction:
    """One decode step of ``model`` on ``layout``: seconds per component and what follows."""

    model: str
    hardware: str
    layout: Layout
    batch: int  # sequences per data-parallel replica
    context: int
    dtype: str
    components: dict[str, float]
    memory_per_gpu: float  # bytes: weights + KV cache
    memory_capacity: float
    messages: dict[str, float] = field(default_factory=dict)  # per exchange, per GPU

    @property
    def latency_s(self) -> float:
        return sum(self.components.values())

    @property
    def latency_ms(self) -> float:
        return 1e3 * self.latency_s

    @property
    def global_batch(self) -> int:
        return self.batch * self.layout.dp

    @property
    def tokens_per_s(self) -> float:
        return self.global_batch / self.latency_s

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_s / self.layout.gpus

    @property
    def gpu_seconds_per_token(self) -> float:
        """The cost of a token in GPU time: GPUs / throughput."""
        return self.layout.gpus / self.tokens_per_s

    def cost_per_million_tokens(self, dollars_per_gpu_hour: float) -> float:
        return self.gpu_seconds_per_token * 1e6 * dollars_per_gpu_hour / 3600

    @property
    def fits(self) -> bool:
        return self.memory_per_gpu <= self.memory_capacity

    def as_dict(self) -> dict:
        return {"model": self.model, "hardware": self.hardware, "gpus": self.layout.gpus,
                "tp": self.layout.tp, "dp": self.layout.dp, "ep": self.layout.ep,
                "es": self.layout.es, "exchange": self.layout.exchange, "batch": self.batch,
                "latency_ms": self.latency_ms, "tokens_per_s": self.tokens_per_s,
                "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
                "memory_per_gpu_gb": self.memory_per_gpu / GB, "fits": self.fits,
                **{f"{c}_ms": 1e3 * s for c, s in self.components.items()}}


def _collective(messages_intra: float, messages_inter: float, volume: float, bandwidth: float,
                hardware: Hardware) -> float:
    """Latency-bandwidth: every message pays α (inside or across nodes), the bytes pay 1/bw."""
    return (messages_intra * hardware.nvlink_latency + messages_inter * hardware.internode_latency
            + volume / bandwidth)


def predict(model: str | GPTConfig, gpus: int, hardware: str | Hardware = "A100-40GB", *,
            variant: str = "moe", tp: int = 1, dp: int | None = None, ep: int | None = None,
            es: int | None = None, exchange: str = "flat", batch: int = 8, context: int = 256,
            dtype: str = "fp16") -> Prediction:
    """Predict one decode step; see the module docstring for the model and its constants."""
    config = serving_config(model, variant)
    hw = HARDWARE[hardware] if isinstance(hardware, str) and hardware in HARDWARE else hardware
    if not isinstance(hw, Hardware):
        raise ValueError(f"hardware must be one of {list(HARDWARE)} or a Hardware; "
                         f"got {hardware!r}")
    check_int("batch", batch)
    check_int("context", context, 0)
    if dtype not in BYTES_PER_PARAM:
        raise ValueError(f"dtype must be one of {list(BYTES_PER_PARAM)}; got {dtype!r}")
    layout = Layout.build(config, gpus, hw, tp=tp, dp=dp, ep=ep, es=es, exchange=exchange)
    nbytes = BYTES_PER_PARAM[dtype]
    d, node, L = config.d_model, hw.gpus_per_node, layout.tp
    tokens = batch  # tokens of this GPU's replica in one decode step
    global_tokens = batch * layout.dp
    parts = dict.fromkeys(COMPONENTS, 0.0)
    messages = {"intra": 0.0, "inter": 0.0}
    weights_on_gpu = 0.0

    def roofline(read_bytes: float, kv_bytes: float, flops: float) -> None:
        read_s, kv_s = read_bytes / hw.memory_bw, kv_bytes / hw.memory_bw
        parts["weight_reads"] += read_s
        parts["kv_reads"] += kv_s
        parts["compute"] += max(0.0, flops / hw.flops - read_s - kv_s)

    def all_reduce(volume_bytes: float, ranks: int) -> float:  # ring: 2(n-1) steps
        return _collective(2 * (ranks - 1), 0, 2 * (ranks - 1) / ranks * volume_bytes,
                           hw.nvlink_bw, hw) if ranks > 1 else 0.0

    for block in layer_params(config):
        # Non-expert part: tensor-sliced over tp, this replica's tokens; attention over the cache
        # (Kaplan et al.: 2 · n_ctx · d FLOPs per token and layer).
        shared = block["shared"] / L
        weights_on_gpu += shared
        kv = tokens * context * 2 * d * nbytes / L
        roofline(shared * nbytes, kv, 2 * shared * tokens + 2 * context * d * tokens / L)
        # Megatron: an all-reduce after the attention and after the (dense or residual) MLP.
        sliced_mlps = 1 if (not block["experts"] or block["residual"]) else 0
        parts["allgather"] += (1 + sliced_mlps) * all_reduce(tokens * d * nbytes, L)
        if not block["experts"]:
            continue
        # Experts: E / min(ep, E) local experts, each sliced over es = gpus / min(ep, E).
        num_experts = block["experts"]
        ranks = min(layout.ep, num_experts)
        slicing = gpus // ranks
        local = num_experts // ranks
        slice_params = block["expert"] / slicing
        weights_on_gpu += local * slice_params
        routes = global_tokens * config.moe.router.k  # routes of the whole step into this layer
        touched = local * (1 - (1 - 1 / num_experts) ** routes)  # expected experts hit
        rows = routes * local / num_experts  # routes that reach my experts (balanced)
        roofline(touched * slice_params * nbytes, 0.0, 2 * slice_params * rows)
        # Two all-to-alls (dispatch and combine) among the `ranks` expert-parallel ranks.
        per_node = max(1, min(node, node * ranks // gpus))  # ranks spread over the nodes
        intra, inter = hops(ranks, layout.exchange, per_node, L)  # messages, §5.3
        crosses = inter > 0
        sent = tokens * config.moe.router.k * d * nbytes  # bytes this GPU sends
        if layout.exchange == "tp_coordinated":
            sent /= L  # each TP rank sends only its 1/L of the replica's tokens
        if layout.exchange == "hierarchical":
            sent *= 2  # every row moves twice (§5.3), charged at the slowest link
        bandwidth = hw.internode_bw if crosses else hw.nvlink_bw
        parts["exchange"] += 2 * _collective(intra, inter, sent, bandwidth, hw)
        messages["intra"] += 2 * intra
        messages["inter"] += 2 * inter
        if layout.exchange == "tp_coordinated":
            # back to the tensor-sliced layers: an all-gather of the replica's rows over L
            parts["allgather"] += _collective(L - 1, 0, tokens * d * nbytes * (L - 1) / L,
                                              hw.nvlink_bw, hw)
        if slicing > 1:
            # expert slicing: all-gather the expert's input rows over its slices, and
            # reduce-scatter the partial outputs back (inside a node)
            rows_bytes = rows / local * d * nbytes if local else 0.0
            parts["allgather"] += 2 * _collective(slicing - 1, 0, rows_bytes * (slicing - 1),
                                                  hw.nvlink_bw, hw)
    # Embeddings (a lookup) and the LM head, tensor-sliced over the vocabulary.
    head = config.vocab_size * d / L
    weights_on_gpu += embedding_params(config) / L
    roofline(head * nbytes, 0.0, 2 * head * tokens)
    kv_cache = tokens * context * 2 * d * config.n_layer * nbytes / L
    return Prediction(
        model=config.name, hardware=hw.name, layout=layout, batch=batch, context=context,
        dtype=dtype, components=parts, memory_per_gpu=weights_on_gpu * nbytes + kv_cache,
        memory_capacity=hw.memory_bytes, messages=messages)


def sweep(model: str | GPTConfig, gpu_counts, **options) -> list[Prediction]:
    """`predict` for each GPU count (other options fixed)."""
    return [predict(model, gpus, **options) for gpus in gpu_counts]


def crossover_batch(model: str | GPTConfig, gpus: int, a: str = "flat",
                    b: str = "hierarchical", max_batch: int = 1 << 16, **options) -> int | None:
    """The smallest batch at which exchange ``a`` is faster than ``b`` (None if none is)."""
    batch = 1
    while batch <= max_batch:
        first = predict(model, gpus, exchange=a, batch=batch, **options)
        second = predict(model, gpus, exchange=b, batch=batch, **options)
        if first.components["exchange"] < second.components["exchange"]:
            return batch
        batch *= 2
    return None


# -------------------------------------------------------------------------- calibration

def calibrate(matmul_size: int = 512, copy_mb: int = 64, repeats: int = 3) -> Hardware:
    """Measure this machine (CPU, fp32): the matmul rate (best of ``repeats`` n×n matmuls) and
    the memory bandwidth (a copy of ``copy_mb`` MB: read + write). A Hardware of one device with
    no interconnect; use it with ``dtype="fp32"`` and ``gpus=1``."""
    import os

    import torch

    check_int("matmul_size", matmul_size)
    check_int("copy_mb", copy_mb)
    check_int("repeats", repeats)
    a = torch.randn(matmul_size, matmul_size)
    b = torch.randn(matmul_size, matmul_size)
    torch.mm(a, b)  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    flops = 2 * matmul_size ** 3 / best
    source = torch.empty(copy_mb * (1 << 20) // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    bandwidth = 2 * source.numel() * 4 / best
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 8 * GB
    return Hardware("this CPU (measured)", float(memory), bandwidth, flops, 1, bandwidth,
                    bandwidth, 0.0, 0.0,
                    source=f"measured: {matmul_size}x{matmul_size} fp32 matmul, "
                           f"{copy_mb} MB copy, best of {repeats}")
