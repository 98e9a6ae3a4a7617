#!/usr/bin/env python
"""Benchmark of one MoE layer's forward pass on the CPU: moelab's backends against peers and floors.

    python benchmarks/bench_layer.py [--quick] [--rounds N] [--out benchmarks/RESULTS.md]

Settings: fp32, ``torch.set_num_threads(2)``, ``torch.no_grad()``, every layer in eval mode.
Grid: T tokens in {512, 4096}, d in {256, 1024}, f = 4d, E experts in {8, 32}, k in {1, 2}
(``--quick``: a tiny grid that runs in seconds, for a smoke test).

Candidates (each a forward of T tokens [T, d] -> [T, d]):

- ``index``: ``MoE(d, 4d, E, k=k, backend="index").eval()``, the paper's defaults (capacity factor
  1.0, min capacity 4, token dropping on).
- ``einsum``: the same layer object after ``set_backend("einsum")`` (GShard/DeepSpeed one-hot
  [S, E, C] masks). Skipped at a point whose masks would need more than ~4 GB or whose call would
  take more than ~20 s.
- ``loop``: the naive baseline in plain torch: moelab's router, then a Python loop over experts
  that selects each expert's kept routes, runs its FFN with the same weights and scatters the
  weighted result back (index_add_).
- ``mixtral``: HuggingFace transformers' ``MixtralSparseMoeBlock`` (SwiGLU experts, no biases,
  dropless top-k), every weight initialised explicitly (normal, std 0.02): transformers 5 creates
  the fused expert tensors with ``torch.empty``. Skipped with a note without transformers.
- ``index_swiglu``: moelab ``index`` with ``activation="swiglu"`` and ``bias=False`` holding the
  Mixtral block's weights (the same routing), so that its FLOPs match Mixtral's.
- ``dense``: the dense proxy, the same active FLOPs as plain matmuls: T·k rows through ONE expert
  FFN, ``gelu(x[Tk, d] @ W1 + b1) @ W2 + b2``.
- ``balanced``: the balanced floor: the same T·k rows already sorted and split evenly over the E
  experts, ``baddbmm(gelu(baddbmm(b1, x[E, Tk/E, d], W1[E])), W2[E])``, no routing. At few tokens
  per expert every MoE must read all E experts' weights, which the dense proxy does not.

With the capacity factor 1.0, moelab's buffer holds E·C = T·k rows at every grid point (C = T·k/E),
so ``index`` does the balanced floor's FLOPs plus routing, dispatch and combine. The pieces of
``index`` (router, dispatch, combine) are timed too, in the same rotation, on their precomputed
inputs (the "breakdown" table); its experts piece is exactly the balanced floor's computation.

Timing: per grid point, every candidate is warmed up, then timed in rotation (round-robin over the
candidates inside each round, the starting candidate rotating from round to round) for several
rounds; a sample is the mean of enough calls to last ~100 ms; the table reports the median sample.
Noise on a shared 2-core machine reaches 20% from run to run, so compare numbers within one run.
Each sample records wall time and the process's CPU time (all threads; it does not grow while
other processes hold the cores), and the report gives both.

OpenMP's wait policy is libgomp's default, as a user's Python gets it, unless OMP_WAIT_POLICY is
set. It matters here: with PASSIVE, the second thread sleeps after every parallel region and is
woken for the next, ~0.1 ms per region on this VM (an exp over 4096 floats took 115 us instead of
7 us), which taxes every small op of a router and even the floors' batched matmuls (the T=512,
d=256 floor ran 1.5-2x slower). On a machine other processes share, the default spinning is the
worse one (a scheduler slice per region): run this on a quiet machine, or set PASSIVE there.

Correctness, once per grid point before timing: index == einsum == loop (relative error <= 1e-4,
relative to the largest output), index == loop for the SwiGLU layer, and Mixtral against moelab's
dropless SwiGLU layer holding its weights (Mixtral renormalises top-1 weights to 1, so for k = 1
its output times the router probability is compared). A failed check aborts the run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _report, also when loaded by path

from _report import describe_cpu, load_average_warning, omp_wait_policy, write_section  # noqa: E402  (benchmarks/, the script's own folder)

from moelab import MoE, combine, dispatch  # noqa: E402

try:
    import transformers
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
except ImportError:  # the optional peer
    transformers = None

THREADS = 2
RTOL = 1e-4
MIN_SAMPLE_S = 0.1  # a timing sample is the mean of enough calls to last this long
EINSUM_MAX_BYTES = 4e9
EINSUM_MAX_S = 20.0
INIT_STD = 0.02
START, END = "<!-- bench_layer:start -->", "<!-- bench_layer:end -->"
NOTES = "<!-- bench_layer:notes (hand-written, kept by reruns) -->"

FULL_GRID = dict(T=(512, 4096), d=(256, 1024), E=(8, 32), k=(1, 2))
QUICK_GRID = dict(T=(64,), d=(32,), E=(4,), k=(1, 2))
PEERS = ("einsum", "loop", "mixtral")
COLUMNS = ("index", "einsum", "loop", "mixtral", "index_swiglu", "dense", "balanced")
PIECES = ("router", "dispatch", "experts", "combine")


# ------------------------------------------------------------------------------------ candidates

def loop_forward(moe: MoE, x: Tensor) -> Tensor:
    """The naive baseline: moelab's router, then one Python-loop iteration per expert."""
    routing = moe.router(x)
    ex = moe.experts
    y = torch.zeros_like(x)
    routed = routing.kept  # [S, k]: routes that keep their slot (dropped ones add nothing)
    for e in range(ex.num_experts):
        token, choice = torch.nonzero(routed & (routing.expert == e), as_tuple=True)
        if token.numel() == 0:
            continue
        h = x.index_select(0, token)
        h = h @ ex.w_in[e] if ex.b_in is None else torch.addmm(ex.b_in[e], h, ex.w_in[e])
        if ex.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h) if ex.activation == "gelu" else F.relu(h)
        h = h @ ex.w_out[e] if ex.b_out is None else torch.addmm(ex.b_out[e], h, ex.w_out[e])
        y.index_add_(0, token, h * routing.weight[token, choice, None])
    return y


