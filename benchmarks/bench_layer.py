#!/usr/bin/env python
"""One MoE layer on the CPU, moelab against its peers and floors: forward, decode, training step.

    python benchmarks/bench_layer.py [--grids forward,decode,train] [--quick] [--rounds N]
                                     [--out benchmarks/RESULTS.md]

Three grids, each with its own section of RESULTS.md (fp32, ``torch.set_num_threads(2)``):

- ``forward`` (this file): T in {512, 4096}, d in {256, 1024}, f = 4d, E in {8, 32}, k in {1, 2},
  eval, no_grad, in both layouts: with capacity (factor 1.0, min capacity 4, dropping on) and
  dropless;
- ``decode`` (`_grid_decode`): T in {1, 8, 32} tokens, d in {256, 1024}, E in {32, 64}, k in
  {1, 2}, both layouts; then T=1 with E in {8, 32, 64, 128};
- ``train`` (`_grid_train`): forward + backward of one layer, T=4096, d in {256, 1024}, E in
  {8, 32}, k in {1, 2}, with capacity, against DeepSpeed and a dense FFN with the same active
  FLOPs.

Forward-grid candidates (each [T, d] -> [T, d]; every peer holds views of a moelab layer's
weights, see `_peers`, and is checked against it before timing):

- ``index``: moelab ``MoE(d, 4d, E, k=k)`` with capacity (GELU experts with biases), and
  ``index dropless``: the same layer routing without capacity;
- ``einsum``: the same layer with the GShard one-hot backend (skipped where its [S, E, C] masks
  would pass ~4 GB or its call ~20 s); ``loop``: moelab's router, then a Python loop over
  experts (index_select, FFN, index_add_);
- ``DeepSpeed`` (``deepspeed.moe.layer.MoE`` with the same weights, capacity) and ``DeepSpeed
  no-drop`` (its drop_tokens=False: capacity = the largest load);
- ``Mixtral`` (HF, SwiGLU, no biases, dropless) beside ``index swiglu``, moelab's dropless SwiGLU
  layer holding the same weights; ``Switch`` (HF, k=1 only: top-1 with capacity C, ReLU, no
  biases) beside ``index relu``, moelab's ReLU layer with the same weights and capacity;
- floors: ``dense``, the same active FLOPs as plain matmuls (T·k rows through ONE expert FFN),
  and ``balanced``, the T·k rows pre-sorted evenly over the E experts, one batched matmul per
  matrix, no routing.

Correctness, once per point before timing (relative error <= 1e-4 of the largest output):
index == einsum == loop; DeepSpeed == index (k=2: the same drops; k=1, where DeepSpeed keeps
overflowing tokens by topk order rather than position, in the no-drop mode against index
dropless); DeepSpeed no-drop == index dropless; Mixtral == index swiglu (Mixtral renormalises a
top-1 weight to 1: its output times the router probability is compared); Switch == index relu.
A failed check aborts the run. Timing: `_timing` (round-robin rounds, medians, wall and CPU).

OpenMP's wait policy is libgomp's default, as a user's Python gets it, unless OMP_WAIT_POLICY is
set: with PASSIVE every parallel region wakes a sleeping thread (~0.1 ms here), which taxes
small ops; on a busy machine spinning is the slow one. Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers, also when loaded by path

import _peers as peers  # noqa: E402
from _candidates import LABELS, PATHS_LEGEND, check, expert_path, layout_call  # noqa: E402
from _report import (  # noqa: E402
    Point,
    describe_cpu,
    fmt,
    load_average_warning,
    omp_wait_policy,
    peer_goal,
    ratio,
    write_section,
)
from _timing import MIN_SAMPLE_S, time_point  # noqa: E402

from moelab import MoE, expert_capacity  # noqa: E402

THREADS = 2
EINSUM_MAX_BYTES = 4e9
EINSUM_MAX_S = 20.0
START, END = "<!-- bench_layer:start -->", "<!-- bench_layer:end -->"
NOTES = "<!-- bench_layer:notes (hand-written, kept by reruns) -->"

FULL_GRID = dict(T=(512, 4096), d=(256, 1024), E=(8, 32), k=(1, 2))
QUICK_GRID = dict(T=(64,), d=(32,), E=(4,), k=(1, 2))
# (moelab candidate, its peer, layout): what the "faster than every peer" goal compares
PAIRS = (("index", "deepspeed", "capacity"), ("index", "einsum", "capacity"),
         ("index", "loop", "capacity"), ("index_relu", "switch", "capacity"),
         ("index_dropless", "deepspeed_nodrop", "dropless"),
         ("index_swiglu", "mixtral", "dropless"))
COLUMNS = ("index", "einsum", "loop", "deepspeed", "index_relu", "switch", "index_dropless",
           "deepspeed_nodrop", "index_swiglu", "mixtral", "dense", "balanced")

# ------------------------------------------------------------------------------------ helpers

def loop_forward(moe: MoE, x: Tensor) -> Tensor:
    """The naive baseline: moelab's router, then one Python-loop iteration per expert."""
    routing = moe.router(x)
    ex = moe.experts
    y = torch.zeros_like(x)
    for e in range(ex.num_experts):
        token, choice = torch.nonzero(routing.kept & (routing.expert == e), as_tuple=True)
        if token.numel() == 0:
            continue
        h = x.index_select(0, token)
        h = h @ ex.w_in[e] if ex.b_in is None else torch.addmm(ex.b_in[e], h, ex.w_in[e])
        h = F.gelu(h) if ex.activation == "gelu" else F.relu(h)
        h = h @ ex.w_out[e] if ex.b_out is None else torch.addmm(ex.b_out[e], h, ex.w_out[e])
        y.index_add_(0, token, h * routing.weight[token, choice, None])
    return y




