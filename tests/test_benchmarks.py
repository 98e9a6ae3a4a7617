"""bench_layer.py --quick (its three grids: forward, decode, training step, against DeepSpeed and
HF's blocks where installed) and bench_train.py --quick: they run, and --out replaces only their
own sections of a RESULTS.md (the hand-written notes survive). bench_kernels and bench_inference
have their own smoke tests (test_kernels, test_bench_inference)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

RESULTS = """# Benchmark results

<!-- bench_layer:start -->
STALE LAYER TABLE
<!-- bench_layer:notes (hand-written, kept by reruns) -->
A hand-written reading.
<!-- bench_layer:end -->

<!-- bench_train:start -->
STALE TRAIN TABLE
<!-- bench_train:end -->

<!-- bench_kernels:start -->
GPU TABLE, KEEP
<!-- bench_kernels:end -->
"""


@pytest.mark.parametrize("script,args,section,heading", [
    ("bench_layer.py", ["--quick", "--rounds", "1"], "bench_layer",
     "## Median wall-clock ms per forward"),
    ("bench_train.py", ["--quick", "--steps", "3"], "bench_train",
     "### (3) Mixture-of-Students"),
], ids=["bench_layer", "bench_train"])
def test_quick_run_replaces_only_its_section(tmp_path, script, args, section, heading):
    out = tmp_path / "RESULTS.md"
    out.write_text(RESULTS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args,
                             "--out", str(out)], capture_output=True, text=True, timeout=240,
                            cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    assert text.count(start) == 1 and text.count(end) == 1
    body = text.split(start, 1)[1].split(end, 1)[0]
    assert heading in body and f"STALE {section.split('_')[1].upper()}" not in body
    assert "GPU TABLE, KEEP" in text  # the other sections are untouched
    if section == "bench_layer":
        assert "A hand-written reading." in body
        # which code ran the experts is reported, one of Experts.path's names per layer
        assert re.search(r"\| (bank|segments|padded|grouped_mm) \| (bank|segments|padded|"
                         r"grouped_mm) \|", body), body[-2000:]
        for grid, grid_heading in (("decode", "## T=1, capacity layout: time against the"),
                                   ("train", "## Median wall-clock ms per step")):
            marker = f"<!-- bench_layer_{grid}:start -->"
            assert text.count(marker) == 1
            assert grid_heading in text.split(marker, 1)[1].split(
                f"<!-- bench_layer_{grid}:end -->", 1)[0]
