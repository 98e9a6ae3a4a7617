"""Launch targets for notebook 06 and benchmarks/bench_alltoall.py.

Each ``launch`` target runs on every rank and returns plain data; the live ones also send one
*traffic record* per step with ``report(**record)``, which ``moelab.viz.parallel_view.ParallelView``
draws (``launch(..., on_metric=view.update)``). A traffic record, from one rank, for one MoE layer
and one forward:

    rank         int         the global rank that sent it
    step         int         training step (or config index)
    layer        int         which MoE layer of the model (0 for a lone layer)
    exchange     str         "flat" | "hierarchical" | "tp_coordinated"
    world        int         W, ranks in the run
    ep_size      int         P, ranks in one expert-parallel group
    tp_size      int         L, tensor-parallel lanes (1 = none)
    node_size    int | None  G, ranks per (simulated) node, hierarchical only
    num_experts  int         E
    experts      [int]       global ids of the experts this rank holds
    ep_group     [int]       global ranks of this rank's expert-parallel group
    traffic      [W ints]    rows this rank sent to each global rank in the forward (dispatch)
                             exchange; its own entry = rows that stayed local
    row_bytes    int         bytes of one row (d_model · element size)
    expert_load  [E ints]    routes this rank kept for each expert (routing.load)
    messages     int         messages this rank sent in this forward (dispatch + combine
                             exchanges, + the TP all-gather), from ExchangeStats
    bytes_sent   int         bytes it sent in them
    loss         float|None  this rank's loss at that step, when training

The counts the ranks measure are compared with the formulas of `moelab.exchanges`.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from ..data import multidomain_corpus
from ..layer import MoE
from ..model import GPT, preset
from ..parallel import clip_grad_norm_, parallelize, report, sync_gradients
from ..train import param_groups
from .parallel_checks import ep_equivalence, ep_training_equivalence, reshard_roundtrip

# ------------------------------------------------------------------------- on the ranks

def _layer(config: dict, num_experts: int, d_model: int, d_ff: int, k: int,
           drop_tokens: bool, seed: int):
    """An expert-parallel MoE layer for one exchange config (a dict of ParallelConfig options;
    the same weights on every rank)."""
    torch.manual_seed(seed)
    layer = MoE(d_model, d_ff, num_experts, k=k, drop_tokens=drop_tokens, use_rts=False,
                min_capacity=0).eval()
    config = _plan(config)
    return parallelize(layer, ep_size=dist.get_world_size() // config["tp_size"], **config)


def _plan(config: dict) -> dict:
    """An exchange config as ParallelConfig options ({"tp_size": L} alone means the
    TP-coordinated exchange)."""
    tp_size = config.get("tp_size", 1)
    return {"exchange": "tp_coordinated" if tp_size > 1 else "flat", **config,
            "tp_size": tp_size}


def _tokens(num_tokens: int, d_model: int, tp_size: int, seed: int, skew: float) -> torch.Tensor:
    """This rank's tokens: the TP lanes of one group hold the same ones (as after a
    tensor-sliced layer); `skew` tilts them so that routing is uneven across experts."""
    group = dist.get_rank() // tp_size
    generator = torch.Generator().manual_seed(seed + 1 + group)
    x = torch.randn(num_tokens, d_model, generator=generator)
    x[:, 0] += skew
    return x


def traffic_record(layer, routing, step: int, messages: int, bytes_sent: int,
                   loss: float | None = None, layer_index: int = 0) -> dict:
    """The record described in this module's docstring, for `layer` after a forward."""
    parallel = layer.parallel
    world = dist.get_world_size()
    traffic = [0] * world
    my_row = parallel.last_traffic[parallel.ep_rank].tolist()
    for group_rank, rows in zip(parallel.ep_ranks, my_row, strict=True):
        traffic[group_rank] = int(rows)
    weight = layer.experts.w_in
    return {
        "rank": dist.get_rank(), "step": step, "layer": layer_index,
        "exchange": parallel.exchange,
        "world": world, "ep_size": parallel.ep_size, "tp_size": parallel.tp_size,
        "node_size": parallel.node_size if parallel.exchange == "hierarchical" else None,
        "num_experts": parallel.num_experts, "experts": list(parallel.local_experts),
        "ep_group": list(parallel.ep_ranks), "traffic": traffic,
        "row_bytes": layer.d_model * weight.element_size(),
        "expert_load": routing.load.tolist(), "messages": messages, "bytes_sent": bytes_sent,
        "loss": loss,
    }


def exchange_comparison(configs: list[dict], num_tokens: int = 24, d_model: int = 16,
                        d_ff: int = 32, num_experts: int = 8, k: int = 1,
                        drop_tokens: bool = True, skew: float = 1.0, seed: int = 0,
                        send_reports: bool = True) -> list[dict]:
    """One forward per exchange config (dicts of exchange / node_size / tp_size); returns (and
    reports, for a live view) one traffic record per config from this rank."""
    records = []
    for index, config in enumerate(configs):
        layer = _layer(config, num_experts, d_model, d_ff, k, drop_tokens, seed)
        x = _tokens(num_tokens, d_model, config.get("tp_size", 1), seed, skew)
        with torch.no_grad():
            _, routing = layer(x)
        stats = layer.parallel.stats
        record = traffic_record(layer, routing, index, stats.messages, stats.bytes_sent)
        record["steps"] = list(stats.steps)
        if send_reports:
            report(**record)
        records.append(record)
    return records


