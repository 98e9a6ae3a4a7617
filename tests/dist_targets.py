"""Launch targets for tests/test_parallel.py (ranks import them by module name)."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from moelab.parallel import report


def hello(x):
    t = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(t)
    print(f"hello from rank {dist.get_rank()}")
    report(step=1, total=float(t))
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "total": float(t), "x": x,
            "pid": os.getpid()}


def fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("rank one exploded on purpose")
    time.sleep(120)  # the others would wait forever; launch must end them


def hang_in_collective():
    from moelab.parallel.tracing import operation

    if dist.get_rank() == 0:
        with operation("all_reduce (test)"):
            dist.all_reduce(torch.ones(1))
    time.sleep(120)


def bad_ep_size():
    from moelab import MoE
    from moelab.parallel import parallelize

    return parallelize(MoE(8, 16, 4), ep_size=3)


def mismatched_layers():
    from moelab import MoE
    from moelab.parallel import parallelize

    return parallelize(MoE(8, 16 + dist.get_rank(), 4), ep_size=2)


def tp_coordinated_dropless():
    from moelab import MoE
    from moelab.parallel import parallelize

    return parallelize(MoE(8, 16, 4, drop_tokens=False), ep_size=1,
                       exchange="tp_coordinated", tp_size=2)
