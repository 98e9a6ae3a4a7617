"""Launch a multi-process run from a notebook cell.

``launch("mypkg.module:function", nprocs=4)`` starts one worker process per rank
(`moelab.parallel.worker`); the process group's store lives here, in the launcher, so there is no
port to pick or to race for. Every worker initialises the process group, calls the function,
and sends its return value back. While it runs, each rank's output is streamed into the cell with
a ``[rank r]`` prefix, and ``report(**metrics)`` calls in the ranks reach ``on_metric`` in the
notebook (for live views). (Across machines, torchrun starts the same worker: `torchrun_command`.)

Fail fast, and name the cause. The launcher watches every rank (every 50 ms). When one fails,
the others get a moment to report what they saw, then every rank is stopped (none is left) and
`launch` raises `RankError` naming the root cause (see `moelab.parallel.diagnosis`): the rank
that died (with its signal or exit code), the rank that never arrived at a collective the others
timed out in, or the rank that raised first, then a line per other rank. Two limits:

- ``collective_timeout`` (default 15 s): how long a rank waits inside any one collective for the
  others. A rank that stops (a hang, a deadlock, a breakpoint, a rank that took another branch)
  surfaces within that, named. It is short on purpose: the ranks' start-up (torch's import,
  seconds per rank on a busy laptop) is not counted, only waits after every rank has arrived at
  the first barrier. If one rank legitimately works alone that long while the others wait
  (rank-0-only evaluation), raise it.
- ``timeout`` (default 600 s): the whole run, start-up included.

The run's folder (spec, results, errors, logs, each rank's state) is a temporary directory,
removed when the run succeeds and kept, and named in the error, when it fails.

Why a function typed into a notebook cannot be the target: the ranks are fresh Python processes
that import the target by its module and name. A function defined in a cell lives in the
kernel's ``__main__``, which the ranks cannot import (and pickling a function only stores that
name). Put it in a module, or run the cell itself as the ranks' script with the cell magic
``%%launch -n 4`` (``%load_ext moelab.parallel`` first).
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..config import check_int, check_number
from . import rundir
from .diagnosis import diagnose, read_records
from .rundir import METRIC_PREFIX, STORE_PORT_ENV

BACKENDS = ("auto", "gloo", "nccl")
POLL_S = 0.05  # how often the launcher looks at the ranks
GRACE_S = 3.0  # after a failure, how long the other ranks get to report what they saw
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_COLLECTIVE_TIMEOUT_S = 15.0


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
                     master_addr: str = "MASTER_HOST", master_port: int = 29500,
                     collective_timeout: float = 300.0) -> str:
    """The command to run on every node for a multi-node job (node_rank 0..nnodes-1)."""
    target = _resolve_target(target)
    return (f"torchrun --nnodes={nnodes} --nproc-per-node={nproc_per_node} "
            f"--node-rank=$NODE_RANK --master-addr={master_addr} --master-port={master_port} "
            f"-m moelab.parallel.worker --target {shlex.quote(target)} "
            f"--collective-timeout {collective_timeout:g}")


def launch(target, nprocs: int = 2, backend: str = "auto", args: tuple = (),
           kwargs: dict | None = None, timeout: float = DEFAULT_TIMEOUT_S,
           collective_timeout: float | None = None,
           on_metric: Callable[[int, dict], None] | None = None, quiet: bool = False,
           env: dict | None = None) -> list:
    """Run ``target(*args, **kwargs)`` on ``nprocs`` ranks; return each rank's result.

    Args:
        target: "module:function", or an importable function (not one typed in a notebook).
        nprocs: ranks on this machine (CPU ranks may outnumber cores; they take turns).
        backend: "auto" (nccl with >= nprocs GPUs, else gloo), "gloo" or "nccl".
        timeout: seconds for the whole run, start-up included.
        collective_timeout: seconds a rank waits in any one collective for the others (see the
            module docstring); None = 15 s, or ``timeout`` if that is shorter.
        on_metric: called as on_metric(rank, record) for every ``report(**record)`` in a rank.
        quiet: do not print the ranks' output (it is still in the error on failure).
        env: extra environment variables for the ranks.
    Raises RankError when a rank fails (see the module docstring).
    """
    nprocs = check_int("nprocs", nprocs)
    timeout = check_number("timeout (seconds)", timeout, above=0)
    if collective_timeout is None:
        collective_timeout = min(DEFAULT_COLLECTIVE_TIMEOUT_S, timeout)
    collective_timeout = check_number("collective_timeout (seconds)", collective_timeout,
                                      above=0, high=timeout)
    target = _resolve_target(target) if not isinstance(target, _Script) else target
    backend = choose_backend(backend, nprocs)
    args, kwargs = tuple(args), dict(kwargs or {})
    _check_sendable(args, kwargs)
    spec = {"backend": backend, "timeout": timeout, "collective_timeout": collective_timeout,
            "args": args, "kwargs": kwargs}
    return _Run(target, nprocs, spec, on_metric, quiet, env).run()


def _check_sendable(args: tuple, kwargs: dict) -> None:
    """The ranks get args and kwargs by pickle: say which one cannot be sent, and why."""
    named = [(f"args[{i}]", value) for i, value in enumerate(args)]
    named += [(f"kwargs[{key!r}]", value) for key, value in kwargs.items()]
    for name, value in named:
        try:
            pickle.dumps(value)
        except Exception as error:  # pickle raises many types (PicklingError, TypeError, ...)
            raise ValueError(
                f"{name} ({type(value).__name__}) cannot be sent to the ranks: {error}. The "
                "ranks are new processes and get their arguments pickled; pass plain data "
                "(numbers, strings, lists, dicts, tensors) and build the rest inside the "
                "target") from None


class _Script(str):
    """Source code to run as the ranks' script (the %%launch cell magic)."""


