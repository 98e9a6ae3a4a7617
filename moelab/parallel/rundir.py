"""The run folder a `launch` and its ranks share: what each file is called, and the environment
the ranks are started with. One home for the names the launcher, the worker and the diagnosis
all use.

    spec.pkl        the target, its arguments, the backend and the timeouts (launcher -> ranks)
    script.py       the cell's code, for the %%launch magic
    result_r.pkl    what rank r's target returned (written whole, or not at all)
    error_r.json    rank r's traceback, the moelab collective it was in, whether it timed out
    state_r         the collective rank r is in now (`moelab.parallel.tracing`)
    stack_r.txt     every thread's Python stack, written by rank r on SIGUSR1
"""

from __future__ import annotations

from pathlib import Path

METRIC_PREFIX = "@@moelab-metric "  # a rank's stdout line carrying a report(**metrics) record
STORE_PORT_ENV = "MOELAB_STORE_PORT"  # where the launcher's TCPStore listens


def spec(run_dir: Path) -> Path:
    return run_dir / "spec.pkl"


def result(run_dir: Path, rank: int) -> Path:
    return run_dir / f"result_{rank}.pkl"


def error(run_dir: Path, rank: int) -> Path:
    return run_dir / f"error_{rank}.json"


def state(run_dir: Path, rank: int) -> Path:
    return run_dir / f"state_{rank}"


def stack(run_dir: Path, rank: int) -> Path:
    return run_dir / f"stack_{rank}.txt"
