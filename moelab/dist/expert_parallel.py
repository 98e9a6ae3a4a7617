"""Expert parallelism for one MoE layer: the exchange inserted between dispatch and the experts.

``MoE(..., ep_size=P)`` inside an initialised process group holds E/P experts per rank and runs

    dispatch -> [exchange to the experts' ranks] -> local Experts -> [exchange back] -> combine

with routing, dispatch and combine unchanged. Exchanges: "flat", "hierarchical" (§5.3, Fig. 8,
``node_size`` ranks per simulated node) and parallelism-coordinated (§5.3, Fig. 9,
``tp_size=L``: the L tensor-parallel ranks hold the same tokens, so each sends only its 1/L of
every expert's slots, among the ranks with the same TP rank, and an all-gather over the TP group
restores the rest).
"""

from __future__ import annotations

import hashlib
import json
import math

import torch
import torch.distributed as dist
from torch import Tensor

from .alltoall import Exchanger, ExchangeStats, _permute_blocks, hierarchical_subgroups
from .groups import check_ep_size
from .tracing import operation

EXCHANGES = ("flat", "hierarchical")
_CACHE: dict[tuple, dict] = {}


def _build_groups(ep_size: int, node_size: int | None, tp_size: int) -> dict:
    """Every group this layout needs, created in the same order on every rank."""
    key = (ep_size, node_size, tp_size)
    if key in _CACHE:
        return _CACHE[key]
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp_size > 1:
        # rank = t·L + l: TP group = one t, EP group = one l (the ranks with the same TP rank)
        ep_groups = [[t * tp_size + lane for t in range(ep_size)] for lane in range(tp_size)]
        replica_groups = [[t * tp_size + lane for lane in range(tp_size)]
                          for t in range(ep_size)]
    else:
        ep_groups = [list(range(s, s + ep_size)) for s in range(0, world, ep_size)]
        replica_groups = [list(range(o, world, ep_size)) for o in range(ep_size)]
    mine = {}
    for kind, groups in (("ep", ep_groups), ("replica", replica_groups)):
        for ranks in groups:
            handle = dist.new_group(ranks)
            if rank in ranks:
                mine[kind], mine[kind + "_ranks"] = handle, ranks
    if node_size is not None:
        for ranks in ep_groups:
            sub = hierarchical_subgroups(ranks, node_size)
            if rank in sub:
                mine["intra"], mine["inter"] = sub[rank]
    _CACHE[key] = mine
    return mine


def _fingerprint(config: dict) -> int:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:7], "little")


