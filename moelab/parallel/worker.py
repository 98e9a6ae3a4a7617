"""One rank of a `launch` (or torchrun) run: init the process group, call the target, report.

Run by torch.distributed.run as ``python -m moelab.parallel.worker --run-dir DIR`` (from `launch`)
or ``--target module:function`` (multi-node torchrun). Output lines carry a ``[rank r]`` prefix.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import pickle
import runpy
import sys
import time
import traceback
from pathlib import Path

from .groups import TIMEOUT_ENV
from .tracing import failed_operation


class _Prefixed:
    """A text stream that writes whole lines, each starting with a prefix (whole lines, so that
    the ranks' lines never interleave mid-line in the shared pipe)."""

    def __init__(self, stream, prefix: str) -> None:
        self.stream, self.prefix, self.pending = stream, prefix, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        if lines:
            self.stream.write("".join(
                (line if line.startswith("@@moelab-metric ") else self.prefix + line) + "\n"
                for line in lines))
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.write("\n")
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--target")
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--timeout", type=float, default=300.0)
    options = parser.parse_args()
    spec = {"target": options.target, "backend": options.backend, "timeout": options.timeout,
            "args": (), "kwargs": {}}
    if options.run_dir is not None:
        with open(options.run_dir / "spec.pkl", "rb") as f:
            spec.update(pickle.load(f))
    rank = int(os.environ["RANK"])
    # every group moelab makes on this rank gets the run's timeout (moelab.parallel.groups)
    os.environ[TIMEOUT_ENV] = str(spec["timeout"])
    sys.stdout = _Prefixed(sys.stdout, f"[rank {rank}] ")
    sys.stderr = _Prefixed(sys.stderr, f"[rank {rank}] ")

    import torch
    import torch.distributed as dist

    try:
        if spec["backend"] == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(spec["backend"],
                                timeout=datetime.timedelta(seconds=spec["timeout"]))
        if "script" in spec:
            namespace = runpy.run_path(spec["script"], run_name="__moelab_rank__")
            result = namespace.get("result")
        else:
            module_name, function_name = spec["target"].split(":")
            function = getattr(importlib.import_module(module_name), function_name)
            result = function(*spec["args"], **spec["kwargs"])
        if options.run_dir is not None:
            with open(options.run_dir / f"result_{rank}.pkl", "wb") as f:
                pickle.dump(result, f)
    except BaseException:
        text = traceback.format_exc()
        operation = failed_operation()
        if operation is not None:
            text += f"(rank {rank} was in the moelab collective: {operation})\n"
        if options.run_dir is not None:
            (options.run_dir / f"error_{rank}.json").write_text(
                json.dumps({"rank": rank, "time": time.time(), "traceback": text}))
        sys.stderr.write(text)
        sys.stderr.flush()
        os._exit(1)  # do not wait in process-group teardown: elastic ends the other ranks
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
