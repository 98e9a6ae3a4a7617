"""Routing: the token-to-expert mapping table that every stage after the gate reads.

The paper's inference path is built on "a dense token-to-expert mapping table" (§5.4) rather
than the one-hot [S, E, C] masks of DeepSpeed's training code. `Routing` is that table (chosen
expert, buffer slot and combine weight per token and choice) plus what the losses and the views
need; `moelab.router.route` makes one from gate logits. This module also holds the arithmetic
of the table: the capacity formula, counts per expert, and a route's rank within its expert.

When work happens. ``load``, ``offsets`` and ``row`` are computed on first use and kept on the
Routing (dispatch, the experts and the combine all read them). ``aux_loss`` and ``z_loss`` may
be handed over as functions that run on first read, when no gradient needs them: serving never
reads them, and at a few hundred tokens their ~10 small ops are a fifth of routing's cost.
Any code that reads a field gets the tensor.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class computed_once:
    """A property computed on first use and then kept on the instance (its value shadows the
    descriptor): functools.cached_property without its lock (Python 3.11's takes an RLock,
    which torch.compile cannot trace)."""

    def __init__(self, compute):
        self.compute, self.name, self.__doc__ = compute, compute.__name__, compute.__doc__

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.compute(instance)  # shadows this descriptor
        return value


class DeferredField:
    """A dataclass field holding a tensor, or a function that computes it on first read (the
    routing losses; see the module docstring). Readers always get the tensor."""

    def __set_name__(self, owner, name):
        self.name, self.stored = name, "_" + name

    def __get__(self, instance, owner=None):
        if instance is None:  # what dataclass asks for a default: there is none
            raise AttributeError(self.name)
        value = instance.__dict__[self.stored]
        if not isinstance(value, Tensor):
            value = instance.__dict__[self.stored] = value()
        return value

    def __set__(self, instance, value):
        instance.__dict__[self.stored] = value


def deferred(compute, *inputs):
    """``compute(*inputs)`` now when autograd needs its graph (a tensor input requires grad, or
    torch.compile is tracing), else a function that computes it on first read. Inputs that are
    not tensors (a sequence length) pass through."""
    needs_graph = any(isinstance(t, Tensor) and t.requires_grad for t in inputs)
    if torch.compiler.is_compiling() or needs_graph:
        return compute(*inputs)
    return functools.partial(compute, *inputs)


@dataclass
class Routing:
    """The token-to-expert mapping table, plus what the losses and views need.

    For token s and its j-th choice: ``expert[s, j]`` is the chosen expert, ``slot[s, j]`` its
    position in that expert's buffer (-1 when the route was dropped) and ``weight[s, j]`` the
    combine weight (0 for dropped routes). ``counts`` are the routes each expert was asked for,
    before any dropping (DeepSpeed's ``exp_counts``).

    With expert-choice routing (``expert_choice=True``) the table has one column per expert
    (``expert[s, j] == j``) and ``slot[s, j] >= 0`` where expert j picked token s.
    """

    expert: Tensor  # [S, k] long: chosen expert per token and choice
    weight: Tensor  # [S, k] float: combine weight, 0 where dropped
    slot: Tensor  # [S, k] long: position inside the expert's buffer, -1 where dropped
    capacity: int | None  # slots per expert; None = dropless
    probs: Tensor  # [S, E] float: router probabilities softmax(logits)
    counts: Tensor  # [E] long: routes asked of each expert, before dropping
    # 0-dim: the load-balancing loss l_aux, and the router z-loss (ST-MoE),
    # mean(logsumexp(logits)^2); either may be given as a function, run on first read
    aux_loss: Tensor = DeferredField()
    z_loss: Tensor = DeferredField()
    expert_choice: bool = False

    @property
    def num_tokens(self) -> int:
        return self.expert.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[1]

    @property
    def k(self) -> int:
        return self.expert.shape[1]

    @property
    def kept(self) -> Tensor:
        """[S, k] bool: routes that reach their expert."""
        return self.slot >= 0

    # load, offsets and row are computed once per Routing, on first use (dispatch, the experts
    # and combine each read them): treat the tensors they return as read-only.

    @computed_once
    def load(self) -> Tensor:
        """[E] long: routes each expert actually processes (after dropping)."""
        if self.capacity is None and not self.expert_choice:
            return self.counts  # dropless: every route asked for is kept
        # kept flags counted per expert (no selection whose size depends on the data)
        return count_per_expert(self.expert.reshape(-1).clamp_min(0), self.num_experts,
                                self.kept.reshape(-1))

    @computed_once
    def offsets(self) -> Tensor:
        """[E + 1] long: where each expert's rows start in the packed (dropless) layout; expert e
        owns rows offsets[e]:offsets[e + 1]."""
        return F.pad(torch.cumsum(self.load, 0), (1, 0))

    @computed_once
    def row(self) -> Tensor:
        """[S, k] long: each route's row in the flattened dispatch buffer, -1 where dropped:
        e·C + slot in the capacity layout, offsets[e] + slot in the packed one."""
        if self.capacity is not None:
            start = self.expert * self.capacity
        else:
            start = self.offsets[self.expert]
            if not self.expert_choice:  # dropless: every slot is >= 0
                return start + self.slot
        return torch.where(self.kept, start + self.slot, -1)

    @property
    def buffer_rows(self) -> int:
        """Rows per expert in the dispatched buffer: C, or the largest load when dropless."""
        if self.capacity is not None:
            return self.capacity
        return int(self.load.max().item()) if self.num_tokens else 0

    @property
    def drop_fraction(self) -> float:
        """Fraction of requested routes that were dropped (for expert choice: of tokens that no
        expert picked); 0 without tokens."""
        if self.num_tokens == 0:
            return 0.0
        if self.expert_choice:
            return float((~self.kept.any(dim=1)).float().mean().item())
        return float((~self.kept).float().mean().item())

    def __repr__(self) -> str:
        capacity = "dropless" if self.capacity is None else f"capacity={self.capacity}"
        kind = ", expert choice" if self.expert_choice else ""
        return (f"Routing(tokens={self.num_tokens}, experts={self.num_experts}, k={self.k}, "
                f"{capacity}{kind}, counts={self.counts.tolist()}, "
                f"dropped={self.drop_fraction:.1%}, "
                f"aux_loss={float(self.aux_loss.detach()):.4f}, "
                f"z_loss={float(self.z_loss.detach()):.4f})")

    def detach(self) -> Routing:
        """A copy holding no autograd graph (for views and metric histories)."""
        return Routing(
            expert=self.expert, weight=self.weight.detach(), slot=self.slot,
            capacity=self.capacity, probs=self.probs.detach(), counts=self.counts,
            aux_loss=self.aux_loss.detach(), z_loss=self.z_loss.detach(),
            expert_choice=self.expert_choice,
        )


def expert_capacity(
    num_tokens: int, num_experts: int, capacity_factor: float, k: int = 1, min_capacity: int = 4
) -> int:
    """Slots per expert: C = max(ceil(S / E · cf · k), min_capacity).

    S is the number of tokens *routed together*: under expert parallelism each rank computes its
    own C from its own token count (as DeepSpeed does), so ranks with more tokens give every
    expert more slots.

    DeepSpeed evaluates ``ceil((S / E) * cf)`` on a float32 tensor (``_capacity``); doing the same
    float32 arithmetic here keeps C identical at the rounding edges (e.g. S/E · cf = 4.0000001).
    """
    scaled = np.float32(num_tokens / num_experts) * np.float32(capacity_factor * k)
    return max(int(math.ceil(scaled)), int(min_capacity))


def count_per_expert(expert: Tensor, num_experts: int, weight: Tensor | None = None) -> Tensor:
    """[R] expert ids -> [E] long counts (of ``weight``'s 0/1 entries when given). A scatter-add
    into E zeros: unlike ``bincount``, whose output size depends on the largest id, it never waits
    for the device, so routing can run inside a captured CUDA graph."""
    ones = torch.ones_like(expert) if weight is None else weight.long()
    return torch.zeros(num_experts, dtype=torch.long, device=expert.device).scatter_add_(
        0, expert, ones)


#: Up to this many one-hot cells (routes × groups) the rank is a prefix count over the one-hot
#: mask; above it, a stable sort (on 2 CPU cores the one-hot count is ~1.6x faster at 1024 × 9
#: cells and ~4x slower at 8192 × 33).
ONE_HOT_RANK_MAX_CELLS = 1 << 16


def rank_within_expert(expert: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """[R] -> ([R] rank, [E + 1] counts): the rank of each route among the routes of its expert,
    in the given order, and the routes per expert.

    expert == num_experts marks routes that take no rank (they get ranks in an ignored group,
    counted last). This is the per-expert prefix count, DeepSpeed's ``cumsum(mask) - 1``: over
    the [R, E + 1] one-hot mask when that is small, else with one stable sort (no R·E work).
    """
    groups = num_experts + 1
    if expert.numel() == 0:  # no routes (a rank without tokens): no ranks, zero counts
        return torch.empty_like(expert), expert.new_zeros(groups)
    if expert.numel() * groups <= ONE_HOT_RANK_MAX_CELLS:
        # mask[r, e] = 1 if route r goes to e (a scatter: unlike F.one_hot, no device wait)
        column = expert[:, None]  # [R, 1]
        mask = torch.zeros(expert.numel(), groups, dtype=torch.long, device=expert.device)
        prefix = mask.scatter_(1, column, 1).cumsum(0)  # [R, E + 1]
        # rank_r = sum_{r' <= r} mask[r', e_r] - 1; the last prefix row counts every route
        rank = prefix.gather(1, column).view(-1).sub_(1)
        return rank, prefix[-1]  # (a view: the prefix is at most 64K cells)
    order = torch.argsort(expert, stable=True)  # routes grouped by expert, original order inside
    counts = count_per_expert(expert, groups)  # [E + 1]
    starts = torch.cumsum(counts, 0) - counts  # [E + 1]: first sorted position of each expert
    rank = torch.empty_like(expert)
    rank[order] = torch.arange(expert.numel(), device=expert.device) - starts[expert[order]]
    return rank, counts
