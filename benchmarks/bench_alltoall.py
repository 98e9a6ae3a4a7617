"""Expert-parallel exchanges on this machine, and by formula at the paper's scale (a benchmark).

For 2 and 4 local ranks (gloo, through moelab.parallel.launch): messages and bytes each rank sends
per forward of one expert-parallel MoE layer, and time, for the flat all-to-all, the
hierarchical one (§5.3, Fig. 8; node_size 2 at 4 ranks) and the parallelism-coordinated one
(§5.3, Fig. 9; tp_size 2 at 4 ranks, so ep_size 2), at a few token counts per rank. Then the
same counts by formula for the paper's 128- and 256-GPU layouts (8 GPUs a node, 8-way TP).

Usage: python benchmarks/bench_alltoall.py [--quick] [--rounds N] [--out benchmarks/RESULTS.md]
(a full run writes its section of benchmarks/RESULTS.md; --quick only prints, unless --out).

Inference forwards (torch.no_grad), capacity mode (top-1, capacity factor 1, the paper's equal
splits), 8 experts. A barrier starts every round; a round's time is the slowest rank's; the
table has the median over the rounds. "exchange" is the time inside the all_to_all calls and the
gather of their sizes (the TP all-gather only counts in "forward").
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from moelab.exchanges import bytes_per_forward, messages_per_forward, paper_layouts
from moelab.parallel import launch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _report, also when loaded by path
from _report import cpu_model, write_section  # noqa: E402

START, END = "<!-- bench_alltoall:start -->", "<!-- bench_alltoall:end -->"
HERE = Path(__file__).resolve().parent
NUM_EXPERTS = 8
CONFIGS = {
    2: [dict(exchange="flat")],
    4: [dict(exchange="flat"), dict(exchange="hierarchical", node_size=2),
        dict(exchange="tp_coordinated", tp_size=2)],
}


def buffer_bytes(tokens: int, d_model: int, tp_size: int) -> int:
    """One rank's dispatched [E, C, d] float32 buffer; TP pads C to a multiple of L."""
    capacity = math.ceil(tokens / NUM_EXPERTS)  # top-1, capacity factor 1, min_capacity 0
    capacity = math.ceil(capacity / tp_size) * tp_size
    return NUM_EXPERTS * capacity * d_model * 4


def measure(world: int, token_counts: list[int], rounds: int, warmup: int, d_model: int,
            d_ff: int) -> tuple[list[dict], float]:
    start = time.perf_counter()
    results = launch("moelab.examples.parallel_demo:exchange_benchmark", nprocs=world, quiet=True,
                     timeout=900, args=(CONFIGS[world], token_counts),
                     kwargs=dict(rounds=rounds, warmup=warmup, d_model=d_model, d_ff=d_ff,
                                 num_experts=NUM_EXPERTS))
    return results[0], time.perf_counter() - start  # every rank holds the same reduced rows


def _bytes(n: float) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024 ** 2 else f"{n / 1024 ** 2:.2f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 9)")
    parser.add_argument("--out", type=Path, default=None,
                        help="RESULTS.md to update (default: benchmarks/RESULTS.md for a full "
                             "run, none for --quick)")
    args = parser.parse_args()
    if args.quick:
        token_counts, rounds, warmup, d_model, d_ff = [32, 256], 3, 1, 64, 128
    else:
        token_counts, rounds, warmup, d_model, d_ff = [64, 512, 4096], 9, 2, 128, 256
    rounds = args.rounds or rounds
    out = args.out if args.out is not None else (None if args.quick else HERE / "RESULTS.md")

    lines = ["### Measured: one expert-parallel MoE layer, local ranks over gloo", "",
             f"d_model {d_model}, d_ff {d_ff}, {NUM_EXPERTS} experts, top-1, capacity factor "
             f"1; per rank and forward (two exchanges; TP adds its all-gather); time = "
             f"median of {rounds} rounds of the slowest rank.", "",
             "| ranks | exchange | tokens/rank | messages (formula) | bytes sent (formula) "
             "| exchange ms | forward ms |", "|---|---|---|---|---|---|---|"]
    seconds = {}
    for world in (2, 4):
        rows, seconds[world] = measure(world, token_counts, rounds, warmup, d_model, d_ff)
        for row in rows:
            name, node_size, tp_size = row["exchange"], row["node_size"], row["tp_size"]
            label = {"flat": f"flat (ep {world})",
                     "hierarchical": f"hierarchical (G={node_size})",
                     "tp_coordinated": f"TP-coordinated (L={tp_size}, ep {world // tp_size})"
                     }[name]
            messages = messages_per_forward(world, name, node_size, tp_size)
            volume = bytes_per_forward(world, name, buffer_bytes(row["tokens"], d_model,
                                                                 tp_size), node_size, tp_size)
            mark = "" if (row["messages"], row["bytes"]) == (messages, volume) else " ≠"
            lines.append(f"| {world} | {label} | {row['tokens']} | {row['messages']} "
                         f"({messages}){mark} | {_bytes(row['bytes'])} ({_bytes(volume)}) | "
                         f"{row['exchange_ms']:.2f} | {row['forward_ms']:.2f} |")
    lines += ["", "### By formula: the paper's layouts (8 GPUs a node, 8-way tensor slicing)",
              "", "Messages each GPU sends per exchange (the paper's hop count, the GPU itself "
              "left out) and per forward (two exchanges; TP-coordinated adds one all-gather "
              "over L); volume per exchange as a multiple of the GPU's dispatched buffer, for "
              "an even spread over experts.", "",
              "| GPUs | exchange | formula | messages / exchange | messages / forward "
              "| volume (× buffer) |", "|---|---|---|---|---|---|"]
    for row in paper_layouts():
        lines.append(f"| {row['world']} | {row['exchange']} | {row['formula']} | "
                     f"{row['messages_per_exchange']} | {row['messages_per_forward']} | "
                     f"{row['volume']:.3f} |")
    try:
        load = ", load average " + " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        load = ""
    command = "python benchmarks/bench_alltoall.py" + (" --quick" if args.quick else "") + \
        (f" --rounds {args.rounds}" if args.rounds else "")
    header = [f"## Expert-parallel exchanges (`{command}`)", "",
              f"{datetime.date.today()}, {cpu_model()}, {os.cpu_count()} cores{load} at the "
              f"end; "
              f"Python {platform.python_version()}, torch {torch.__version__}, gloo on one "
              f"machine (4 ranks share the cores, so times are scheduling-bound and noisy: "
              f"compare counts exactly, times only roughly); launches took "
              f"{seconds[2]:.0f} s (2 ranks) and {seconds[4]:.0f} s (4 ranks).", ""]
    section = "\n".join([*header, *lines])
    print("\n".join([START, section, END]))
    if out is not None:
        write_section(out, START, END, section)
        print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
