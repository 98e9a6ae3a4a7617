"""What the benchmark scripts share when they report: the machine they ran on, and their own
section of benchmarks/RESULTS.md."""

from __future__ import annotations

import os
import platform
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Point:
    """One point of a bench_layer grid: the shape, what each candidate measured, and what the
    report says beside the numbers."""

    T: int
    d: int
    E: int
    k: int
    ms: dict[str, float | None] = field(default_factory=dict)  # median wall ms per call
    cpu: dict[str, float | None] = field(default_factory=dict)  # median CPU ms per call
    capacity: int = 0
    drop_fraction: float = 0.0
    paths: dict[str, str] = field(default_factory=dict)  # moelab candidate -> experts' path
    errors: list[str] = field(default_factory=list)  # failed parity checks
    notes: list[str] = field(default_factory=list)  # candidates skipped, and why


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_cpu() -> str:
    """'<CPU model>, <n> logical CPUs, torch threads <t>'."""
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"


def omp_wait_policy() -> str:
    """How OpenMP's idle threads wait, for the report. The benchmarks leave libgomp's default
    (what a user's Python or notebook kernel gets) unless OMP_WAIT_POLICY is set."""
    policy = os.environ.get("OMP_WAIT_POLICY")
    return (f"OMP_WAIT_POLICY={policy}" if policy else
            "OMP_WAIT_POLICY unset (libgomp's default: an idle thread spins a while, then sleeps)")


def load_average_warning() -> tuple[float, float, float]:
    """The 1/5/15-minute load average now; warns on stderr when other processes share the cores
    (wall-clock numbers are then noisy, and with OpenMP's spinning wait much slower)."""
    load = os.getloadavg()
    if load[0] > 1.0:
        print(f"warning: load average {load[0]:.1f} on {os.cpu_count()} CPUs: other processes "
              "share the cores, expect noisy wall-clock numbers (on a busy machine set "
              "OMP_WAIT_POLICY=PASSIVE: spinning threads then wait a scheduler slice per "
              "parallel region)", file=sys.stderr)
    return load


TITLE = "# Benchmark results\n"


def write_section(path: Path, start: str, end: str, body: str, notes: str | None = None,
                  first: bool = False) -> None:
    """Put ``body`` between the ``start`` and ``end`` markers of ``path`` (a RESULTS.md),
    leaving every other section as it is.

    ``notes``: a marker inside the section after which hand-written text survives reruns.
    A file without the section gets it appended (``first=True``: right under the title)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else TITLE
    pattern = re.escape(start) + "(.*?)" + re.escape(end)
    old = re.search(pattern, text, flags=re.S)
    kept = ""
    if notes is not None and old is not None and notes in old.group(1):
        kept = "\n\n" + notes + old.group(1).split(notes, 1)[1].rstrip()
    section = f"{start}\n{body.strip()}{kept}\n{end}"
    if old is not None:
        text = re.sub(pattern, lambda _: section, text, count=1, flags=re.S)
    elif first and TITLE in text:
        text = text.replace(TITLE, TITLE + "\n" + section + "\n", 1)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def peer_goal(points: list, clock: str, pairs, labels: dict) -> list[str]:
    """One line per (moelab candidate, peer, layout) of ``pairs``: at or below the peer's median
    at every point of ``points`` (objects with T, d, E, k and per-clock dicts of ms)?"""
    out = []
    for ours, peer, layout in pairs:
        sp = [(ratio(getattr(p, clock)[ours], getattr(p, clock)[peer]), p) for p in points
              if getattr(p, clock).get(ours) is not None
              and getattr(p, clock).get(peer) is not None]
        if not sp:
            out.append(f"- {labels.get(ours, ours)} vs {labels.get(peer, peer)} ({layout}): "
                       "not measured")
            continue
        worst, wp = max(sp, key=lambda t: t[0])
        over = [p for r, p in sp if r > 1.0]
        out.append(f"- {labels.get(ours, ours)} at or below {labels.get(peer, peer)} "
                   f"({layout}) at every point: {'MET' if not over else 'MISSED'} (worst "
                   f"{worst:.2f}x at T={wp.T} d={wp.d} E={wp.E} k={wp.k}; {len(over)}/{len(sp)} "
                   f"points above)")
    return out
