"""Gradient averaging and clipping for expert-parallel data-parallel training.

Every rank trains on its own batch; the loss is the mean over ranks. Shared (non-expert)
parameters are replicated: their gradients are summed over all W ranks and divided by W. An
expert lives on the W/P ranks of its expert-data-parallel group, and the exchange's backward has
already brought it the gradient from every rank's tokens routed to it: summed over that group and
divided by W it is the same mean (DeepSpeed divides expert gradients by the full data-parallel
size for this reason; its ZeRO path once did not, giving ep_size-times too large expert gradients:
#5618, #6545).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..experts import expert_banks
from .tracing import operation


def _split(model: nn.Module):
    """(shared parameters, [(expert parameter, its bank's ExpertParallel or None)])."""
    experts = [(param, bank.parallel) for _, bank in expert_banks(model)
               for param in bank.parameters()]
    seen = {id(param) for param, _ in experts}
    shared = [p for p in model.parameters() if id(p) not in seen]
    return shared, experts


def sync_gradients(model: nn.Module) -> None:
    """Average gradients across ranks: shared over everyone, experts over their EDP group."""
    sync_shared_gradients(model)
    sync_expert_gradients(model)


def sync_shared_gradients(model: nn.Module) -> None:
    """The shared (non-expert) parameters' gradients, averaged over all W ranks."""
    world = dist.get_world_size()
    shared, _ = _split(model)
    with operation("all_reduce (shared gradients)"):
        for param in shared:
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= world


def sync_expert_gradients(model: nn.Module) -> None:
    """Each expert's gradients, summed over its expert-data-parallel group and divided by W."""
    world = dist.get_world_size()
    _, experts = _split(model)
    with operation("all_reduce (expert gradients over the expert-data-parallel group)"):
        for param, parallel in experts:
            if param.grad is None:
                continue
            group = parallel.replica_group if parallel is not None else None
            dist.all_reduce(param.grad, group=group)
            param.grad /= world


def clip_grad_norm_(model: nn.Module, max_norm: float) -> float:
    """Clip by the global gradient norm, counting every parameter exactly once: the shared ones
    (identical on all ranks after `sync_gradients`) once, each expert once (its EP group holds
    every expert of the layer once). Returns the norm before clipping."""
    shared, experts = _split(model)
    shared_sq = sum(float(p.grad.double().square().sum()) for p in shared if p.grad is not None)
    expert_sq = torch.zeros((), dtype=torch.float64)
    groups = {}
    for param, parallel in experts:
        if param.grad is not None:
            key = id(parallel.ep_group) if parallel is not None else None
            groups.setdefault(key, [parallel, torch.zeros((), dtype=torch.float64)])
            groups[key][1] += param.grad.double().square().sum()
    for parallel, total in groups.values():
        if parallel is not None:
            with operation("all_reduce (expert gradient norm)"):
                dist.all_reduce(total, group=parallel.ep_group)
        expert_sq += total
    norm = math.sqrt(shared_sq + float(expert_sq))
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(scale)
    return norm
