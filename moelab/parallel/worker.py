"""One rank of a `launch` (or torchrun) run: init the process group, call the target, report.

Started by `launch` as ``python -m moelab.parallel.worker --run-dir DIR`` (the process group's
store is the launcher's, at MOELAB_STORE_PORT), or by torchrun across machines as ``... --target
module:function`` (env:// rendezvous). Output lines carry a ``[rank r]`` prefix.

Inside a launch every rank leaves in the run's folder (`rundir`) what the launcher needs to tell
what happened: its result, or its error (traceback, the moelab collective it was in, what kind of
error), the collective it is in now, and on SIGUSR1 every thread's Python stack
(faulthandler writes it even while the rank is blocked inside a collective).
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import importlib
import json
import os
import pickle
import runpy
import signal
import sys
import time
import traceback
from pathlib import Path

from . import rundir
from .groups import TIMEOUT_ENV
from .rundir import METRIC_PREFIX, STORE_PORT_ENV
from .tracing import failed_operation, open_state


class _Prefixed:
    """A text stream that writes whole lines, each starting with a prefix (whole lines, so that
    the ranks' lines never interleave mid-line in the shared pipe)."""

    def __init__(self, stream, prefix: str) -> None:
        self.stream, self.prefix, self.pending = stream, prefix, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        if lines:
            self.stream.write("".join(
                (line if line.startswith(METRIC_PREFIX) else self.prefix + line) + "\n"
                for line in lines))
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.write("\n")
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def error_kind(error: BaseException) -> str:
    """"timeout" (a collective gave up waiting: gloo's "Timed out waiting ...ms", NCCL's
    watchdog), "peer_lost" (a peer's connection closed: a consequence of another rank's end) or
    "raised" (anything else: the target's own exception)."""
    text = f"{type(error).__name__}: {error}".lower()
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if any(sign in text for sign in ("connection closed", "connection reset", "broken pipe",
                                     "connection refused")):
        return "peer_lost"
    return "raised"


def _init_process_group(spec: dict, rank: int, world: int) -> None:
    import torch.distributed as dist

    run_timeout = datetime.timedelta(seconds=spec["timeout"])
    port = os.environ.get(STORE_PORT_ENV)
    if port is not None:  # launched by `launch`: the launcher hosts the store
        store = dist.TCPStore("127.0.0.1", int(port), world, is_master=False,
                              timeout=run_timeout)
        dist.init_process_group(spec["backend"], store=store, rank=rank, world_size=world,
                                timeout=run_timeout)
    else:  # torchrun
        dist.init_process_group(spec["backend"], timeout=run_timeout)
    # Every rank has started (the slowest start-up is covered by the run's timeout); from here
    # a collective waits at most the collective timeout for the others.
    dist.barrier()
    collective = datetime.timedelta(seconds=spec["collective_timeout"])
    if hasattr(dist.distributed_c10d, "_set_pg_timeout"):
        dist.distributed_c10d._set_pg_timeout(collective)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--target")
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--collective-timeout", type=float, default=300.0)
    options = parser.parse_args()
    spec = {"target": options.target, "backend": options.backend, "timeout": options.timeout,
            "collective_timeout": options.collective_timeout, "args": (), "kwargs": {}}
    run_dir = options.run_dir
    if run_dir is not None:
        with open(rundir.spec(run_dir), "rb") as f:
            spec.update(pickle.load(f))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # every group moelab makes on this rank gets the collective timeout (moelab.parallel.groups)
    os.environ[TIMEOUT_ENV] = str(spec["collective_timeout"])
    sys.stdout = _Prefixed(sys.stdout, f"[rank {rank}] ")
    sys.stderr = _Prefixed(sys.stderr, f"[rank {rank}] ")
    if run_dir is not None:
        open_state(rundir.state(run_dir, rank))
        stack_file = open(rundir.stack(run_dir, rank), "w")  # noqa: SIM115 (lives as long)
        faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)

    import torch
    import torch.distributed as dist

    try:
        if spec["backend"] == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        _init_process_group(spec, rank, world)
        if "script" in spec:
            namespace = runpy.run_path(spec["script"], run_name="__moelab_rank__")
            result = namespace.get("result")
        else:
            module_name, function_name = spec["target"].split(":")
            function = getattr(importlib.import_module(module_name), function_name)
            result = function(*spec["args"], **spec["kwargs"])
        if run_dir is not None:
            final = rundir.result(run_dir, rank)
            partial = final.with_suffix(".partial")
            with open(partial, "wb") as f:
                pickle.dump(result, f)
            partial.rename(final)  # whole, or not there
    except BaseException as error:
        text = traceback.format_exc()
        operation = failed_operation()
        if operation is not None:
            text += f"(rank {rank} was in the moelab collective: {operation})\n"
        if run_dir is not None:
            rundir.error(run_dir, rank).write_text(json.dumps(
                {"rank": rank, "time": time.time(), "traceback": text, "operation": operation,
                 "kind": error_kind(error),
                 "summary": f"{type(error).__name__}: {error}".strip()[:500]}))
        sys.stderr.write(text)
        sys.stderr.flush()
        os._exit(1)  # do not wait in process-group teardown: the launcher ends the other ranks
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