def einsum_too_big(T: int, E: int, C: int, d: int, seconds_per_flop: float) -> str | None:
    """Why the einsum backend is skipped at a point (its [S, E, C] masks, ~4 alive, and two
    S·E·C·d einsums), or None."""
    cells = T * E * C
    nbytes, seconds = 16.0 * cells, 4.0 * cells * d * seconds_per_flop
    if nbytes > EINSUM_MAX_BYTES or seconds > EINSUM_MAX_S:
        return f"~{nbytes / 1e9:.1f} GB masks, ~{seconds:.0f} s"
    return None


# ------------------------------------------------------------------------------ forward grid

def forward_point(T: int, d: int, E: int, k: int, rounds: int, seed: int) -> Point:
    f = 4 * d
    point = Point(T, d, E, k)
    torch.manual_seed(seed)
    x = torch.randn(T, d)
    x3 = x.view(1, T, d)
    moe = peers.moelab_layer(d, f, E, k, seed=seed).eval()
    ex = moe.experts
    cands: dict[str, Callable[[], object]] = {
        "index": layout_call(moe, x, drop_tokens=True),
        "index_dropless": layout_call(moe, x, drop_tokens=False),
        "loop": lambda: loop_forward(moe, x),
    }
    warm: dict[str, float] = {}

    def first_call(name: str) -> Tensor:  # the correctness calls double as warm-up calls
        t0 = time.perf_counter()
        out = peers.first(cands[name]())
        warm[name] = time.perf_counter() - t0
        return out.reshape(T, d)

    # ---- moelab's own candidates ------------------------------------------------------------
    routing = moe.router(x)
    point.capacity, point.drop_fraction = routing.capacity, routing.drop_fraction
    y_index = first_call("index")
    y_dropless = first_call("index_dropless")
    moe.router.config = moe.router.config.replace(drop_tokens=False)
    point.paths["index_dropless"] = expert_path(moe, moe.router(x))
    moe.router.config = moe.router.config.replace(drop_tokens=True)
    point.paths["index"] = expert_path(moe, routing)
    check("loop", first_call("loop"), y_index, point.errors)
    seconds_per_flop = warm["index"] / (4.0 * T * k * d * f)
    too_big = einsum_too_big(T, E, routing.buffer_rows, d, seconds_per_flop)
    if too_big is None:
        cands["einsum"] = layout_call(moe, x, drop_tokens=True, backend="einsum")
        check("einsum", first_call("einsum"), y_index, point.errors)
    else:
        point.notes.append(f"einsum skipped at T={T} d={d} E={E} k={k} ({too_big})")

    # ---- DeepSpeed, with the same weights ---------------------------------------------------
    ds = peers.deepspeed_like(moe)
    if ds is not None:
        ds_nodrop = peers.deepspeed_like(moe, drop_tokens=False)
        cands["deepspeed"] = lambda: ds(x3)
        cands["deepspeed_nodrop"] = lambda: ds_nodrop(x3)
        y_ds = first_call("deepspeed")
        check("deepspeed no-drop", first_call("deepspeed_nodrop"), y_dropless, point.errors)
        if k > 1:  # top-2 drops the same routes as moelab (top-1 differs: see the docstring)
            check("deepspeed", y_ds, y_index, point.errors)

    # ---- HF Mixtral and Switch, with moelab twins -------------------------------------------
    swiglu = peers.moelab_layer(d, f, E, k, activation="swiglu", bias=False,
                                drop_tokens=False, seed=seed + 1).eval()
    mixtral = peers.mixtral_like(swiglu)
    if mixtral is not None:
        cands["index_swiglu"] = layout_call(swiglu, x, drop_tokens=False)
        cands["mixtral"] = lambda: mixtral(x3)
        y_sw = first_call("index_swiglu")
        y_mix = first_call("mixtral")
        if k == 1:  # Mixtral renormalises the single top-1 weight to 1; moelab keeps p
            y_mix = y_mix * swiglu.router(x).weight
        check("mixtral", y_mix, y_sw, point.errors)
        point.paths["index_swiglu"] = expert_path(swiglu, swiglu.router(x))
    if k == 1 and peers.transformers is not None:
        relu = peers.moelab_layer(d, f, E, 1, activation="relu", bias=False,
                                  seed=seed + 2).eval()
        capacity = expert_capacity(T, E, 1.0, 1, 4)
        switch = peers.switch_like(relu, capacity)
        cands["index_relu"] = layout_call(relu, x, drop_tokens=True)
        cands["switch"] = lambda: switch(x3)
        check("switch", first_call("switch"), first_call("index_relu"), point.errors)
        point.paths["index_relu"] = expert_path(relu, relu.router(x))

    # ---- floors: the same weights' shapes, the T·k rows as plain matmuls ---------------------
    rows = T * k
    x_rows = x.repeat(k, 1)  # [Tk, d]
    w1, b1 = ex.w_in[0].contiguous(), ex.b_in[0].contiguous()
    w2, b2 = ex.w_out[0].contiguous(), ex.b_out[0].contiguous()
    x_bal = x_rows.view(E, rows // E, d)  # grid points have E | T·k
    b_in, b_out = ex.b_in[:, None, :], ex.b_out[:, None, :]
    cands["dense"] = lambda: torch.addmm(b2, F.gelu(torch.addmm(b1, x_rows, w1)), w2)
    cands["balanced"] = lambda: torch.baddbmm(
        b_out, F.gelu(torch.baddbmm(b_in, x_bal, ex.w_in)), ex.w_out)

    time_point(point, cands, rounds, warm, COLUMNS)
    return point


# -------------------------------------------------------------------------------------- reports

LAYOUT_COLUMNS = {
    "capacity": ("index", "einsum", "loop", "deepspeed", "index_relu", "switch", "dense",
                 "balanced"),
    "dropless": ("index_dropless", "deepspeed_nodrop", "index_swiglu", "mixtral", "balanced"),
}
LAYOUT_FLOORS = {"capacity": (("index", "balanced"), ("index", "dense")),
                 "dropless": (("index_dropless", "balanced"),)}


def forward_table(points: list[Point], clock: str, layout: str) -> str:
    """One layout's candidates, then the ratios to the floors and to each peer."""
    m_of = [getattr(p, clock) for p in points]
    shown = [c for c in LAYOUT_COLUMNS[layout] if any(m[c] is not None for m in m_of)]
    ratios = [*LAYOUT_FLOORS[layout], *((a, b) for a, b, lay in PAIRS
                                        if lay == layout and b in shown)]
    head = (["T", "d", "E", "k"] + (["C", "dropped"] if layout == "capacity" else [])
            + [LABELS.get(c, c) for c in shown]
            + [f"{LABELS.get(a, a)} / {LABELS.get(b, b)}" for a, b in ratios])
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for p, m in zip(points, m_of, strict=True):
        cells = [p.T, p.d, p.E, p.k]
        if layout == "capacity":
            cells += [p.capacity, f"{100 * p.drop_fraction:.0f}%"]
        cells += [fmt(m[c]) for c in shown]
        cells += [fmt(ratio(m[a], m[b]), 2) for a, b in ratios]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def paths_table(points: list[Point]) -> str:
    names = [c for c in ("index", "index_dropless", "index_swiglu", "index_relu")
             if any(c in p.paths for p in points)]
    lines = ["| T | d | E | k | " + " | ".join(LABELS.get(n, n) for n in names) + " |",
             "|" + "---:|" * 4 + "---|" * len(names)]
    for p in points:
        lines.append(f"| {p.T} | {p.d} | {p.E} | {p.k} | "
                     + " | ".join(p.paths.get(n, "—") for n in names) + " |")
    return "\n".join(lines)


def forward_goals(points: list[Point], clock: str = "ms") -> str:
    out = []
    for ours, limit in (("index", 1.10), ("index_dropless", 1.15)):
        rs = [(ratio(getattr(p, clock)[ours], getattr(p, clock)["balanced"]), p) for p in points]
        worst, wp = max(rs, key=lambda t: t[0])
        over = [p for r, p in rs if r > limit]
        out.append(f"- {LABELS.get(ours, ours)} within {limit:.2f}x of the balanced floor at "
                   f"every point: {'MET' if not over else 'MISSED'} (worst {worst:.2f}x at "
                   f"T={wp.T} d={wp.d} E={wp.E} k={wp.k}; {len(over)}/{len(rs)} points over)")
    return "\n".join(out + peer_goal(points, clock, PAIRS, LABELS))


def machine() -> str:
    return (f"{describe_cpu()}; "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def header(title: str, command: str, started, elapsed: float, *, load_before, rounds: int
           ) -> str:
    load_after = os.getloadavg()
    return f"""# {title}

Produced by `benchmarks/bench_layer.py` (see its docstring, and its helpers', for every
candidate).

- Command: `{command.strip()}`
- Date: {started.strftime("%Y-%m-%d %H:%M UTC")}, wall time {elapsed / 60:.1f} min
- Machine: {machine()}
- Load average (1/5/15 min) before: {" / ".join(f"{v:.2f}" for v in load_before)}, after: \
{" / ".join(f"{v:.2f}" for v in load_after)} (other processes share these 2 cores)
- torch {torch.__version__}, {peers.versions()}
- fp32, torch.set_num_threads({THREADS}), {omp_wait_policy()}; {rounds} rounds, candidates \
round-robin inside each round, median of the per-round samples (a sample is the mean of enough \
calls to last >= {MIN_SAMPLE_S * 1e3:.0f} ms)
"""


def run_forward(quick: bool, rounds: int, seed: int, header) -> tuple[str, tuple]:
    """The forward grid: its points, then its report (``header(elapsed)`` heads it)."""
    spec = QUICK_GRID if quick else FULL_GRID
    t0 = time.perf_counter()
    points = []
    with torch.no_grad():
        for T in spec["T"]:
            for d in spec["d"]:
                for E in spec["E"]:
                    for k in spec["k"]:
                        tp = time.perf_counter()
                        p = forward_point(T, d, E, k, rounds, seed)
                        points.append(p)
                        print(f"forward T={T} d={d} E={E} k={k}: " + ", ".join(
                            f"{n} {fmt(v, 2)}" for n, v in p.ms.items() if v)
                            + f" ms [{time.perf_counter() - tp:.0f} s]", flush=True)
    return forward_report(points, header(time.perf_counter() - t0)), (START, END, NOTES)


def forward_report(points: list[Point], head: str) -> str:
    notes = sorted({n for p in points for n in p.notes} | set(peers.missing()))
    worst = max(float(e.split()[-1]) for p in points for e in p.errors)
    return f"""{head}- Forward of T tokens, eval, no_grad. moelab and DeepSpeed: GELU experts with \
biases, capacity factor 1.0, min capacity 4 (C = T·k/E at every point, so E·C = T·k rows, the \
floors' FLOPs). Every peer holds views of a moelab layer's weights and was checked against it \
before timing (largest relative error {worst:.1e}).
{"".join(f"- Note: {n}" + chr(10) for n in notes)}
## Median wall-clock ms per forward, and ratios

Ratios < 1 against a peer: moelab is faster. With capacity ("dropped": routes over capacity,
random router weights; the floors have no drops):

{forward_table(points, "ms", "capacity")}

Dropless (every route kept; DeepSpeed's no-drop mode pads every expert to the largest load):

{forward_table(points, "ms", "dropless")}

Goals (wall clock):

{forward_goals(points)}

## Median CPU ms per forward (both threads summed)

{forward_table(points, "cpu", "capacity")}

{forward_table(points, "cpu", "dropless")}

Goals (CPU time):

{forward_goals(points, "cpu")}

## Which code ran moelab's experts at each point

{PATHS_LEGEND}

{paths_table(points)}
"""


# ---------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grids", default="forward,decode,train",
                    help="comma-separated: forward, decode, train (default: all three)")
    ap.add_argument("--quick", action="store_true", help="tiny grids in seconds (smoke test)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="timing rounds per grid point (default 5, or 3 with --quick)")
    ap.add_argument("--out", type=Path, default=None,
                    help="write the reports (markdown) here, e.g. benchmarks/RESULTS.md")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    grids = [g.strip() for g in args.grids.split(",") if g.strip()]
    unknown = sorted(set(grids) - {"forward", "decode", "train"})
    if rounds < 1 or unknown:
        ap.error(f"--rounds must be >= 1 and --grids a list of forward, decode, train; "
                 f"got {rounds}, {unknown}")
    torch.set_num_threads(THREADS)
    if peers.transformers is not None:
        peers.transformers.logging.set_verbosity_error()
    command = "python benchmarks/bench_layer.py " + " ".join(sys.argv[1:] if argv is None
                                                             else argv)
    import _grid_decode
    import _grid_train

    runs = {"forward": ("MoE layer forward benchmark (CPU)", run_forward),
            "decode": ("MoE layer decode benchmark (CPU)", _grid_decode.run),
            "train": ("MoE layer training-step benchmark (CPU)", _grid_train.run)}
    for grid in grids:
        title, run = runs[grid]
        head = functools.partial(header, title, command,
                                 datetime.datetime.now(datetime.timezone.utc),
                                 load_before=load_average_warning(), rounds=rounds)
        report, (start, end, notes) = run(args.quick, rounds, args.seed, head)
        print("\n" + report)
        if args.out is not None:  # replace (or add) this grid's section; keep the others
            write_section(args.out, start, end, report, notes=notes, first=grid == "forward")
            print(f"wrote the {grid} section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
