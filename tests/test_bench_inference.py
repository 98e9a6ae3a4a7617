"""benchmarks/bench_inference.py --quick: it runs, prints its tables, replaces only its section."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "bench_inference.py"
START, END = "<!-- bench_inference:start -->", "<!-- bench_inference:end -->"
NOTES = "<!-- bench_inference:notes (hand-written, kept by reruns) -->"

OTHER = """# Benchmark results

<!-- bench_layer:start -->
## MoE layer forward
| T | d |
|---:|---:|
| 512 | 256 |
<!-- bench_layer:end -->

Text between sections.

{start}
## stale decode section
STALE-NUMBERS

{notes}
Hand-written reading of the last run.
{end}

<!-- bench_train:start -->
## Training
<!-- bench_train:end -->
"""


def table_rows(text: str, first_header: str) -> list[list[str]]:
    """The body rows of the markdown table whose header starts with ``first_header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_header))
    assert set(lines[start + 1].replace("|", "").replace(":", "")) == {"-"}, lines[start + 1]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_quick_run_prints_the_tables_and_keeps_the_other_sections(tmp_path):
    results = tmp_path / "RESULTS.md"
    original = OTHER.format(start=START, end=END, notes=NOTES)
    results.write_text(original)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(results)],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-4000:]

    for text in (proc.stdout, results.read_text()):
        decode = table_rows(text, "| E | batch | naive ms/step")
        assert len(decode) == 1, decode  # --quick: one E, one batch
        assert decode[0][:2] == ["8", "2"]
        values = [float(cell) for cell in decode[0][2:]]  # ms/step, tok/s, ratios
        assert len(values) == 8 and all(v > 0 for v in values), values
        ms = dict(zip(("naive", "einsum", "index"), values[:3], strict=True))
        for path, tok_s in zip(ms, values[3:6], strict=True):  # tok/s = B / ms per step
            assert abs(tok_s - 2e3 / ms[path]) <= 0.01 * tok_s + 0.1, (path, tok_s, ms)
        moe = table_rows(text, "| E | batch | einsum gate")
        assert len(moe) == 1 and moe[0][:2] == ["8", "2"], moe
        assert all(float(cell) > 0 for cell in moe[0][2:]), moe
        assert "### Goals" in text and "NOT MEASURED" in text  # no E >= 32 point in --quick
        assert "random weights" in text and "Load average" in text

    text = results.read_text()
    assert text.count(START) == 1 and text.count(END) == 1 and text.count(NOTES) == 1
    assert text.index(START) < text.index(NOTES) < text.index(END)
    assert "STALE-NUMBERS" not in text
    assert "Hand-written reading of the last run." in text  # the notes survive the rerun
    # Everything outside the section is unchanged, byte for byte.
    outside = re.compile(re.escape(START) + ".*?" + re.escape(END), flags=re.S)
    assert outside.sub("", text) == outside.sub("", original)


def test_quick_run_refuses_to_write_the_real_results(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out",
                           str(REPO / "benchmarks" / "RESULTS.md")],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and "--quick" in proc.stderr, proc.stderr


def test_first_write_appends_the_section_after_the_others(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_inference", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_inference", bench)  # its dataclasses look it up
    spec.loader.exec_module(bench)  # torch is already loaded: its OMP setting changes nothing
    results = tmp_path / "RESULTS.md"
    original = "# Benchmark results\n\n<!-- bench_layer:start -->\nx\n<!-- bench_layer:end -->\n"
    results.write_text(original)
    bench.write_section(results, START, END, "## Decode\n\nfirst")
    bench.write_section(results, START, END, "## Decode\n\nsecond")
    text = results.read_text()
    assert text.startswith(original.rstrip())
    assert text.count(START) == 1 and text.count(END) == 1
    assert "second" in text and "first" not in text and text.index(START) > text.index("x")
