"""Expert-parallel (EP) and expert-data-parallel (EDP) process groups.

Layout "experts first", as DeepSpeed's default (E + D): with world size W and ep_size P, the EP
groups are contiguous blocks of P ranks (each block holds every expert once, E/P per rank) and
the EDP groups are strided: the ranks that hold the same experts, one per block, which average
those experts' gradients. Example, W=8, P=4: EP [0,1,2,3], [4,5,6,7]; EDP [0,4], [1,5], [2,6],
[3,7]. Non-expert parameters are data-parallel over all W ranks.

PR-MoE layers have different expert counts, and the best EP degree is one expert per rank, so
each distinct ep_size gets its own group set (§4.1.3, "multi-expert and multi-data parallelism").
Everything is validated before any collective runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


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
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size must be an integer >= 1; got {ep_size!r}")
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


@dataclass(frozen=True)
class ExpertGroups:
    """This rank's process groups for one ep_size."""

    layout: ParallelLayout
    ep_group: object  # dist.ProcessGroup
    edp_group: object  # dist.ProcessGroup
    rank: int

    @property
    def ep_size(self) -> int:
        return self.layout.ep_size

    @property
    def ep_rank(self) -> int:
        return self.layout.ep_rank(self.rank)


_GROUPS: dict[int, ExpertGroups] = {}


def expert_groups(ep_size: int, num_experts: int | None = None) -> ExpertGroups:
    """The groups for ep_size, created on first use (every rank must ask for the same ep_sizes
    in the same order: group creation is itself collective)."""
    if not dist.is_initialized():
        raise RuntimeError("expert parallelism needs an initialised process group: run inside "
                           "moelab.dist.launch(...) or call torch.distributed.init_process_group")
    world, rank = dist.get_world_size(), dist.get_rank()
    check_ep_size(world, ep_size, num_experts)
    if ep_size not in _GROUPS:
        layout = parallel_layout(world, ep_size)
        mine = {}
        # new_group must be called by every rank for every group, in the same order
        for kind, groups in (("ep", layout.ep_groups), ("edp", layout.edp_groups)):
            for ranks in groups:
                group = dist.new_group(list(ranks))
                if rank in ranks:
                    mine[kind] = group
        _GROUPS[ep_size] = ExpertGroups(layout, mine["ep"], mine["edp"], rank)
    return _GROUPS[ep_size]


def reset_groups() -> None:
    """Forget cached groups (after destroy_process_group)."""
    _GROUPS.clear()
