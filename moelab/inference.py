"""Generation with a KV cache, the MoE inference path, and where the time of a forward goes.

- `generate(model, prompt, max_new_tokens)`: greedy / temperature / top-k sampling with a KV cache
  allocated once for the whole generation; prefill (the prompt, one forward) and decode (one token
  per step) are timed separately. Prompts of different lengths share one batch, padded on the
  left (see below); ``cuda_graph=True`` replays the decode step from a captured CUDA graph.
- `inference_mode(model)`: the paper's MoE inference path (§5): eval routing (no noise, no RTS,
  no sampled second expert), the mapping-table dispatch (backend "index") and, beyond the paper,
  dropless routing (every route kept; FastGen / DeepSpeed inference v2 serve this way).
- `LatencyProfiler` / `decode_latency`: a per-layer, per-component latency breakdown (attention,
  gate, dispatch, exchange, expert FFN, combine, dense FFN, embeddings + head) measured with
  module hooks and ``time.perf_counter`` (``torch.cuda.synchronize`` first on a GPU).

Why generation is dropless by default. With capacity C = max(⌈S/E · cf · k⌉, min_capacity), the
routes an expert keeps depend on *which other tokens are in the same forward*: S is B tokens in a
decode step but B·T when the whole prefix is recomputed, so C differs, and a token competes for
its expert's C slots with the other sequences' current tokens in one case and with every earlier
token of every sequence in the other. A route kept in one is dropped in the other, and a cached
decode no longer equals running the model on the prefix. Dropless, each token's output depends
on that token alone, so both agree (tested). ``dropless=False`` keeps the model's capacity.

Prompts of different lengths. Every prompt is padded on the left to the longest (pad id 0), so
all sequences write their new tokens at the same cache slot. Sequence b's pads fill slots
[0, pad_b); its real tokens take positions 0, 1, ... from slot pad_b on (the learned position
embeddings never see the padding), and a key mask keeps every query off the pad slots, in the
prefill and in every decode step. Dropless, a pad token changes no real token's routing either, so
each sequence generates exactly what it would alone (tested). With capacity (``dropless=False``)
or expert-choice routing, pads would compete with real tokens for expert slots: refused.

CUDA graphs for decode (``cuda_graph=True``, a CUDA device only). Launching a decode step's many
small kernels costs more than running them at small batch; a CUDA graph records the step once and
replays it with one launch. A captured graph replays fixed kernels on fixed buffers, so the step
(`StaticDecodeStep`) reads its inputs from static buffers (the current tokens [B, 1] and the cache
slot they go to, a [1] tensor), writes keys and values with ``index_copy_`` at that slot, and
attends over the whole preallocated cache under a mask computed from it; per-sequence positions
are that slot minus each sequence's left pad, on the device. Nothing in it may wait for the
device or take a shape from the data, and dropless routing does (each expert's load sizes its
buffer). So while the step is captured the MoE layers route in the capacity layout with a
capacity that can never drop a route (`static_routing`: C >= S, the step's B tokens, e.g.
cf = E / k): the same experts and weights as dropless, at the cost of E·B buffer rows instead of
B·k. Graph decode therefore equals eager cached decode (tested on a GPU; on a CPU a
``torch.compile(fullgraph=True)`` of the same step stands in for "capturable").
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import check_backend
from .layer import MLP, MoE
from .model import GPT, KVCache
from .routing import expert_capacity

PAD_ID = 0  # the token id left padding writes (masked out; any id would do)

# ------------------------------------------------------------------------ the inference path


@contextmanager
def inference_mode(model: nn.Module, dropless: bool = True,
                   backend: str | None = "index") -> Iterator[nn.Module]:
    """Run ``model`` the way it is served, and put it back as it was afterwards.

    eval() (routing without noise, RTS or sampling), every MoE layer's ``backend`` ("index", the
    mapping table, by default; None keeps each layer's own) and, with ``dropless=True``, routing
    without capacity (see the module docstring for why generation needs it).
    """
    if backend is not None:
        check_backend(backend)
    was_training = model.training
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    saved = [(layer.backend, layer.router.drop_tokens) for layer in layers]
    model.eval()
    try:
        for layer in layers:
            if backend is not None:
                layer.set_backend(backend)
            if dropless:
                layer.router.drop_tokens = False
        yield model
    finally:
        for layer, (layer_backend, drop_tokens) in zip(layers, saved, strict=True):
            layer.backend = layer_backend
            layer.router.drop_tokens = drop_tokens
        model.train(was_training)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _as_batch(prompt, device: torch.device) -> tuple[Tensor, list[int]]:
    """A prompt as [B, T] long, left-padded with PAD_ID, and each sequence's real length.

    Accepts a [T] or [B, T] tensor, a list of ids, or a list of sequences (lists or 1-D tensors,
    of any lengths >= 1; shorter ones are padded on the left to the longest)."""
    lengths = None
    if isinstance(prompt, Tensor):
        idx = prompt
    elif isinstance(prompt, Sequence) and prompt and all(
            isinstance(p, (Sequence, Tensor)) and not isinstance(p, str) for p in prompt):
        rows = [torch.as_tensor(p) for p in prompt]
        if any(row.dim() != 1 or row.numel() < 1 for row in rows):
            raise ValueError(f"each prompt in a list must be a non-empty sequence of token ids; "
                             f"got shapes {[tuple(row.shape) for row in rows]}")
        longest = max(row.numel() for row in rows)
        idx = torch.stack([F.pad(row, (longest - row.numel(), 0), value=PAD_ID) for row in rows])
        lengths = [row.numel() for row in rows]
    elif isinstance(prompt, Sequence) and not isinstance(prompt, str):
        idx = torch.as_tensor(list(prompt))
    else:
        raise ValueError(f"prompt must be token ids (a tensor, a list of ints or a list of "
                         f"lists); got {type(prompt).__name__}")
    if idx.dim() == 1:
        idx = idx[None, :]
    if idx.dim() != 2 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"prompt must be integer token ids of shape [T] or [B, T]; got "
                         f"dtype {idx.dtype} and shape {tuple(idx.shape)}")
    if idx.shape[0] < 1 or idx.shape[1] < 1:
        raise ValueError(f"prompt must hold at least one token; got shape {tuple(idx.shape)}")
    if lengths is None:
        lengths = [idx.shape[1]] * idx.shape[0]
    return idx.to(device=device, dtype=torch.long), lengths


def _check_ragged(model: GPT, lengths: list[int], dropless: bool) -> None:
    """Left padding is exact only if no pad token can change a real token's routing."""
    if len(set(lengths)) == 1:
        return
    if not dropless:
        raise ValueError(
            f"prompts of different lengths {lengths} need dropless=True (the default): with "
            "expert capacity (dropless=False) the pad tokens would compete with real tokens "
            "for expert slots and change their outputs. Use dropless routing, or call "
            "generate() for each prompt (or each group of equal-length prompts) separately")
    if any(m.router.options["choice"] == "expert" for m in model.modules()
           if isinstance(m, MoE)):
        raise ValueError(
            f"prompts of different lengths {lengths} cannot share a batch in a model with "
            "expert-choice routing: each expert picks its top tokens among all tokens of the "
            "forward, pads included. Call generate() for each prompt separately")


