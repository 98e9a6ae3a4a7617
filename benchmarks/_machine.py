"""What the benchmark scripts say about the machine they ran on (shared by them)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch


def describe_cpu() -> str:
    """'<CPU model>, <n> logical CPUs, torch threads <t>', the model from /proc/cpuinfo."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"


def load_average_warning() -> tuple[float, float, float]:
    """The 1/5/15-minute load average now; warns on stderr when other processes share the cores
    (wall-clock numbers are then noisy)."""
    load = os.getloadavg()
    if load[0] > 1.0:
        print(f"warning: load average {load[0]:.1f} on {os.cpu_count()} CPUs: other processes "
              "share the cores, expect noisy wall-clock numbers", file=sys.stderr)
    return load
