"""Launch a multi-process run from a notebook cell, through torch's own launcher.

``launch("mypkg.module:function", nprocs=4)`` starts ``python -m torch.distributed.run`` (torch
elastic) with one worker per rank. Every worker initialises the process group, calls the function,
and sends its return value back. While it runs, each rank's output is streamed into the cell with
a ``[rank r]`` prefix, and ``report(**metrics)`` calls in the ranks reach ``on_metric`` in the
notebook (for live views).

Fail fast: when a rank raises, torch elastic ends every other rank (it watches the workers every
0.1 s here), and `launch` raises `RankError` with the first traceback. A rank stuck in a
collective ends at ``timeout`` with a message naming the moelab operation it was in.

Why a function typed into a notebook cannot be the target: the ranks are fresh Python processes
that import the target by its module and name. A function defined in a cell lives in the
kernel's ``__main__``, which the ranks cannot import (and pickling a function only stores that
name). Put it in a module, or run the cell itself as the ranks' script with the cell magic
``%%launch -n 4`` (``%load_ext moelab.parallel`` first).
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..config import check_int

METRIC_PREFIX = "@@moelab-metric "
BACKENDS = ("auto", "gloo", "nccl")


class RankError(RuntimeError):
    """A rank raised; the message holds its traceback."""

    def __init__(self, rank: int, traceback_text: str) -> None:
        super().__init__(f"rank {rank} failed:\n{traceback_text}")
        self.rank, self.traceback_text = rank, traceback_text


def _resolve_target(target) -> str:
    """'module:function' for a string or an importable function; clear errors otherwise."""
    if callable(target):
        module, name = getattr(target, "__module__", None), getattr(target, "__qualname__", "")
        if module in (None, "__main__") or "<" in name or "." in name:
            raise ValueError(
                f"target {name or target!r} is defined in the notebook (module {module!r}) or is "
                "a lambda/nested function; the ranks are new processes that import their target "
                "by module and name, so they cannot see it. Move it into a .py module, or use "
                "the %%launch cell magic to run the cell itself on every rank.")
        target = f"{module}:{name}"
    if not isinstance(target, str) or target.count(":") != 1:
        raise ValueError(f"target must be 'module:function' or an importable function; "
                         f"got {target!r}")
    module_name, function_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"target module {module_name!r} cannot be imported: {error}") from None
    if not callable(getattr(module, function_name, None)):
        raise ValueError(f"module {module_name!r} has no function {function_name!r}")
    return target


def choose_backend(backend: str, nprocs: int) -> str:
    """'auto' = nccl when there are at least nprocs GPUs, else gloo."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "auto":
        return "nccl" if gpus >= nprocs else "gloo"
    if backend == "nccl" and gpus < nprocs:
        raise ValueError(f"backend='nccl' needs one GPU per rank: nprocs={nprocs} but "
                         f"{gpus} GPU(s) are visible; use backend='gloo' or fewer ranks")
    return backend


def torchrun_command(target: str, nnodes: int, nproc_per_node: int,
                     master_addr: str = "MASTER_HOST", master_port: int = 29500) -> str:
    """The command to run on every node for a multi-node job (node_rank 0..nnodes-1)."""
    target = _resolve_target(target)
    return (f"torchrun --nnodes={nnodes} --nproc-per-node={nproc_per_node} "
            f"--node-rank=$NODE_RANK --master-addr={master_addr} --master-port={master_port} "
            f"-m moelab.parallel.worker --target {shlex.quote(target)}")


def launch(target, nprocs: int = 2, backend: str = "auto", args: tuple = (),
           kwargs: dict | None = None, timeout: float = 120.0,
           on_metric: Callable[[int, dict], None] | None = None, quiet: bool = False,
           env: dict | None = None) -> list:
    """Run ``target(*args, **kwargs)`` on ``nprocs`` ranks; return each rank's result.

    Args:
        target: "module:function", or an importable function (not one typed in a notebook).
        nprocs: ranks on this machine (CPU ranks may outnumber cores; they take turns).
        backend: "auto" (nccl with >= nprocs GPUs, else gloo), "gloo" or "nccl".
        timeout: seconds for the whole run and for any single collective.
        on_metric: called as on_metric(rank, record) for every ``report(**record)`` in a rank.
        quiet: do not print the ranks' output (it is still returned on failure).
    """
    nprocs = check_int("nprocs", nprocs)
    if not timeout or timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds; got {timeout!r}")
    target = _resolve_target(target) if not isinstance(target, _Script) else target
    backend = choose_backend(backend, nprocs)
    return _run(target, nprocs, backend, args, kwargs or {}, timeout, on_metric, quiet, env)