class _TimedExchanger:
    """Wraps an Exchanger: accumulates the seconds spent in its collectives."""

    def __init__(self, exchanger) -> None:
        self.exchanger, self.seconds = exchanger, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.exchanger(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def gather_rows(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.exchanger.gather_rows(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self.exchanger, name)


def exchange_benchmark(configs: list[dict], token_counts: list[int], rounds: int = 5,
                       warmup: int = 2, d_model: int = 128, d_ff: int = 256,
                       num_experts: int = 8, k: int = 1, seed: int = 0) -> list[dict]:
    """Inference forwards of one expert-parallel layer per (config, tokens per rank).

    Per forward and rank: messages and bytes sent (ExchangeStats, the largest over ranks) and
    the median over `rounds` of the slowest rank's forward time and of its time inside the
    exchanges (the all_to_all calls and the gather of their sizes; the TP all-gather is in the
    forward time only). A barrier starts every round."""
    rows = []
    for config in configs:
        layer = _layer(config, num_experts, d_model, d_ff, k, True, seed)
        timed = _TimedExchanger(layer.parallel.exchanger)
        layer.parallel.exchanger = timed
        for num_tokens in token_counts:
            x = _tokens(num_tokens, d_model, config.get("tp_size", 1), seed, 0.0)
            forward_s, exchange_s, counted = [], [], None
            for round_index in range(warmup + rounds):
                stats = layer.parallel.stats
                before = (stats.messages, stats.bytes_sent)
                timed.seconds = 0.0
                dist.barrier()
                start = time.perf_counter()
                with torch.no_grad():
                    layer(x)
                elapsed = torch.tensor([time.perf_counter() - start, timed.seconds,
                                        stats.messages - before[0],
                                        stats.bytes_sent - before[1]], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
                if round_index >= warmup:
                    forward_s.append(float(elapsed[0]))
                    exchange_s.append(float(elapsed[1]))
                    counted = (int(elapsed[2]), int(elapsed[3]))
            rows.append({
                "world": dist.get_world_size(), "exchange": _plan(config)["exchange"],
                "node_size": config.get("node_size"), "tp_size": config.get("tp_size", 1),
                "tokens": num_tokens, "d_model": d_model, "num_experts": num_experts,
                "messages": counted[0], "bytes": counted[1],
                "forward_ms": 1e3 * statistics.median(forward_s),
                "exchange_ms": 1e3 * statistics.median(exchange_s),
            })
    return rows


def equivalence_table(cases: list[dict], tp_cases: list[dict] = (), d_model: int = 8,
                      d_ff: int = 16, num_experts: int = 4) -> list[dict]:
    """`parallel_checks.ep_equivalence` for `cases` at ep_size = world, then for `tp_cases` at
    ep_size = world / tp_size, in one launch."""
    world = dist.get_world_size()
    out = ep_equivalence(list(cases), world, d_model, d_ff, num_experts)
    for case in tp_cases:
        out += ep_equivalence([case], world // case["tp_size"], d_model, d_ff, num_experts)
    return out


def training_checks(ep_size: int = 2, steps: int = 2,
                    reshard_sizes: tuple[int, ...] = (4, 2)) -> dict:
    """`parallel_checks.ep_training_equivalence` and `reshard_roundtrip` in one launch."""
    return {"training": ep_training_equivalence(ep_size, steps),
            "reshard": reshard_roundtrip(tuple(reshard_sizes))}


def train_with_reports(steps: int = 8, ep_size: int | None = None, exchange: str = "flat",
                       node_size: int | None = None, block_size: int = 32, batch_size: int = 2,
                       d_model: int = 32, experts: int = 4, drop_tokens: bool = False,
                       lr: float = 3e-3, seed: int = 0) -> dict:
    """Train a tiny GPT with expert parallelism (data parallel over every rank), and after each
    step report a traffic record of its first MoE layer. Dropless by default, so that the
    traffic follows the routing (with capacity every expert ships C rows whatever it got)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    config = preset("tiny", block_size=block_size, d_model=d_model, n_head=2, experts=experts,
                    use_rts=False, drop_tokens=drop_tokens)
    model = parallelize(GPT(config), ep_size=ep_size or world, exchange=exchange,
                        node_size=node_size)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=lr)
    data = multidomain_corpus(20_000)
    first = config.moe_layers[0]
    layer = model.blocks[first].ffn
    losses = []
    for step in range(1, steps + 1):
        generator = torch.Generator().manual_seed(1000 * rank + step)
        x, y = data.batch(batch_size, block_size, generator)
        before = (layer.parallel.stats.messages, layer.parallel.stats.bytes_sent)
        out = model(x, y)
        messages = layer.parallel.stats.messages - before[0]
        bytes_sent = layer.parallel.stats.bytes_sent - before[1]
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        sync_gradients(model)
        clip_grad_norm_(model, 1.0)
        optimizer.step()
        losses.append(float(out.lm_loss))
        report(**traffic_record(layer, out.routings[first], step, messages, bytes_sent,
                                loss=float(out.lm_loss), layer_index=0))
    return {"rank": rank, "losses": losses}