class ExpertParallel:
    """The process groups and the exchange of one expert-parallel MoE layer."""

    def __init__(self, num_experts: int, ep_size: int, exchange: str = "flat",
                 node_size: int | None = None, tp_size: int = 1,
                 layer_config: dict | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("ep_size > 1 needs an initialised process group: run inside "
                               "moelab.dist.launch(...) or torch.distributed.init_process_group")
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}; got {exchange!r}")
        if exchange == "hierarchical" and (node_size is None or node_size < 1):
            raise ValueError("exchange='hierarchical' needs node_size (ranks per node) >= 1")
        if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
            raise ValueError(f"tp_size must be an integer >= 1; got {tp_size!r}")
        world = dist.get_world_size()
        check_ep_size(world, ep_size, num_experts)
        if tp_size > 1 and world != ep_size * tp_size:
            raise ValueError(f"parallelism-coordinated exchange needs world size = ep_size · "
                             f"tp_size; got world {world}, ep_size {ep_size}, tp_size {tp_size}")
        if node_size is not None and ep_size % node_size:
            raise ValueError(f"node_size={node_size} must divide ep_size={ep_size}")
        if exchange == "hierarchical" and not 1 < node_size < ep_size:
            raise ValueError(f"exchange='hierarchical' needs 1 < node_size < ep_size={ep_size} "
                             f"(got node_size={node_size}); with one node it is the flat "
                             "exchange: use exchange='flat'")
        self.num_experts, self.ep_size, self.tp_size = num_experts, ep_size, tp_size
        self.exchange, self.node_size = exchange, node_size
        self._check_same_config_everywhere({**(layer_config or {}), "num_experts": num_experts,
                                            "ep_size": ep_size, "exchange": exchange,
                                            "node_size": node_size, "tp_size": tp_size})
        groups = _build_groups(ep_size, node_size if exchange == "hierarchical" else None,
                               tp_size)
        self.ep_group, self.replica_group = groups["ep"], groups["replica"]
        self.ep_ranks, self.replica_ranks = groups["ep_ranks"], groups["replica_ranks"]
        self.ep_rank = self.ep_ranks.index(dist.get_rank())
        self.tp_rank = self.replica_ranks.index(dist.get_rank()) if tp_size > 1 else 0
        self.exchanger = Exchanger(
            self.ep_group, self.ep_rank, ep_size,
            node_size=node_size if exchange == "hierarchical" else None,
            intra_group=groups.get("intra"), inter_group=groups.get("inter"))
        self.stats = ExchangeStats()
        # [P, P] rows sent src -> dst in the last exchange, indexed by position in the EP group
        # (global rank = self.ep_ranks[position])
        self.last_traffic: Tensor | None = None

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def local_experts(self) -> range:
        """Global ids of this rank's experts."""
        start = self.ep_rank * self.num_local_experts
        return range(start, start + self.num_local_experts)

    @staticmethod
    def _check_same_config_everywhere(config: dict) -> None:
        """Fail on every rank, before any exchange, when ranks built different layers."""
        mine = torch.tensor([_fingerprint(config)], dtype=torch.long)
        everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        with operation("all_gather (layer config check)"):
            dist.all_gather(everyone, mine)
        if len({int(t) for t in everyone}) != 1:
            raise ValueError(f"ranks built MoE layers with different configs (mine: {config}); "
                             "every rank must construct the same model")

    # ------------------------------------------------------------------------------ forward

    def run_experts(self, experts, buffer: Tensor, rows_per_expert: Tensor) -> Tensor:
        """buffer: my dispatched rows ordered by global expert, ``rows_per_expert[e]`` of them
        for expert e ([E, C, d] flattened, or the packed dropless buffer). Returns the experts'
        outputs in the same layout."""
        shape, d = buffer.shape, buffer.shape[-1]
        flat = buffer.reshape(-1, d)
        if self.tp_size > 1:
            return self._run_tp_coordinated(experts, buffer)
        out = self._exchange_and_run(experts, flat, rows_per_expert)
        return out.view(shape)

    def _exchange_and_run(self, experts, flat: Tensor, rows_per_expert: Tensor) -> Tensor:
        p, e_local = self.ep_size, self.num_local_experts
        table = self.exchanger.gather_rows(rows_per_expert.to(torch.long))  # [P, E]
        rows = table.view(p, p, e_local).sum(-1)  # [src, dst]
        self.last_traffic = rows
        received = self.exchanger(flat, rows, self.stats)  # blocks (src, local expert)
        mine = table[:, self.ep_rank * e_local:(self.ep_rank + 1) * e_local]  # [src, e_local]
        sizes = mine.reshape(-1).tolist()
        by_expert = [src * e_local + e for e in range(e_local) for src in range(p)]
        expert_in = _permute_blocks(received, sizes, by_expert)  # blocks (local expert, src)
        load = mine.sum(0)  # [e_local]
        offsets = torch.cat([load.new_zeros(1), torch.cumsum(load, 0)])
        expert_out = experts.forward_packed(expert_in, offsets)
        back = _permute_blocks(expert_out, [sizes[i] for i in by_expert],
                               _inverse(by_expert))  # blocks (src, local expert) again
        return self.exchanger(back, rows.t().contiguous(), self.stats)

    def _run_tp_coordinated(self, experts, buffer: Tensor) -> Tensor:
        """Capacity layout [E, C, d]: keep my TP rank's 1/L of every expert's slots, exchange
        among the ranks with my TP rank, run, exchange back, all-gather the slots over TP."""
        if buffer.dim() != 3:
            raise ValueError("the parallelism-coordinated exchange needs the capacity layout "
                             "(drop_tokens=True); dropless buffers are not sliced by TP rank")
        num_experts, capacity, d = buffer.shape
        lanes = self.tp_size
        padded = math.ceil(capacity / lanes) * lanes  # pad C to a multiple of L (empty slots)
        if padded != capacity:
            buffer = torch.cat([buffer, buffer.new_zeros(num_experts, padded - capacity, d)], 1)
        part = padded // lanes
        mine = _DropSlots.apply(buffer, self.tp_rank, lanes, self.replica_group)  # [E, C/L, d]
        rows = torch.full((num_experts,), part, dtype=torch.long)
        out = self._exchange_and_run(experts, mine.reshape(-1, d), rows)
        self.stats.add("all_gather (TP)", [1] * lanes, self.tp_rank,
                       out.numel() * out.element_size())
        full = _GatherSlots.apply(out.view(num_experts, part, d), self.tp_rank, lanes,
                                  self.replica_group)
        return full[:, :capacity]


def _inverse(order: list[int]) -> list[int]:
    inverse = [0] * len(order)
    for position, index in enumerate(order):
        inverse[index] = position
    return inverse


def _all_gather_slots(x: Tensor, lanes: int, group) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(lanes)]
    with operation("all_gather (TP slots)"):
        dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


class _DropSlots(torch.autograd.Function):
    """Keep TP rank l's slice of the slots; backward all-gathers the slices (DeepSpeed's
    drop_tokens / gather_tokens pair)."""

    @staticmethod
    def forward(ctx, x, lane, lanes, group):
        ctx.lanes, ctx.group = lanes, group
        part = x.shape[1] // lanes
        return x[:, lane * part:(lane + 1) * part].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_slots(grad, ctx.lanes, ctx.group), None, None, None


class _GatherSlots(torch.autograd.Function):
    """All-gather the TP ranks' slot slices; backward keeps this rank's slice of the gradient
    (every TP rank computes the same downstream gradient)."""

    @staticmethod
    def forward(ctx, x, lane, lanes, group):
        ctx.lane, ctx.lanes = lane, lanes
        return _all_gather_slots(x, lanes, group)

    @staticmethod
    def backward(ctx, grad):
        part = grad.shape[1] // ctx.lanes
        return grad[:, ctx.lane * part:(ctx.lane + 1) * part].contiguous(), None, None, None