class _Script(str):
    """Source code to run as the ranks' script (the %%launch cell magic)."""


def _run(target, nprocs, backend, args, kwargs, timeout, on_metric, quiet, env) -> list:
    with tempfile.TemporaryDirectory(prefix="moelab-launch-") as tmp:
        run_dir = Path(tmp)
        spec = {"backend": backend, "timeout": timeout, "args": args, "kwargs": kwargs}
        if isinstance(target, _Script):
            (run_dir / "script.py").write_text(str(target))
            spec["script"] = str(run_dir / "script.py")
        else:
            spec["target"] = target
        with open(run_dir / "spec.pkl", "wb") as f:
            pickle.dump(spec, f)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={nprocs}", "--max-restarts=0", "--monitor-interval=0.1",
                   "-m", "moelab.parallel.worker", "--run-dir", str(run_dir)]
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS":
                     os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1)
                                                               // nprocs))),
                     **(env or {})}
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, bufsize=1, env=child_env,
                                   start_new_session=True)
        lines: list[str] = []
        reader = threading.Thread(target=_pump, args=(process, lines, on_metric, quiet),
                                  daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout + 15  # ranks time out first; then we stop them
        try:
            while process.poll() is None:
                if time.monotonic() > deadline:
                    _kill(process)
                    raise TimeoutError(
                        f"launch: the run did not finish within timeout={timeout}s and was "
                        f"stopped; last output:\n" + "".join(lines[-20:]))
                time.sleep(0.05)
        finally:
            if process.poll() is None:
                _kill(process)
            reader.join(timeout=5)
        errors = sorted(run_dir.glob("error_*.json"))
        if errors:
            first = min((json.loads(p.read_text()) for p in errors), key=lambda e: e["time"])
            raise RankError(first["rank"], first["traceback"])
        if process.returncode != 0:
            raise RuntimeError(f"launch: torch.distributed.run exited with code "
                               f"{process.returncode}; output:\n" + "".join(lines[-40:]))
        results = []
        for rank in range(nprocs):
            with open(run_dir / f"result_{rank}.pkl", "rb") as f:
                results.append(pickle.load(f))
        return results


def _pump(process, lines, on_metric, quiet) -> None:
    """Copy the ranks' output into this process, turning metric lines into callbacks."""
    for line in process.stdout:
        marker = line.find(METRIC_PREFIX)
        if marker >= 0:
            payload = json.loads(line[marker + len(METRIC_PREFIX):])
            if on_metric is not None:
                on_metric(payload.pop("rank"), payload)
            continue
        lines.append(line)
        # The ranks' lines carry "[rank r]"; torch elastic's own report of a failure does not,
        # and launch raises the rank's traceback itself.
        if not quiet and line.startswith("[rank "):
            sys.stdout.write(line)
            sys.stdout.flush()


def _kill(process) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def report(**metrics) -> None:
    """From inside a rank: send one metrics record to the notebook's on_metric callback."""
    rank = int(os.environ.get("RANK", "0"))
    print(METRIC_PREFIX + json.dumps({"rank": rank, **metrics}), flush=True)


def load_ipython_extension(ipython) -> None:
    """``%load_ext moelab.parallel`` registers the ``%%launch`` cell magic:
    ``%%launch -n 4 [--backend gloo] [--timeout 120]`` runs the cell's code on every rank
    (the process group is already initialised; a variable named ``result`` is returned)."""
    from IPython.core.magic import register_cell_magic

    @register_cell_magic("launch")
    def launch_magic(line, cell):
        import argparse

        parser = argparse.ArgumentParser(prog="%%launch")
        parser.add_argument("-n", "--nprocs", type=int, default=2)
        parser.add_argument("--backend", default="auto")
        parser.add_argument("--timeout", type=float, default=120.0)
        options = parser.parse_args(shlex.split(line))
        return launch(_Script(cell), nprocs=options.nprocs, backend=options.backend,
                      timeout=options.timeout)
