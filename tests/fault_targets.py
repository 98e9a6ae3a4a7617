"""Launch targets that inject one fault each, for tests/test_faults.py.

Every target first writes its PID to ``pid_<rank>`` in ``marks`` (so the test can check that no
process of the run is left) and, where other ranks wait for the faulty one, the time they
arrived at the collective to ``arrived_<rank>`` (so the test can time the error from there).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moelab import GPT, MoE, preset
from moelab.parallel import (
    full_state_dict,
    load_full_state_dict,
    parallelize,
    sync_expert_gradients,
    sync_shared_gradients,
)
from moelab.parallel.tracing import operation


def _start(marks: str) -> int:
    rank = dist.get_rank()
    (Path(marks) / f"pid_{rank}").write_text(str(os.getpid()))
    return rank


def _arrive(marks: str, rank: int) -> None:
    (Path(marks) / f"arrived_{rank}").write_text(repr(time.time()))


def _warm_up() -> None:
    """A few collectives that succeed, so the fault comes mid-run."""
    for _ in range(3):
        with operation("all_reduce (warm-up)"):
            dist.all_reduce(torch.ones(4))


def raise_after_collectives(marks: str, faulty: int) -> None:
    rank = _start(marks)
    _warm_up()
    if rank == faulty:
        raise ValueError(f"rank {faulty} raised on purpose after three collectives")
    _arrive(marks, rank)
    with operation("all_reduce (after the fault)"):
        dist.all_reduce(torch.ones(4))


def _layer() -> MoE:
    torch.manual_seed(0)
    return parallelize(MoE(8, 16, 2 * dist.get_world_size(), k=2, drop_tokens=False),
                       ep_size=dist.get_world_size())


def stall_in_exchange(marks: str, faulty: int) -> None:
    rank = _start(marks)
    layer = _layer()
    x = torch.randn(6, 8)
    if rank == faulty:
        time.sleep(120)  # never reaches the exchange in time
    _arrive(marks, rank)
    layer(x)


def _gpt(ep_size: int) -> GPT:
    torch.manual_seed(0)
    model = GPT(preset("tiny", block_size=8, d_model=16, n_head=2, experts=4, use_rts=False))
    return parallelize(model, ep_size=ep_size)


def stall_in_expert_gradient_sync(marks: str, faulty: int, ep_size: int) -> None:
    rank = _start(marks)
    model = _gpt(ep_size)
    x = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(rank))
    model(x, x).loss.backward()
    sync_shared_gradients(model)
    if rank == faulty:
        time.sleep(120)
    _arrive(marks, rank)
    sync_expert_gradients(model)


def stall_in_checkpoint_gather(marks: str, faulty: int) -> None:
    rank = _start(marks)
    model = _gpt(dist.get_world_size())
    if rank == faulty:
        time.sleep(120)
    _arrive(marks, rank)
    full_state_dict(model)


def die_while_others_wait(marks: str, faulty: int, how: str) -> None:
    rank = _start(marks)
    _warm_up()
    if rank == faulty:
        time.sleep(0.5)  # the others are inside the collective by now
        (Path(marks) / "died").write_text(repr(time.time()))
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(0)
    _arrive(marks, rank)
    with operation("all_reduce (waiting for the rank that dies)"):
        dist.all_reduce(torch.ones(4))


def exit_after_others_are_done(marks: str, faulty: int) -> dict:
    rank = _start(marks)
    _warm_up()
    if rank == faulty:
        time.sleep(1.0)  # the others have returned their results by now
        (Path(marks) / "died").write_text(repr(time.time()))
        os._exit(0)
    return {"rank": rank}


def zero_tokens_on_one_rank(empty: int, drop_tokens: bool) -> dict:
    """Rank ``empty`` has no tokens; the others' outputs must equal one process's."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    reference = MoE(8, 16, 2 * world, k=2, drop_tokens=drop_tokens, use_rts=False).eval()
    layer = parallelize(MoE(8, 16, 2 * world, k=2, drop_tokens=drop_tokens,
                            use_rts=False).eval(), ep_size=world)
    load_full_state_dict(layer, {"model": reference.state_dict()})  # this rank's slice
    num_tokens = 0 if rank == empty else 5 + rank
    x = torch.randn(num_tokens, 8, generator=torch.Generator().manual_seed(rank))
    x.requires_grad_()
    y, routing = layer(x)
    y.sum().backward()
    with torch.no_grad():
        expected, _ = reference(x)
    return {"rank": rank, "tokens": num_tokens, "shape": tuple(y.shape),
            "error": float((y - expected).abs().max()) if num_tokens else 0.0,
            "grad_shape": tuple(x.grad.shape)}
