"""moelab.parallel: expert parallelism over torch.distributed (gloo on CPUs, NCCL on GPUs).

From a notebook cell, ``launch(target, nprocs)`` runs ``target`` on every rank (torch elastic
underneath) and returns what each rank returned. Inside a rank, ``parallelize(model,
ParallelConfig(ep_size=...))`` spreads every MoE layer's experts over the ranks and installs the
token exchange; `sync_gradients` and `clip_grad_norm_` train it data-parallel, and
`full_state_dict` / `load_full_state_dict` save and load checkpoints that fit any ep_size.

    from moelab.parallel import launch, parallelize, ParallelConfig

The launch targets the notebooks and tests use live in `moelab.examples`.
"""

from .diagnosis import RankError
from .expert_parallel import ExpertParallel, ParallelConfig, parallelize
from .groups import ParallelLayout, parallel_layout
from .launcher import launch, load_ipython_extension, report, torchrun_command
from .sharding import full_state_dict, load_full_state_dict
from .training import (
    clip_grad_norm_,
    sync_expert_gradients,
    sync_gradients,
    sync_shared_gradients,
)

__all__ = [
    "launch", "report", "RankError", "load_ipython_extension", "torchrun_command",
    "parallelize", "ParallelConfig", "ExpertParallel", "ParallelLayout", "parallel_layout",
    "full_state_dict", "load_full_state_dict", "sync_gradients", "sync_shared_gradients",
    "sync_expert_gradients", "clip_grad_norm_",
]