def make_mixtral(d: int, f: int, E: int, k: int):
    config = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=E,
                           num_experts_per_tok=k)
    config._experts_implementation = "eager"  # the block's own forward (as a bare block gets)
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        for param in block.parameters():  # transformers 5: torch.empty, often NaN
            param.normal_(0.0, INIT_STD)
    return block


def swiglu_from_mixtral(block, d: int, f: int, E: int, k: int, drop_tokens: bool) -> MoE:
    """moelab's SwiGLU layer holding the Mixtral block's weights (hence the same routing)."""
    moe = MoE(d, f, E, k=k, activation="swiglu", bias=False, drop_tokens=drop_tokens,
              backend="index").eval()
    with torch.no_grad():
        moe.router.weight.copy_(block.gate.weight)
        # Mixtral: gate_up_proj [E, 2f, d] = [gate; up], down_proj [E, d, f], y = x W^T.
        moe.experts.w_in.copy_(block.experts.gate_up_proj.transpose(1, 2))
        moe.experts.w_out.copy_(block.experts.down_proj.transpose(1, 2))
    return moe


# ------------------------------------------------------------------------------------- checking

def rel_err(a: Tensor, ref: Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def check(name: str, a: Tensor, ref: Tensor, notes: list[str]) -> float:
    if not bool(torch.isfinite(a).all()):
        raise SystemExit(f"FAIL {name}: output has NaN/Inf")
    err = rel_err(a, ref)
    if not err <= RTOL:
        raise SystemExit(f"FAIL {name}: relative error {err:.2e} > {RTOL:.0e}")
    notes.append(f"{name} {err:.1e}")
    return err


# --------------------------------------------------------------------------------------- timing

def time_call(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """(wall, CPU) seconds per call, the mean over reps calls. CPU is this process's time on
    all its threads (time.process_time): unlike wall time it does not grow while other processes
    hold the cores, so it is the steadier measure on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - wall) / reps, (time.process_time() - cpu) / reps


def time_rotation(cands: dict[str, Callable[[], object]], rounds: int,
                  warm: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Median (wall, CPU) seconds per call of each candidate, timed round-robin over rounds."""
    names = list(cands)
    reps = {n: max(1, min(100, math.ceil(MIN_SAMPLE_S / max(warm[n], 1e-6)))) for n in names}
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


@dataclass
class Point:
    T: int
    d: int
    E: int
    k: int
    ms: dict[str, float | None] = field(default_factory=dict)  # median wall ms per call
    cpu: dict[str, float | None] = field(default_factory=dict)  # median CPU ms per call
    pieces: dict[str, float] = field(default_factory=dict)  # wall ms of index's pieces
    cpu_pieces: dict[str, float] = field(default_factory=dict)  # CPU ms of index's pieces
    capacity: int = 0
    drop_fraction: float = 0.0
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def einsum_cost(T: int, E: int, C: int, d: int) -> tuple[float, float]:
    """(bytes, flops) of the einsum backend: [S, E, C] fp32 masks (two per dispatch_masks call,
    one call in dispatch and one in combine, plus index_put temporaries: ~4 alive) and two
    S·E·C·d einsums."""
    cells = T * E * C
    return 4.0 * cells * 4, 2.0 * 2 * cells * d


def bench_point(T: int, d: int, E: int, k: int, rounds: int, seed: int) -> Point:
    f = 4 * d
    point = Point(T, d, E, k)
    torch.manual_seed(seed)
    x = torch.randn(T, d)
    moe = MoE(d, f, E, k=k, backend="index").eval()
    ex = moe.experts

    def run(layer: MoE, backend: str) -> Callable[[], Tensor]:
        def call() -> Tensor:
            layer.set_backend(backend)
            return layer(x)[0]
        return call

    # Floors: the same weights' shapes, the T·k rows as plain matmuls.
    rows = T * k
    x_rows = x.repeat(k, 1)  # [Tk, d]
    w1, b1 = ex.w_in[0].contiguous(), ex.b_in[0].contiguous()
    w2, b2 = ex.w_out[0].contiguous(), ex.b_out[0].contiguous()
    x_bal = x_rows.view(E, rows // E, d)  # grid points have E | T·k
    b_in, b_out = ex.b_in[:, None, :], ex.b_out[:, None, :]

    def dense() -> Tensor:
        return torch.addmm(b2, F.gelu(torch.addmm(b1, x_rows, w1)), w2)

    def balanced() -> Tensor:
        return torch.baddbmm(b_out, F.gelu(torch.baddbmm(b_in, x_bal, ex.w_in)), ex.w_out)

    cands: dict[str, Callable[[], object]] = {
        "index": run(moe, "index"),
        "einsum": run(moe, "einsum"),
        "loop": lambda: loop_forward(moe, x),
    }
    warm: dict[str, float] = {}  # seconds of one warm call, sets each candidate's reps

    def first_call(name: str):  # the correctness calls double as the warm-up calls
        t0 = time.perf_counter()
        out = cands[name]()
        warm[name] = time.perf_counter() - t0
        return out

    # ---- correctness of the GELU layer: index == einsum == loop -------------------------
    routing = moe.router(x)
    point.capacity = routing.capacity
    point.drop_fraction = routing.drop_fraction
    y_index = first_call("index")
    if not bool(torch.isfinite(y_index).all()):
        raise SystemExit("FAIL index: output has NaN/Inf")
    cost_bytes, cost_flops = einsum_cost(T, E, routing.buffer_rows, d)
    rate = 2.0 * 2 * rows * d * f / warm["index"]  # FLOP/s of the layer's expert FFNs
    if cost_bytes > EINSUM_MAX_BYTES or cost_flops / rate > EINSUM_MAX_S:
        del cands["einsum"]
        point.notes.append(f"einsum skipped at T={T} d={d} E={E} k={k}: too slow/large "
                           f"(~{cost_bytes / 1e9:.1f} GB masks, ~{cost_flops / rate:.0f} s)")
    else:
        y_einsum = first_call("einsum")
        if warm["einsum"] > EINSUM_MAX_S:
            del cands["einsum"]
            point.notes.append(f"einsum skipped at T={T} d={d} E={E} k={k}: too slow/large "
                               f"(first call {warm['einsum']:.0f} s)")
        else:
            check("einsum", y_einsum, y_index, point.errors)
    check("loop", first_call("loop"), y_index, point.errors)

    # ---- Mixtral and moelab's SwiGLU layer with its weights ----------------------------------
    if transformers is not None:
        block = make_mixtral(d, f, E, k)
        moe_sw = swiglu_from_mixtral(block, d, f, E, k, drop_tokens=True)
        x3 = x.view(1, T, d)
        cands["mixtral"] = lambda: block(x3)
        cands["index_swiglu"] = run(moe_sw, "index")
        check("swiglu-loop", loop_forward(moe_sw, x), first_call("index_swiglu"), point.errors)
        # Mixtral is dropless; its peer for checking is moelab's dropless SwiGLU layer.
        dropless = swiglu_from_mixtral(block, d, f, E, k, drop_tokens=False)
        y_ref, r_ref = dropless(x)
        y_mix = first_call("mixtral").view(T, d)
        if k == 1:  # Mixtral renormalises the single top-1 weight to 1; moelab keeps p.
            y_mix = y_mix * r_ref.weight
        check("mixtral", y_mix, y_ref, point.errors)
        del dropless
    else:
        point.notes.append("mixtral skipped: transformers not installed")

    cands["dense"] = dense
    cands["balanced"] = balanced

    # ---- the pieces of "index", on precomputed inputs ----------------------------------------
    # Its experts piece is the balanced floor's computation exactly (baddbmm, gelu, baddbmm on
    # [E, C, d] with the same weights), so it is not timed twice.
    moe.set_backend("index")
    buffer = dispatch(x, routing, "index")
    expert_out = ex(buffer)
    cands["p:router"] = lambda: moe.router(x)
    cands["p:dispatch"] = lambda: dispatch(x, routing, "index")
    cands["p:combine"] = lambda: combine(expert_out, routing, "index")

    # ---- warm-up, then the timed rotation ---------------------------------------------------
    for name, fn in cands.items():  # one warm call (or two for the cheap ones)
        if name not in warm or warm[name] < 0.2:
            warm[name] = time_call(fn, 1)[0]
    walls, cpus = time_rotation(cands, rounds, warm)
    for name in COLUMNS:
        point.ms[name] = walls[name] * 1e3 if name in walls else None
        point.cpu[name] = cpus[name] * 1e3 if name in cpus else None
    for name in PIECES:
        key = "balanced" if name == "experts" else "p:" + name
        point.pieces[name] = walls[key] * 1e3
        point.cpu_pieces[name] = cpus[key] * 1e3
    moe.set_backend("index")
    return point


# -------------------------------------------------------------------------------------- reports

def fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def table(points: list[Point], clock: str = "ms") -> str:
    head = ("| T | d | E | k | C | dropped | index | einsum | loop | Mixtral | index swiglu | "
            "dense | balanced | index/balanced | index/dense | einsum/index | loop/index | "
            "Mixtral/index | Mixtral/index swiglu |")
    lines = [head, "|" + "---:|" * 19]
    for p in points:
        m = getattr(p, clock)
        cells = [p.T, p.d, p.E, p.k, p.capacity, f"{100 * p.drop_fraction:.0f}%"]
        cells += [fmt(m[c]) for c in COLUMNS] + [
            fmt(ratio(m["index"], m["balanced"]), 2), fmt(ratio(m["index"], m["dense"]), 2),
            fmt(ratio(m["einsum"], m["index"]), 2), fmt(ratio(m["loop"], m["index"]), 2),
            fmt(ratio(m["mixtral"], m["index"]), 2),
            fmt(ratio(m["mixtral"], m["index_swiglu"]), 2)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def breakdown_table(points: list[Point], clock: str = "ms") -> str:
    head = ("| T | d | E | k | index (whole) | router | dispatch | experts (= balanced) | "
            "combine | sum of pieces | router % | dispatch % | experts % | combine % | "
            "(router+dispatch+combine) / balanced |")
    lines = [head, "|" + "---:|" * 15]
    for p in points:
        whole, pieces = getattr(p, clock), (p.pieces if clock == "ms" else p.cpu_pieces)
        total = sum(pieces.values())
        cells = [p.T, p.d, p.E, p.k, fmt(whole["index"])]
        cells += [fmt(pieces[n], 2) for n in PIECES] + [fmt(total)]
        cells += [f"{100 * pieces[n] / total:.1f}" for n in PIECES]
        overhead = pieces["router"] + pieces["dispatch"] + pieces["combine"]
        cells.append(f"{100 * overhead / pieces['experts']:.1f}%")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def goals(points: list[Point], clock: str = "ms") -> str:
    out = []
    t = {id(p): getattr(p, clock) for p in points}
    ib = [(ratio(t[id(p)]["index"], t[id(p)]["balanced"]), p) for p in points]
    worst, wp = max(ib, key=lambda t: t[0])
    miss = [p for r, p in ib if r > 1.15]
    out.append(f"- index within 1.15x of the balanced floor at every point: "
               f"{'MET' if not miss else 'MISSED'} (worst {worst:.2f}x at T={wp.T} d={wp.d} "
               f"E={wp.E} k={wp.k}; {len(miss)}/{len(points)} points over 1.15x)")
    big = [p for p in points if p.T == 4096 and p.d == 1024]
    if big:
        idd = [(ratio(t[id(p)]["index"], t[id(p)]["dense"]), p) for p in big]
        worst, wp = max(idd, key=lambda t: t[0])
        out.append(f"- index within 1.15x of the dense proxy at T=4096, d=1024: "
                   f"{'MET' if worst <= 1.15 else 'MISSED'} (worst {worst:.2f}x at E={wp.E} "
                   f"k={wp.k}; all: " + ", ".join(f"E={p.E} k={p.k} {r:.2f}x" for r, p in idd)
                   + ")")
    for peer, base in (("einsum", "index"), ("loop", "index"), ("mixtral", "index_swiglu"),
                       ("mixtral", "index")):
        sp = [(ratio(t[id(p)][peer], t[id(p)][base]), p) for p in points
              if t[id(p)][peer] is not None and t[id(p)][base] is not None]
        if not sp:
            out.append(f"- {base} vs {peer}: not measured")
            continue
        low, lp = min(sp, key=lambda t: t[0])
        slower = [p for s, p in sp if s <= 1.0]
        out.append(f"- {base} faster than {peer} at every point: "
                   f"{'MET' if not slower else 'MISSED'} (min speedup {low:.2f}x at T={lp.T} "
                   f"d={lp.d} E={lp.E} k={lp.k}; {len(slower)}/{len(sp)} points not faster)")
    return "\n".join(out)


def machine() -> str:
    return (f"{describe_cpu()}; "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny grid in seconds (smoke test)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="timing rounds per grid point (default 5, or 3 with --quick)")
    ap.add_argument("--out", type=Path, default=None,
                    help="write the report (markdown) here, e.g. benchmarks/RESULTS.md")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    if rounds < 1:
        ap.error("--rounds must be >= 1")

    torch.set_num_threads(THREADS)
    grid = QUICK_GRID if args.quick else FULL_GRID
    if transformers is not None:
        transformers.logging.set_verbosity_error()
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = load_average_warning()
    t_start = time.perf_counter()
    points = []
    with torch.no_grad():
        for T in grid["T"]:
            for d in grid["d"]:
                for E in grid["E"]:
                    for k in grid["k"]:
                        t0 = time.perf_counter()
                        p = bench_point(T, d, E, k, rounds, args.seed)
                        points.append(p)
                        print(f"T={T} d={d} E={E} k={k}: "
                              + ", ".join(f"{n} {fmt(v, 2)}" for n, v in p.ms.items())
                              + f" ms  [{time.perf_counter() - t0:.0f} s; checks: "
                              + ", ".join(p.errors) + "]"
                              + ("".join(f" NOTE {n}" for n in p.notes)), flush=True)
    elapsed = time.perf_counter() - t_start
    load_after = os.getloadavg()

    command = "python benchmarks/bench_layer.py " + " ".join(sys.argv[1:] if argv is None
                                                             else argv)
    tf_version = transformers.__version__ if transformers is not None else "not installed"
    notes = sorted({n for p in points for n in p.notes})
    report = f"""# MoE layer forward benchmark (CPU)

Produced by `benchmarks/bench_layer.py` (see its docstring for what each candidate is).

- Command: `{command.strip()}`
- Date: {started.strftime("%Y-%m-%d %H:%M UTC")}, wall time {elapsed / 60:.1f} min
- Machine: {machine()}
- Load average (1/5/15 min) before: {" / ".join(f"{v:.2f}" for v in load_before)}, after: \
{" / ".join(f"{v:.2f}" for v in load_after)} (other processes share these 2 cores)
- torch {torch.__version__}, transformers {tf_version}
- fp32, torch.set_num_threads({THREADS}), torch.no_grad(), eval mode, \
{omp_wait_policy()}; f = 4d; \
{rounds} rounds, candidates round-robin inside each round, median of the per-round samples \
(a sample is the mean of enough calls to last >= {MIN_SAMPLE_S * 1e3:.0f} ms)
- moelab layers: capacity factor 1.0, min capacity 4, token dropping on (C = T·k/E at every \
point, so E·C = T·k rows, the floors' FLOPs). Mixtral: SwiGLU, no biases, dropless; \
"index swiglu" is moelab with activation="swiglu", bias=False and Mixtral's weights.
- Correctness checked at every point before timing (relative error <= {RTOL:.0e}): index vs \
einsum vs loop, index vs loop for the SwiGLU layer, Mixtral vs moelab's dropless SwiGLU layer \
(max relative errors: {max(float(e.split()[-1]) for p in points for e in p.errors):.1e}).
{"".join(f"- Note: {n}" + chr(10) for n in notes)}
## Median wall-clock ms per forward, and ratios

Ratios > 1 in the last four columns: index is faster. "dropped": routes over capacity (random
router weights; the floors have no drops, and every candidate but Mixtral drops the same routes).

{table(points)}

Goals (wall clock):

{goals(points)}

## Median CPU ms per forward (both threads summed), and ratios

The same runs measured with `time.process_time()`: this does not count the time the process
waits while other processes hold the cores, so it is steadier than wall time on a shared machine.
It does count the OpenMP threads' spin-waiting.

{table(points, "cpu")}

Goals (CPU time):

{goals(points, "cpu")}

## Where "index" spends its time

Its pieces on precomputed inputs, timed in the same rotation: the router (gate logits and
`route`), dispatch (the mapping table's gather into [E, C, d]), the experts (two `baddbmm` and
the activation) and combine (the gather back and the weighted sum over k). Wall clock:

{breakdown_table(points)}

CPU time:

{breakdown_table(points, "cpu")}
"""
    print()
    for clock in ("ms", "cpu"):
        print(f"== {'wall' if clock == 'ms' else 'CPU'} ms ==")
        print(table(points, clock))
        print()
        print(goals(points, clock))
        print()
        print(breakdown_table(points, clock))
        print()
    if args.out is not None:  # replace (or add) this script's section; keep the others
        write_section(args.out, START, END, report, notes=NOTES, first=True)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
