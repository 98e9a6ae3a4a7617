"""How the layer benchmarks time their candidates: round-robin rotations of samples, medians.

A sample is the mean of enough calls to last MIN_SAMPLE_S; per round every candidate gives one
sample, in an order that rotates from round to round, and the report takes the median sample.
Noise on a shared 2-core machine reaches 20% from run to run, so compare numbers within a run.
Each sample records wall time and the process's CPU time (all threads; it does not grow while
other processes hold the cores).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable

MIN_SAMPLE_S = 0.1  # a timing sample is the mean of enough calls to last this long
MAX_REPS = 100


def time_call(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """(wall, CPU) seconds per call, the mean over reps calls. CPU is this process's time on
    all its threads (time.process_time): unlike wall time it does not grow while other processes
    hold the cores, so it is the steadier measure on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - wall) / reps, (time.process_time() - cpu) / reps


def warm_up(cands: dict[str, Callable[[], object]], warm: dict[str, float]) -> None:
    """One call of every candidate not yet timed (two of the cheap ones); ``warm`` gets the
    seconds of its last call, which sets how many calls make a sample."""
    for name, fn in cands.items():
        if name not in warm or warm[name] < 0.2:
            warm[name] = time_call(fn, 1)[0]


def time_rotation(cands: dict[str, Callable[[], object]], rounds: int,
                  warm: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Median (wall, CPU) seconds per call of each candidate, timed round-robin over rounds."""
    names = list(cands)
    reps = {n: max(1, min(MAX_REPS, math.ceil(MIN_SAMPLE_S / max(warm[n], 1e-6))))
            for n in names}
    walls: dict[str, list[float]] = {n: [] for n in names}
    cpus: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        gc.collect()
        shift = r % len(names)
        for n in names[shift:] + names[:shift]:
            wall, cpu = time_call(cands[n], reps[n])
            walls[n].append(wall)
            cpus[n].append(cpu)
    return ({n: statistics.median(v) for n, v in walls.items()},
            {n: statistics.median(v) for n, v in cpus.items()})


def time_point(point, cands: dict[str, Callable[[], object]], rounds: int,
               warm: dict[str, float], columns) -> None:
    """Warm the candidates up, time them round-robin, and write each column's median ms (wall
    clock and CPU) into ``point.ms`` and ``point.cpu`` (None where no candidate ran)."""
    warm_up(cands, warm)
    walls, cpus = time_rotation(cands, rounds, warm)
    for name in columns:
        point.ms[name] = walls[name] * 1e3 if name in walls else None
        point.cpu[name] = cpus[name] * 1e3 if name in cpus else None
