"""Expert-parallel (EP) and expert-data-parallel (EDP) layouts, and the groups moelab creates.

Layout "experts first", as DeepSpeed's default (E + D): with world size W and ep_size P, the EP
groups are contiguous blocks of P ranks (each block holds every expert once, E/P per rank) and
the EDP groups are strided: the ranks that hold the same experts, one per block, which average
those experts' gradients. Example, W=8, P=4: EP [0,1,2,3], [4,5,6,7]; EDP [0,4], [1,5], [2,6],
[3,7]. Non-expert parameters are data-parallel over all W ranks.

Every process group moelab makes goes through `new_group`, which gives it the run's collective
timeout (`collective_timeout`): a group made with torch's ``new_group(ranks)`` alone waits 30
minutes, whatever the default group's timeout.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch.distributed as dist

from ..config import check_int

#: The environment variable `moelab.parallel.launch` sets on every rank: seconds a collective
#: may wait before it fails.
TIMEOUT_ENV = "MOELAB_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ParallelLayout:
    """Which ranks form which groups, for one (world_size, ep_size). Pure data, no collectives."""

    world_size: int
    ep_size: int
    ep_groups: tuple[tuple[int, ...], ...]
    edp_groups: tuple[tuple[int, ...], ...]

    def ep_rank(self, rank: int) -> int:
        return rank % self.ep_size

    def ep_group_of(self, rank: int) -> tuple[int, ...]:
        return self.ep_groups[rank // self.ep_size]

    def edp_group_of(self, rank: int) -> tuple[int, ...]:
        return self.edp_groups[rank % self.ep_size]

    def local_experts(self, rank: int, num_experts: int) -> range:
        """Global ids of the experts this rank holds: [ep_rank·E/P, (ep_rank+1)·E/P)."""
        per_rank = num_experts // self.ep_size
        start = self.ep_rank(rank) * per_rank
        return range(start, start + per_rank)


def check_ep_size(world_size: int, ep_size: int, num_experts: int | None = None) -> None:
    check_int("ep_size", ep_size)
    if world_size % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the world size {world_size}; choose "
                         f"one of {[d for d in range(1, world_size + 1) if world_size % d == 0]}")
    if num_experts is not None and num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide num_experts={num_experts} so every "
                         f"rank holds the same number of experts")


def parallel_layout(world_size: int, ep_size: int, num_experts: int | None = None
                    ) -> ParallelLayout:
    """The experts-first layout (DeepSpeed's E + D) for a world size and an ep_size."""
    check_ep_size(world_size, ep_size, num_experts)
    ep_groups = tuple(tuple(range(start, start + ep_size))
                      for start in range(0, world_size, ep_size))
    edp_groups = tuple(tuple(range(offset, world_size, ep_size)) for offset in range(ep_size))
    return ParallelLayout(world_size, ep_size, ep_groups, edp_groups)


def collective_timeout(seconds: float | None = None) -> datetime.timedelta:
    """The timeout of moelab's groups: ``seconds`` if given, else the run's (the environment
    variable `launch` sets), else DEFAULT_TIMEOUT_S."""
    if seconds is None:
        seconds = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    return datetime.timedelta(seconds=seconds)


def new_group(ranks, timeout: float | None = None):
    """``dist.new_group(ranks)`` with the run's collective timeout (every rank must call it for
    every group, in the same order: group creation is itself collective)."""
    return dist.new_group(list(ranks), timeout=collective_timeout(timeout))
