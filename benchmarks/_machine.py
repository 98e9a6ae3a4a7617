"""What the benchmark scripts say about the machine they ran on (shared by them)."""

from __future__ import annotations

import os
import platform
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