def _check_sampling(max_new_tokens, temperature, top_k, greedy) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0; got {max_new_tokens!r}")
    if not greedy and not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                           and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}. For "
                         "the most likely token at every step use greedy=True")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        raise ValueError(f"top_k must be None (the whole vocabulary) or an integer >= 1; "
                         f"got {top_k!r}")


def next_token(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
               greedy: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """[B, V] logits -> [B] token ids: argmax, or a draw from softmax(logits / T) over the top-k."""
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@dataclass
class Generation:
    """What `generate` returns. ``tokens`` [B, T + N] holds the prompts and the N new tokens.

    T (``prompt_length``) is the longest prompt: shorter prompts are padded on the left with
    PAD_ID, so every sequence's new tokens start at column T. ``prompt_lengths[b]`` is sequence
    b's real prompt length; `sequences()` gives each sequence without its pads.
    """

    tokens: Tensor
    prompt_length: int
    prefill_s: float  # the forward over the prompt (and the first token's sampling)
    decode_s: float  # the N - 1 one-token steps after it
    logits: Tensor | None = None  # [B, N, V]: the logits each new token was drawn from
    prompt_lengths: list[int] | None = None  # real prompt length per sequence (None: all T)
    capture_s: float = 0.0  # cuda_graph=True: warm-up and capture of the step, not in decode_s

    def __post_init__(self) -> None:
        if self.prompt_lengths is None:
            self.prompt_lengths = [self.prompt_length] * self.tokens.shape[0]

    @property
    def left_pad(self) -> list[int]:
        """Pad tokens at the start of each sequence."""
        return [self.prompt_length - n for n in self.prompt_lengths]

    def sequences(self) -> list[Tensor]:
        """Each sequence's prompt and new tokens, without its left padding: B 1-D tensors."""
        return [row[pad:] for row, pad in zip(self.tokens, self.left_pad, strict=True)]

    @property
    def new_tokens(self) -> Tensor:
        return self.tokens[:, self.prompt_length:]

    @property
    def decode_steps(self) -> int:
        return max(self.new_tokens.shape[1] - 1, 0)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens the decode phase made per second, over the whole batch."""
        if not self.decode_steps or self.decode_s <= 0:
            return float("nan")
        return self.tokens.shape[0] * self.decode_steps / self.decode_s

    @property
    def decode_ms_per_token(self) -> float:
        """Latency of one decode step (one new token for every sequence)."""
        return 1e3 * self.decode_s / self.decode_steps if self.decode_steps else float("nan")


# ------------------------------------------------------------ static decode, CUDA graphs


def no_drop_capacity_factor(num_tokens: int, num_experts: int, k: int,
                            min_capacity: int = 4) -> float:
    """A capacity factor whose capacity C = max(⌈S/E · cf · k⌉, min_capacity) is >= S.

    An expert appears at most once among a token's k choices, so it is asked for at most S
    routes: with C >= S no route is ever dropped. cf = E / k gives ⌈S⌉ = S (checked with
    `moelab.routing.expert_capacity`'s own float32 arithmetic, E as a fallback)."""
    for factor in (num_experts / k, float(num_experts)):
        if expert_capacity(num_tokens, num_experts, factor, k, min_capacity) >= num_tokens:
            return factor
    raise AssertionError("unreachable: cf = E gives C >= S · k")


@contextmanager
def static_routing(model: nn.Module, num_tokens: int, dropless: bool = True
                   ) -> Iterator[nn.Module]:
    """Route every token-choice MoE layer in the capacity layout (static shapes), and put the
    routers back as they were afterwards.

    Capacity routing sizes every buffer from S, E, k and cf alone, so nothing in it waits for
    the device or takes a shape from the data; this is what a captured CUDA graph needs.
    With ``dropless=True`` (or a router that is dropless anyway) each router gets
    ``drop_tokens=True`` and the `no_drop_capacity_factor` for ``num_tokens`` tokens: no route
    is dropped, so the result equals dropless routing. ``dropless=False`` keeps a dropping
    router's own eval capacity factor. Expert-choice routers are left alone (their buffers are
    static already). Use it in eval (``inference_mode``): it sets the *eval* capacity factor.
    """
    routers = [m.router for m in model.modules()
               if isinstance(m, MoE) and m.router.options["choice"] == "token"]
    saved = [(r.eval_capacity_factor, r.drop_tokens) for r in routers]
    try:
        for router in routers:
            if dropless or not router.drop_tokens:
                router.eval_capacity_factor = no_drop_capacity_factor(
                    num_tokens, router.num_experts, router.k, router.options["min_capacity"])
            router.drop_tokens = True
        yield model
    finally:
        for router, (factor, drop_tokens) in zip(routers, saved, strict=True):
            router.eval_capacity_factor, router.drop_tokens = factor, drop_tokens


class StaticDecodeStep:
    """One decode step (one token per sequence) that reads everything from static buffers.

    ``token`` [B, 1] holds the current tokens and ``slot`` [1] the cache slot they go to; the
    step writes their keys and values at ``slot`` (``index_copy_``), attends over the whole
    preallocated ``cache`` under a mask built from ``slot`` and the cache's ``left_pad``, and
    returns the next-token logits [B, V]. Every call runs the same kernels on the same buffers,
    so the step can be captured in a CUDA graph (run it under `static_routing`, since dropless
    MoE routing is not static) and replayed after `load` fills the buffers.
    """

    def __init__(self, model: GPT, cache: KVCache) -> None:
        device = cache.k.device
        self.model, self.cache = model, cache
        self.token = torch.full((cache.batch_size, 1), PAD_ID, dtype=torch.long,
                                device=device)  # [B, 1]
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # [1]

    def load(self, token: Tensor, slot: int) -> None:
        """Fill the input buffers for the step at cache slot ``slot`` (in place)."""
        self.token.copy_(token)  # [B, 1]
        self.slot.fill_(slot)

    def __call__(self) -> Tensor:
        out = self.model(self.token, cache=self.cache, cache_position=self.slot)
        return out.logits[:, -1]  # [B, V]


class DecodeGraph:
    """A `StaticDecodeStep` captured once in a ``torch.cuda.CUDAGraph``, replayed per step.

    The buffers must already hold the first step's real inputs: the warm-up runs (on a side
    stream, as capture requires) execute that step and write its keys and values, which the
    first replay then writes again, identically.
    """

    def __init__(self, step: StaticDecodeStep, warmup: int = 2) -> None:
        device = step.token.device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the decode step is on {device}")
        self.step = step
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.logits = step()  # [B, V]: a static output buffer, rewritten by every replay
        except RuntimeError as error:
            raise RuntimeError(
                "capturing the decode step in a CUDA graph failed: an operation in it waits for "
                "the device (.item(), bool(tensor), a boolean-mask selection) or takes a shape "
                "from the data; tests/test_inference.py's torch.compile(fullgraph=True) proxy "
                "names the line on a CPU") from error

    def __call__(self, token: Tensor, slot: int) -> Tensor:
        """Logits [B, V] for ``token`` [B, 1] at cache slot ``slot`` (a view of the static
        output: read it before the next call)."""
        self.step.load(token, slot)
        self.graph.replay()
        return self.logits


def _check_cuda_graph(model: GPT, device: torch.device, use_cache: bool,
                      backend: str | None, cuda_graph) -> None:
    if not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph must be True or False; got {cuda_graph!r}")
    if not cuda_graph:
        return
    if device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device: CUDA graphs record GPU kernels, "
                         f"and the model is on {device}. Move the model to a GPU (model.cuda()) "
                         f"or leave cuda_graph=False")
    if not use_cache:
        raise ValueError("cuda_graph=True replays the cached decode step; use_cache=False "
                         "recomputes a prefix that grows every step, which a graph cannot "
                         "replay. Use use_cache=True")
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    backends = {backend or m.backend for m in layers}
    if backends - {"index"}:
        raise ValueError(f"cuda_graph=True needs the mapping-table dispatch, backend='index' "
                         f"(the others select by data-dependent masks); got "
                         f"{sorted(backends)}")
    if any(m.parallel is not None for m in layers):
        raise ValueError("cuda_graph=True does not support expert-parallel MoE layers (their "
                         "all-to-all sizes come from the routing); use cuda_graph=False")


@torch.no_grad()
def generate(model: GPT, prompt, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, greedy: bool = False, use_cache: bool = True,
             generator: torch.Generator | None = None, dropless: bool = True,
             backend: str | None = "index", return_logits: bool = False,
             cuda_graph: bool = False) -> Generation:
    """Continue ``prompt`` by ``max_new_tokens`` tokens.

    Args:
        prompt: token ids, [T] or [B, T] (a tensor, a list, or a list of sequences). Prompts
            of different lengths are padded on the left to the longest and masked out, with or
            without the cache: each sequence generates what it would alone (needs dropless
            routing and token-choice MoE layers; see the module docstring).
            ``Generation.prompt_lengths`` / ``sequences()`` tell the pads apart.
        temperature, top_k, greedy: sampling; ``greedy=True`` takes the argmax.
        use_cache: keep every layer's keys and values (one KVCache, allocated once) and feed one
            token per step; False recomputes the whole prefix each step (the reference).
        generator: a torch.Generator for the draws, for reproducible samples.
        dropless, backend: the MoE inference path, see `inference_mode`.
        return_logits: keep the logits of every step in ``Generation.logits``.
        cuda_graph: capture the decode step once in a CUDA graph and replay it for every step
            (CUDA only; needs use_cache=True and backend "index"). While captured, the MoE
            layers route in the capacity layout at a capacity that drops nothing
            (`static_routing`), so the tokens equal the eager cached decode's. The prefill
            runs eagerly; the capture's time is ``Generation.capture_s``, not ``decode_s``.

    The longest prompt plus the new tokens must fit in the model's block_size.
    """
    config = model.config
    _check_sampling(max_new_tokens, temperature, top_k, greedy)
    device = next(model.parameters()).device
    _check_cuda_graph(model, device, use_cache, backend, cuda_graph)
    idx, prompt_lengths = _as_batch(prompt, device)
    _check_ragged(model, prompt_lengths, dropless)
    batch, prompt_length = idx.shape
    total = prompt_length + max_new_tokens
    if total > config.block_size:
        raise ValueError(
            f"prompt length {prompt_length} + max_new_tokens {max_new_tokens} = {total} exceeds "
            f"the model's block_size={config.block_size} (its learned positions); shorten the "
            f"prompt or ask for fewer tokens")
    if int(idx.max()) >= config.vocab_size or int(idx.min()) < 0:
        raise ValueError(f"prompt token ids must be in [0, vocab_size={config.vocab_size})")
    tokens = torch.empty(batch, total, dtype=torch.long, device=device)
    tokens[:, :prompt_length] = idx
    if max_new_tokens == 0:
        return Generation(tokens, prompt_length, 0.0, 0.0,
                          idx.new_zeros(batch, 0, config.vocab_size, dtype=torch.float)
                          if return_logits else None, prompt_lengths)
    dtype = next(model.parameters()).dtype
    step_logits = torch.empty(batch, max_new_tokens, config.vocab_size, device=device,
                              dtype=dtype) if return_logits else None
    pads = [prompt_length - n for n in prompt_lengths]
    left_pad = torch.tensor(pads, device=device) if any(pads) else None  # [B]
    # Slots fed to the model: the prompt, then every new token but the last.
    cache = KVCache(config, batch, total - 1 if max_new_tokens > 1 else prompt_length,
                    device=device, dtype=dtype,
                    left_pad=pads if any(pads) else None) if use_cache else None

    def forward(ids: Tensor) -> Tensor:  # [B, t] -> [B, V], eagerly
        if cache is not None:
            return model(ids, cache=cache).logits[:, -1]
        return model(ids, left_pad=left_pad).logits[:, -1]

    def sample(logits: Tensor, step: int) -> None:
        if step_logits is not None:
            step_logits[:, step] = logits
        tokens[:, prompt_length + step] = next_token(logits, temperature, top_k, greedy,
                                                     generator)

    graph, capture_s = None, 0.0
    with inference_mode(model, dropless=dropless, backend=backend):
        _synchronize(device)
        start = time.perf_counter()
        sample(forward(idx), 0)  # prefill
        _synchronize(device)
        prefill_s = time.perf_counter() - start
        if cuda_graph and max_new_tokens > 1:
            graph = _capture(model, cache, tokens[:, prompt_length:prompt_length + 1],
                             prompt_length, dropless)
            _synchronize(device)
            capture_s = time.perf_counter() - start - prefill_s
        for step in range(1, max_new_tokens):  # decode
            position = prompt_length + step
            if graph is not None:
                logits = graph(tokens[:, position - 1:position], position - 1)
            elif cache is not None:
                logits = forward(tokens[:, position - 1:position])
            else:
                logits = forward(tokens[:, :position])
            sample(logits, step)
        _synchronize(device)
        decode_s = time.perf_counter() - start - prefill_s - capture_s
    return Generation(tokens, prompt_length, prefill_s, decode_s, step_logits, prompt_lengths,
                      capture_s)


def _capture(model: GPT, cache: KVCache, first_token: Tensor, slot: int,
             dropless: bool) -> DecodeGraph:
    """The decode step's graph, its buffers loaded with the first step's inputs (``first_token``
    [B, 1] at cache slot ``slot``), captured under `static_routing`."""
    step = StaticDecodeStep(model, cache)
    step.load(first_token, slot)
    with static_routing(model, cache.batch_size, dropless=dropless):
        return DecodeGraph(step)


# ----------------------------------------------------------------------- latency breakdown

COMPONENTS = ("attention", "gate", "dispatch", "exchange", "experts", "combine", "dense_ffn",
              "embed_head")
COMPONENT_LABELS = {
    "attention": "attention", "gate": "gate", "dispatch": "dispatch",
    "exchange": "exchange (all-to-all)", "experts": "expert FFN", "combine": "combine",
    "dense_ffn": "dense FFN", "embed_head": "embeddings + LM head",
}
MOE_COMPONENTS = ("gate", "dispatch", "exchange", "experts", "combine")


@dataclass
class LatencyBreakdown:
    """Seconds per forward, per component and per block, as plain data.

    ``per_layer[c][i]``: component c in block i (attention includes its LayerNorm and residual
    add; "dense_ffn" is a dense block's MLP or the residual MLP beside the experts; "combine"
    includes mixing in that residual branch). ``embed_head_s``: token + position embeddings,
    the final LayerNorm and the LM head. ``measured_s``: the wall time of the forward, measured
    outside the hooks; the components tile the forward, so they sum to it up to hook overhead.
    """

    per_layer: dict[str, list[float]]
    embed_head_s: float
    measured_s: float
    steps: int
    batch_size: int
    backend: str
    phase: str = "decode"
    use_cache: bool = True
    context: int = 0  # positions the model attends over (prompt length for prefill)
    moe_layers: list[int] = field(default_factory=list)

    @property
    def totals(self) -> dict[str, float]:
        """Component -> seconds per forward, summed over blocks."""
        out = {c: sum(v) for c, v in self.per_layer.items()}
        out["embed_head"] = self.embed_head_s
        return out

    @property
    def total_s(self) -> float:
        return sum(self.totals.values())

    @property
    def moe_s(self) -> float:
        """The MoE part (gate + dispatch + exchange + expert FFN + combine)."""
        return sum(self.totals[c] for c in MOE_COMPONENTS)

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second (decode: one per sequence per forward)."""
        tokens = self.batch_size if self.phase == "decode" else self.batch_size * self.context
        return tokens / self.measured_s if self.measured_s > 0 else float("nan")

    def rows(self) -> list[dict]:
        """Long format, one dict per (block, component), for tables and views."""
        out = [{"layer": i, "component": c, "seconds": s}
               for c, values in self.per_layer.items() for i, s in enumerate(values)]
        out.append({"layer": None, "component": "embed_head", "seconds": self.embed_head_s})
        return out

    def label(self) -> str:
        cache = "" if self.use_cache else ", no cache"
        return f"{self.backend}{cache} · B={self.batch_size}"


class LatencyProfiler:
    """Times every forward of a moelab GPT by component and block, with module hooks.

    ``with LatencyProfiler(model) as profiler: model(idx)`` then ``profiler.breakdown()``. Each
    hook reads the clock (after ``torch.cuda.synchronize`` on a GPU) and charges the time since
    the previous hook to the component that was running; the hooks sit on the blocks, the
    attention, the FFN or MoE layer, its router, experts and residual MLP, and the final
    LayerNorm. Dispatch and combine are plain functions: while profiling, ``moelab.layer``'s
    references to them are wrapped so that their ends are marked too (this is what separates the
    all-to-all of an expert-parallel layer from the dispatch and combine around it).
    """

    _active = False

    def __init__(self, model: GPT) -> None:
        if not isinstance(model, GPT):
            raise ValueError(f"LatencyProfiler takes a moelab GPT; got {type(model).__name__}")
        self.model = model
        self.device = next(model.parameters()).device
        self.num_layers = len(model.blocks)
        self._handles: list = []
        self._patched: list[tuple[object, str, object]] = []
        self.reset()

    def reset(self) -> None:
        self.seconds = {c: [0.0] * self.num_layers for c in COMPONENTS if c != "embed_head"}
        self.embed_head_s = 0.0
        self.calls = 0
        self._running = False
        self._label, self._layer, self._clock = "embed_head", -1, 0.0

    # ---------------------------------------------------------------------------- timeline
    def _now(self) -> float:
        _synchronize(self.device)
        return time.perf_counter()

    def _mark(self, label: str, layer: int | None = None) -> None:
        """Charge the time since the last mark to the running component; start ``label``."""
        if not self._running:
            return
        now = self._now()
        elapsed = now - self._clock
        if self._label == "embed_head":
            self.embed_head_s += elapsed
        else:
            self.seconds[self._label][self._layer] += elapsed
        self._label = label
        if layer is not None:
            self._layer = layer
        self._clock = now  # hooks cost time too: it goes to the next component (marks tile)

    def _start(self, *_) -> None:
        self._running = True
        self._label, self._layer = "embed_head", -1
        self._clock = self._now()

    def _stop(self, *_) -> None:
        self._mark("embed_head")
        self._running = False
        self.calls += 1

    # -------------------------------------------------------------------------------- hooks
    def _hook(self, module: nn.Module, before: str | None, after: str | None,
              layer: int | None = None) -> None:
        if before is not None:
            self._handles.append(module.register_forward_pre_hook(
                lambda *_: self._mark(before, layer)))
        if after is not None:
            self._handles.append(module.register_forward_hook(
                lambda *_: self._mark(after, layer)))

    def _after_experts(self) -> None:
        self._mark("exchange" if self._parallel[self._layer] else "combine")

    def __enter__(self) -> LatencyProfiler:
        if LatencyProfiler._active:
            raise RuntimeError("another LatencyProfiler is active; profile one model at a time")
        LatencyProfiler._active = True
        model = self.model
        self._parallel = [getattr(b.ffn, "parallel", None) is not None for b in model.blocks]
        self._handles.append(model.register_forward_pre_hook(self._start))
        self._handles.append(model.register_forward_hook(self._stop))
        for i, block in enumerate(model.blocks):
            self._hook(block, "attention", None, i)
            ffn = block.ffn
            if isinstance(ffn, MoE):
                fused = ffn.backend == "triton" and ffn.parallel is None
                self._hook(ffn, "gate", None, i)
                self._hook(ffn.router, None, "experts" if fused else "dispatch", i)
                self._hook(ffn.experts, "experts", None, i)
                self._handles.append(ffn.experts.register_forward_hook(
                    lambda *_: self._after_experts()))
                if ffn.residual:
                    self._hook(ffn.mlp, "dense_ffn", "combine", i)
            elif isinstance(ffn, MLP):
                self._hook(ffn, "dense_ffn", None, i)
        self._hook(model.ln_f, "embed_head", None)
        self._wrap_dispatch_and_combine()
        return self

    def _wrap_dispatch_and_combine(self) -> None:
        from . import layer as layer_module

        profiler = self
        original_dispatch = getattr(layer_module, "dispatch", None)
        original_combine = getattr(layer_module, "combine", None)
        if original_dispatch is not None:
            def dispatch(*args, **kwargs):
                out = original_dispatch(*args, **kwargs)
                # next: the all-to-all (expert parallel) or the experts' own padding (local)
                profiler._mark("exchange" if profiler._parallel[profiler._layer] else "dispatch")
                return out
            self._patched.append((layer_module, "dispatch", original_dispatch))
            layer_module.dispatch = dispatch
        if original_combine is not None:
            def combine(*args, **kwargs):
                profiler._mark("combine")
                return original_combine(*args, **kwargs)
            self._patched.append((layer_module, "combine", original_combine))
            layer_module.combine = combine

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, name, original in self._patched:
            setattr(module, name, original)
        self._patched.clear()
        self._running = False
        LatencyProfiler._active = False

    def breakdown(self, measured_s: float, batch_size: int, backend: str, phase: str = "decode",
                  use_cache: bool = True, context: int = 0) -> LatencyBreakdown:
        """Seconds per forward (averaged over the profiled calls)."""
        calls = max(self.calls, 1)
        moe_layers = [i for i, b in enumerate(self.model.blocks) if b.is_moe]
        return LatencyBreakdown(
            per_layer={c: [s / calls for s in v] for c, v in self.seconds.items()},
            embed_head_s=self.embed_head_s / calls, measured_s=measured_s / calls,
            steps=self.calls, batch_size=batch_size, backend=backend, phase=phase,
            use_cache=use_cache, context=context, moe_layers=moe_layers)


@torch.no_grad()
def decode_latency(model: GPT, batch_size: int = 1, prompt_length: int = 16, steps: int = 8,
                   backend: str | None = "index", dropless: bool = True, use_cache: bool = True,
                   warmup: int = 2, phase: str = "decode", seed: int = 0) -> LatencyBreakdown:
    """Where the time of one forward goes, per component and block, averaged over ``steps``.

    phase="decode": a prompt of random tokens is prefilled, ``warmup`` decode steps run
    unprofiled, then ``steps`` one-token decode steps are profiled (with ``use_cache=False``
    each step recomputes the whole prefix: the naive path). phase="prefill": the forward over
    the prompt itself, ``steps`` times.
    """
    if phase not in ("decode", "prefill"):
        raise ValueError(f"phase must be 'decode' or 'prefill'; got {phase!r}")
    for name, value, low in (("batch_size", batch_size, 1), ("prompt_length", prompt_length, 1),
                             ("steps", steps, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    config = model.config
    decode_positions = (warmup + steps) if phase == "decode" else 0
    if prompt_length + decode_positions > config.block_size:
        raise ValueError(f"prompt_length {prompt_length} + warmup {warmup} + steps {steps} "
                         f"exceeds block_size={config.block_size}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (batch_size, prompt_length + decode_positions),
                           generator=gen).to(device)
    measured = 0.0
    with inference_mode(model, dropless=dropless, backend=backend):
        used_backend = next((m.backend for m in model.modules() if isinstance(m, MoE)),
                            backend or "dense")
        profiler = LatencyProfiler(model)

        def timed(fn) -> float:
            _synchronize(device)
            start = time.perf_counter()
            fn()
            _synchronize(device)
            return time.perf_counter() - start

        if phase == "prefill":
            for _ in range(warmup):
                model(tokens)
            with profiler:
                for _ in range(steps):
                    measured += timed(lambda: model(tokens))
            return profiler.breakdown(measured, batch_size, used_backend, "prefill",
                                      use_cache, prompt_length)

        cache = KVCache(config, batch_size, prompt_length + decode_positions, device=device,
                        dtype=dtype) if use_cache else None
        model(tokens[:, :prompt_length], cache=cache)  # prefill, not profiled

        def step(position: int) -> None:
            if cache is not None:
                model(tokens[:, position - 1:position], cache=cache)
            else:
                model(tokens[:, :position])

        position = prompt_length + 1
        for _ in range(warmup):
            step(position)
            position += 1
        with profiler:
            for _ in range(steps):
                measured += timed(lambda p=position: step(p))
                position += 1
    return profiler.breakdown(measured, batch_size, used_backend, "decode", use_cache,
                              prompt_length + warmup + steps // 2)


def decode_sweep(model: GPT, backends: Sequence[str] = ("einsum", "index"),
                 batch_sizes: Sequence[int] = (1, 8), use_cache: bool = True,
                 **kwargs) -> list[LatencyBreakdown]:
    """`decode_latency` for every (backend, batch size): the data of a LatencyView."""
    return [decode_latency(model, batch_size=b, backend=backend, use_cache=use_cache, **kwargs)
            for backend in backends for b in batch_sizes]