class _Run:
    """One launch: the ranks' processes, their output, and what they left in the run folder."""

    def __init__(self, target, nprocs: int, spec: dict, on_metric, quiet: bool,
                 env: dict | None) -> None:
        self.target, self.nprocs, self.spec = target, nprocs, spec
        self.on_metric, self.quiet, self.env = on_metric, quiet, env or {}
        self.logs: dict[int, list[str]] = {rank: [] for rank in range(nprocs)}
        self.exits: dict[int, tuple[int | None, float | None]] = {}

    def run(self) -> list:
        import torch.distributed as dist

        run_dir = Path(tempfile.mkdtemp(prefix="moelab-launch-"))
        timeout = self.spec["timeout"]
        store = dist.TCPStore("127.0.0.1", 0, self.nprocs + 1, is_master=True,
                              timeout=datetime.timedelta(seconds=timeout),
                              wait_for_workers=False)
        processes: list[subprocess.Popen] = []
        readers: list[threading.Thread] = []
        failed = False
        try:
            spec = dict(self.spec)
            if isinstance(self.target, _Script):
                (run_dir / "script.py").write_text(str(self.target))
                spec["script"] = str(run_dir / "script.py")
            else:
                spec["target"] = self.target
            with open(rundir.spec(run_dir), "wb") as f:
                pickle.dump(spec, f)
            for rank in range(self.nprocs):
                process = self._start(rank, run_dir, store.port)
                processes.append(process)
                reader = threading.Thread(target=self._pump, args=(rank, process), daemon=True)
                reader.start()
                readers.append(reader)
            failed = not self._watch(processes, run_dir, time.monotonic() + timeout)
        finally:
            self._stop(processes, run_dir)
            for reader in readers:
                reader.join(timeout=5)
            del store
        if failed:  # the whole-run limit
            last = "".join(line for rank in self.logs for line in self.logs[rank][-5:])
            raise TimeoutError(f"launch: the run did not finish within timeout={timeout:g} s and "
                               f"was stopped (its logs are kept in {run_dir}); last output:\n"
                               f"{last}")
        error = diagnose(read_records(run_dir, self.nprocs, self.exits, self.logs), run_dir)
        if error is not None:
            raise error
        results = []
        for rank in range(self.nprocs):
            with open(rundir.result(run_dir, rank), "rb") as f:
                results.append(pickle.load(f))
        shutil.rmtree(run_dir, ignore_errors=True)
        return results

    def _start(self, rank: int, run_dir: Path, port: int) -> subprocess.Popen:
        threads = os.environ.get("OMP_NUM_THREADS",
                                 str(max(1, (os.cpu_count() or 1) // self.nprocs)))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads,
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(self.nprocs),
               "LOCAL_WORLD_SIZE": str(self.nprocs), "MASTER_ADDR": "127.0.0.1",
               STORE_PORT_ENV: str(port), **self.env}
        return subprocess.Popen(
            [sys.executable, "-m", "moelab.parallel.worker", "--run-dir", str(run_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
            start_new_session=True)

    def _watch(self, processes, run_dir: Path, deadline: float) -> bool:
        """Wait for every rank to finish; stop at the first failure (after a short grace for
        the others to report). False when the whole-run deadline passed."""
        failed_at = None
        while True:
            for rank, process in enumerate(processes):
                if rank not in self.exits and process.poll() is not None:
                    self.exits[rank] = (process.returncode, time.time())
                    ok = process.returncode == 0 and rundir.result(run_dir, rank).exists()
                    if not ok and failed_at is None:
                        failed_at = time.monotonic()
            if len(self.exits) == len(processes):
                return True
            if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)

    def _stop(self, processes, run_dir: Path) -> None:
        """Stop every rank still running; first ask each for its Python stack (SIGUSR1, which
        the worker's faulthandler answers even from inside a blocked collective)."""
        running = [(rank, p) for rank, p in enumerate(processes) if p.poll() is None]
        if not running:
            return
        for _, process in running:
            _signal(process, signal.SIGUSR1)
        time.sleep(0.3)
        for _, process in running:
            _signal(process, signal.SIGTERM)
        for rank, process in running:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _signal(process, signal.SIGKILL)
                process.wait()
            self.exits.setdefault(rank, (None, None))  # stopped by the launcher

    def _pump(self, rank: int, process) -> None:
        """Copy a rank's output into this process, turning metric lines into callbacks."""
        for line in process.stdout:
            marker = line.find(METRIC_PREFIX)
            if marker >= 0:
                payload = json.loads(line[marker + len(METRIC_PREFIX):])
                if self.on_metric is not None:
                    self.on_metric(payload.pop("rank"), payload)
                continue
            self.logs[rank].append(line)
            if not self.quiet:
                sys.stdout.write(line)
                sys.stdout.flush()


def _signal(process, number) -> None:
    try:
        os.killpg(process.pid, number)
    except ProcessLookupError:
        pass


def report(**metrics) -> None:
    """From inside a rank: send one metrics record to the notebook's on_metric callback."""
    rank = int(os.environ.get("RANK", "0"))
    print(METRIC_PREFIX + json.dumps({"rank": rank, **metrics}), flush=True)


def load_ipython_extension(ipython) -> None:
    """``%load_ext moelab.parallel`` registers the ``%%launch`` cell magic:
    ``%%launch -n 4 [--backend gloo] [--timeout 600] [--collective-timeout 15]`` runs the cell's
    code on every rank
    (the process group is already initialised; a variable named ``result`` is returned)."""
    from IPython.core.magic import register_cell_magic

    @register_cell_magic("launch")
    def launch_magic(line, cell):
        import argparse

        parser = argparse.ArgumentParser(prog="%%launch")
        parser.add_argument("-n", "--nprocs", type=int, default=2)
        parser.add_argument("--backend", default="auto")
        parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
        parser.add_argument("--collective-timeout", type=float,
                            default=DEFAULT_COLLECTIVE_TIMEOUT_S)
        options = parser.parse_args(shlex.split(line))
        return launch(_Script(cell), nprocs=options.nprocs, backend=options.backend,
                      timeout=options.timeout, collective_timeout=options.collective_timeout)
