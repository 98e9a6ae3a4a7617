"""Expert parallelism applied from outside: `parallelize(model, ParallelConfig(...))`.

``parallelize`` slices every MoE layer's expert bank to this rank's share (E/P experts) and
installs the exchange between dispatch and the experts, as torchtitan applies its parallelisms:

    dispatch -> [exchange to the experts' ranks] -> local Experts -> [exchange back] -> combine

Routing, dispatch and combine are unchanged, and the layer's code does not branch on it (its
experts' runner becomes "parallel"). Exchanges: "flat", "hierarchical" (§5.3, Fig. 8,
``node_size`` ranks per simulated node) and "tp_coordinated" (§5.3, Fig. 9, ``tp_size=L``: the
L tensor-parallel ranks hold the same tokens, so each sends only its 1/L of every expert's slots,
among the ranks with the same TP rank, and an all-gather over the TP group restores the rest).

PR-MoE layers have different expert counts, and the best EP degree is one expert per rank, so
each MoE layer uses min(ep_size, its expert count) ranks and each distinct degree gets its own
groups (§4.1.3, "multi-expert and multi-data parallelism").
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import Config, documented, option, resolve
from ..exchanges import EXCHANGES
from ..experts import Experts
from ..layer import MoE
from ..routing import Routing
from .alltoall import Exchanger, ExchangeStats, _permute_blocks, hierarchical_subgroups, in_graph
from .groups import check_ep_size, new_group
from .tracing import operation


@documented
@dataclass(frozen=True)
class ParallelConfig(Config):
    """How `parallelize` spreads the experts over the ranks of an initialised process group."""

    ep_size: int | None = option(
        None, "expert-parallel ranks per group; None = the world size / tp_size. Each MoE "
              "layer uses min(ep_size, its expert count)", kind="int", low=1)
    exchange: str = option("flat", "'flat', 'hierarchical' (needs node_size) or "
                                   "'tp_coordinated' (needs tp_size > 1)", choices=EXCHANGES)
    node_size: int | None = option(None, "ranks per (simulated) node, for the hierarchical "
                                         "exchange", kind="int", low=1)
    tp_size: int = option(1, "tensor-parallel lanes that hold the same tokens, for the "
                             "TP-coordinated exchange", low=1)
    timeout: float | None = option(None, "seconds a collective of these groups may wait; None "
                                         "= the run's", kind="float", above=0)

    def validate(self) -> None:
        if self.exchange == "hierarchical" and self.node_size is None:
            raise ValueError("exchange='hierarchical' needs node_size (ranks per node)")
        if self.exchange != "hierarchical" and self.node_size is not None:
            raise ValueError(f"node_size={self.node_size} is only used by "
                             f"exchange='hierarchical'; got exchange={self.exchange!r}")
        if (self.exchange == "tp_coordinated") != (self.tp_size > 1):
            raise ValueError(f"exchange='tp_coordinated' and tp_size > 1 go together; got "
                             f"exchange={self.exchange!r}, tp_size={self.tp_size}")


def parallelize(model: nn.Module, config: ParallelConfig | None = None, **options) -> nn.Module:
    """Spread the experts of every MoE layer in ``model`` (a GPT, an MoE, any module) over the
    ranks of the initialised process group; returns ``model``, changed in place.

    Collective: every rank calls it on the same model. Expert banks are replaced by this rank's
    slice (their current weights kept), so build the optimizer afterwards. Fails on every rank,
    before any exchange, when the ranks' models or options differ. Every router learns that it
    is shared by all ranks (an aux-free bias is then updated from the whole batch's load), so
    ``ep_size=1`` is plain data parallelism: the experts stay whole on every rank.
    """
    if not dist.is_initialized():
        raise RuntimeError("parallelize needs an initialised process group: run inside "
                           "moelab.parallel.launch(...) or torch.distributed.init_process_group")
    config = resolve(ParallelConfig, config, options)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError(f"parallelize found no MoE layer in {type(model).__name__}")
    world = dist.get_world_size()
    ep_size = config.ep_size or world // config.tp_size
    if config.tp_size > 1 and world != ep_size * config.tp_size:
        raise ValueError(f"the parallelism-coordinated exchange needs world size = ep_size · "
                         f"tp_size; got world {world}, ep_size {ep_size}, tp_size "
                         f"{config.tp_size}")
    sizes = [min(ep_size, layer.num_experts) for layer in layers]
    for layer, size in zip(layers, sizes, strict=True):
        if layer.parallel is not None or layer.router.reduce_load is not None:
            raise ValueError("this model is already parallelized: parallelize it once")
        check_ep_size(world, size, layer.num_experts)
        if config.exchange == "hierarchical" and not 1 < config.node_size < size:
            raise ValueError(f"exchange='hierarchical' needs 1 < node_size < ep_size={size} "
                             f"(got node_size={config.node_size}); with one node it is the "
                             "flat exchange: use exchange='flat'")
        if config.node_size is not None and size % config.node_size:
            raise ValueError(f"node_size={config.node_size} must divide ep_size={size}")
        if config.tp_size > 1 and not layer.router.config.drop_tokens:
            raise ValueError("the parallelism-coordinated exchange slices the capacity layout's "
                             "slots over the TP lanes, and dropless routing has no capacity: "
                             "build the MoE layers with drop_tokens=True, or use "
                             "exchange='flat'")
    _check_same_everywhere(config, layers)
    groups: dict[int, dict] = {}
    for layer, size in zip(layers, sizes, strict=True):
        layer.router.reduce_load = SumOverRanks("all_reduce (aux-free bias load)")
        if size == 1:  # data parallel only: every rank keeps every expert
            continue
        if size not in groups:  # created in layer order: the same on every rank
            groups[size] = _build_groups(size, config)
        plan = ExpertParallel(layer.num_experts, size, groups[size], config)
        layer.experts = plan.slice(layer.experts)
        layer.choose_runner()
    return model


class SumOverRanks:
    """``reduce(t)``: t summed over every rank of the run (a copy; t is left alone)."""

    def __init__(self, name: str, group=None) -> None:
        self.name, self.group = name, group

    def __call__(self, tensor: Tensor) -> Tensor:
        total = tensor.clone()
        with operation(self.name):
            dist.all_reduce(total, group=self.group)
        return total


def _describe(config: ParallelConfig, layers: list[MoE]) -> dict:
    return {"parallel": config.to_dict(),
            "layers": [dict(d_model=m.d_model, d_ff=m.d_ff, num_experts=m.num_experts,
                            config=m.config.to_dict()) for m in layers]}


def _check_same_everywhere(config: ParallelConfig, layers: list[MoE]) -> None:
    """Fail on every rank, before any exchange, when ranks built different layers."""
    description = _describe(config, layers)
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).digest()
    mine = torch.tensor([int.from_bytes(digest[:7], "little")], dtype=torch.long)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    with operation("all_gather (layer config check)"):
        dist.all_gather(everyone, mine)
    if len({int(t) for t in everyone}) != 1:
        raise ValueError(f"ranks built MoE layers with different configs (mine: {description}); "
                         "every rank must construct the same model and parallelize it the same "
                         "way")


def _build_groups(ep_size: int, config: ParallelConfig) -> dict:
    """Every group one expert-parallel degree needs, created in the same order on every rank."""
    world, rank, tp_size = dist.get_world_size(), dist.get_rank(), config.tp_size
    if tp_size > 1:
        # rank = t·L + l: TP group = one t, EP group = one l (the ranks with the same TP rank)
        ep_groups = [[t * tp_size + lane for t in range(ep_size)] for lane in range(tp_size)]
        replica_groups = [[t * tp_size + lane for lane in range(tp_size)]
                          for t in range(ep_size)]
    else:
        ep_groups = [list(range(s, s + ep_size)) for s in range(0, world, ep_size)]
        replica_groups = [list(range(o, world, ep_size)) for o in range(ep_size)]
    mine = {}
    for kind, kind_groups in (("ep", ep_groups), ("replica", replica_groups)):
        for ranks in kind_groups:
            handle = new_group(ranks, config.timeout)
            if rank in ranks:
                mine[kind], mine[kind + "_ranks"] = handle, ranks
    if config.exchange == "hierarchical":
        for ranks in ep_groups:
            sub = hierarchical_subgroups(ranks, config.node_size, config.timeout)
            if rank in sub:
                mine["intra"], mine["inter"] = sub[rank]
    return mine


class ExpertParallel:
    """The process groups and the exchange of one expert-parallel MoE layer (made by
    `parallelize`; its bank's ``parallel``)."""

    def __init__(self, num_experts: int, ep_size: int, groups: dict,
                 config: ParallelConfig) -> None:
        self.num_experts, self.ep_size, self.tp_size = num_experts, ep_size, config.tp_size
        self.exchange, self.node_size = config.exchange, config.node_size
        self.ep_group, self.replica_group = groups["ep"], groups["replica"]
        self.ep_ranks, self.replica_ranks = groups["ep_ranks"], groups["replica_ranks"]
        self.ep_rank = self.ep_ranks.index(dist.get_rank())
        self.tp_rank = self.replica_ranks.index(dist.get_rank()) if self.tp_size > 1 else 0
        self.exchanger = Exchanger(
            self.ep_group, self.ep_rank, ep_size,
            node_size=config.node_size if config.exchange == "hierarchical" else None,
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

    def slice(self, bank: Experts) -> Experts:
        """A bank of this rank's experts, holding ``bank``'s current weights for them."""
        rows = self.local_experts
        with torch.device("meta"):  # no init draws: the weights are copied below
            local = Experts(self.num_local_experts, bank.d_model, bank.d_ff,
                            activation=bank.activation, bias=bank.b_in is not None,
                            swiglu_alpha=bank.swiglu_alpha, swiglu_limit=bank.swiglu_limit)
        local = local.to_empty(device=bank.w_in.device).to(bank.w_in.dtype)
        with torch.no_grad():
            for name, param in local.named_parameters():
                param.copy_(getattr(bank, name)[rows.start:rows.stop])
        local.parallel = self
        return local

    # ------------------------------------------------------------------------------ forward

    def run_experts(self, experts: Experts, buffer: Tensor, routing: Routing) -> Tensor:
        """buffer: my dispatched rows ordered by global expert ([E, C, d], or the packed
        dropless [N, d]). Returns the experts' outputs in the same layout."""
        if self.tp_size > 1:
            return self._run_tp_coordinated(experts, buffer)
        if routing.capacity is None:
            rows_per_expert = routing.load
        else:
            rows_per_expert = torch.full((self.num_experts,), routing.capacity, dtype=torch.long)
        shape, d = buffer.shape, buffer.shape[-1]
        out = self._exchange_and_run(experts, buffer.reshape(-1, d), rows_per_expert)
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
        mine = _DropSlots.apply(in_graph(buffer), self.tp_rank, lanes,
                                self.replica_group)  # [E, C/L, d]
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
