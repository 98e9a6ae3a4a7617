#!/usr/bin/env python
"""Decode benchmark: tokens/s and per-token latency of a small MoE GPT, and the MoE part of decode.

    python benchmarks/bench_inference.py [--quick] [--rounds N] [--out benchmarks/RESULTS.md]

Model: a moelab GPT with random weights (fixed seed, no training): 4 layers, d_model 256, 4 heads,
d_ff = 4·d_model, vocabulary 256, MoE on every other layer (layers 2 and 4, as the paper),
top-1 gating (``--k 2`` for top-2), E experts per MoE layer. Random router weights route tokens
unevenly but deterministically; that is enough to time the paths, not to judge quality.
Grid: E in {8, 32, 64} x batch B in {1, 8, 32} (``--quick``: E=8, B=2, a few steps, seconds).

Paths (each one greedy ``moelab.generation.generate`` call, dropless routing as generate serves):

- ``naive``: backend "einsum" (GShard/DeepSpeed one-hot [S, E, C] masks) and ``use_cache=False``:
  every step recomputes the whole prefix, B·T tokens.
- ``cache+einsum``: the KV cache, one token per sequence per step, the einsum backend.
- ``cache+index``: the KV cache and the paper's mapping table (§5.4), backend "index".
- ``cache+index+graph``: cache+index with every decode step replayed from one captured CUDA
  graph (``generate(cuda_graph=True)``: capacity layout that cannot drop); only on a CUDA GPU.
- ``cache+triton``: the same with moelab's Triton kernels; only when the run is on a CUDA GPU.

Per-token latency is the time of one decode step (one new token for every sequence), tokens/s is
B / that. The MoE part of a decode step (gate + dispatch + exchange + expert FFN + combine, summed
over the MoE layers; the exchange is 0 on one process) comes from
``moelab.profiling.decode_latency``, the latency breakdown measured with module hooks, at the
same prompt length and the same decode positions as the generate calls. The hooks cost time of
their own, so a profiled step is a little slower than an unprofiled one; the MoE share ("% of
step") is of the profiled step.

Timing: per (E, B) point, one short warm-up generate per path (its logits also check that every
path computes the same model: relative error <= 1e-4, 2e-3 on a GPU, against cache+index; abort
otherwise), then ``--rounds`` rounds; in each, every candidate (the generate of each path, the
breakdown of each cached backend) runs once, round-robin, the starting candidate rotating from
round to round. A generate sample is the mean over its ``--steps`` decode steps (the prefill is
timed apart by generate and left out); the tables report the median sample. OpenMP waits by
libgomp's default unless OMP_WAIT_POLICY is set: decode is hundreds of small ops, and PASSIVE
would add ~0.1 ms to each parallel one (see bench_layer.py); run on a quiet machine.

The issue's goal: the MoE part of decode >= 3x faster with "index" than "einsum" at E >= 32 and
B <= 8. The paper's claim for comparison: "over 6x reduction in MoE kernel related latency"
(DeepSpeed-MoE §5.4; fused GPU kernels at the paper's scale).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout
sys.path.insert(0, str(REPO / "benchmarks"))  # _report, also when loaded by path

from _report import describe_cpu, load_average_warning, omp_wait_policy, write_section  # noqa: E402  (benchmarks/, the script's own folder)

from moelab.generation import generate  # noqa: E402
from moelab.model import GPT, GPTConfig  # noqa: E402
from moelab.profiling import decode_latency  # noqa: E402

START, END = "<!-- bench_inference:start -->", "<!-- bench_inference:end -->"
NOTES = "<!-- bench_inference:notes (hand-written, kept by reruns) -->"
RESULTS = REPO / "benchmarks" / "RESULTS.md"

FULL = dict(experts=(8, 32, 64), batches=(1, 8, 32), prompt=32, steps=10, rounds=5)
QUICK = dict(experts=(8,), batches=(2,), prompt=8, steps=4, rounds=2)
WARM_TOKENS = 3  # new tokens of the warm-up / check generate (2 decode steps)
GOAL_RATIO, GOAL_MIN_E, GOAL_MAX_B = 3.0, 32, 8  # the goal
PAPER_RATIO = 6.0  # DeepSpeed-MoE §5.4


@dataclass(frozen=True)
class DecodePath:
    name: str
    backend: str
    use_cache: bool
    cuda_graph: bool = False


def decode_paths(device: torch.device, notes: list[str]) -> list[DecodePath]:
    paths = [DecodePath("naive", "einsum", False), DecodePath("cache+einsum", "einsum", True),
             DecodePath("cache+index", "index", True)]
    if device.type == "cuda":
        paths.append(DecodePath("cache+index+graph", "index", True, cuda_graph=True))
        if importlib.util.find_spec("triton") is not None:
            paths.append(DecodePath("cache+triton", "triton", True))
        else:
            notes.append("cache+triton skipped: Triton is not installed")
    else:
        notes.append("cache+triton not run: it needs a CUDA GPU (this run is on the CPU)")
    return paths


@dataclass
class Point:
    E: int
    B: int
    device: str = "cpu"
    ms: dict[str, float] = field(default_factory=dict)  # path -> median ms per decode step
    spread: dict[str, float] = field(default_factory=dict)  # candidate -> (max - min) / median
    # backend -> median ms per profiled step of: gate, dispatch, exchange, experts, combine,
    # moe (their sum), routing (moe - experts), step (the whole profiled step)
    parts: dict[str, dict[str, float]] = field(default_factory=dict)
    check_err: float = 0.0  # largest relative logit error against cache+index

    def tokens_per_s(self, path: str) -> float:
        return 1e3 * self.B / self.ms[path]

    def moe_ratio(self, backend: str = "index", part: str = "moe") -> float:
        return self.parts["einsum"][part] / self.parts[backend][part]


# ------------------------------------------------------------------------------------ measuring

def make_model(E: int, args, device: torch.device) -> GPT:
    torch.manual_seed(args.seed)
    config = GPTConfig.create(vocab_size=256, block_size=max(128, args.prompt + args.steps + 1),
                              n_layer=args.layers, n_head=args.heads, d_model=args.d_model,
                              experts=E, moe_every=2, k=args.k, name=f"bench_inference_E{E}")
    return GPT(config).to(device).eval()


def check_paths(model: GPT, prompt: torch.Tensor, paths: list[DecodePath], tol: float) -> float:
    """Warm every path up with a short greedy generate and compare its logits with cache+index.

    Greedy tokens may part ways at a near-tie of the random model's logits; the logits are compared
    up to and including the first step where the tokens differ (they must agree until then)."""
    outs = {p.name: generate(model, prompt, WARM_TOKENS, greedy=True, backend=p.backend,
                             use_cache=p.use_cache, cuda_graph=p.cuda_graph, return_logits=True)
            for p in paths}
    ref = outs["cache+index"]
    worst = 0.0
    for name, out in outs.items():
        differ = (out.new_tokens != ref.new_tokens).any(dim=0).nonzero()
        upto = int(differ[0]) + 1 if len(differ) else WARM_TOKENS
        a, b = out.logits[:, :upto].float(), ref.logits[:, :upto].float()
        if not bool(torch.isfinite(a).all()):
            raise SystemExit(f"FAIL {name}: logits have NaN/Inf")
        err = float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
        if not err <= tol:
            raise SystemExit(f"FAIL {name}: logits differ from cache+index by {err:.2e} "
                             f"(relative; tolerance {tol:.0e})")
        worst = max(worst, err)
    return worst


def bench_point(model: GPT, E: int, B: int, args, paths: list[DecodePath],
                device: torch.device) -> Point:
    point = Point(E, B, device.type.upper())
    gen = torch.Generator().manual_seed(args.seed + B)
    prompt = torch.randint(0, model.config.vocab_size, (B, args.prompt), generator=gen).to(device)
    point.check_err = check_paths(model, prompt, paths, 1e-4 if device.type == "cpu" else 2e-3)

    def generate_ms(path: DecodePath):
        def run() -> float:
            out = generate(model, prompt, args.steps + 1, greedy=True, backend=path.backend,
                           use_cache=path.use_cache, cuda_graph=path.cuda_graph)
            return 1e3 * out.decode_s / out.decode_steps
        return run

    def breakdown(backend: str):
        def run():
            # prompt_length P - 1 plus one warm-up step: the profiled steps feed the same
            # positions as generate's decode steps (P .. P + steps - 1).
            return decode_latency(model, batch_size=B, prompt_length=args.prompt - 1,
                                  steps=args.steps, warmup=1, backend=backend, use_cache=True,
                                  seed=args.seed)
        return run

    cands = {"gen:" + p.name: generate_ms(p) for p in paths}
    cands.update({"moe:" + p.backend: breakdown(p.backend) for p in paths
                  if p.use_cache and not p.cuda_graph})
    samples: dict[str, list] = {name: [] for name in cands}
    names = list(cands)
    for r in range(args.rounds):
        gc.collect()
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(cands[name]())

    for p in paths:
        values = samples["gen:" + p.name]
        point.ms[p.name] = statistics.median(values)
        point.spread[p.name] = (max(values) - min(values)) / point.ms[p.name]
    for p in paths:
        if not p.use_cache or p.cuda_graph:
            continue
        runs = samples["moe:" + p.backend]
        parts = {c: [1e3 * b.totals.get(c, 0.0) for b in runs]
                 for c in ("gate", "dispatch", "exchange", "experts", "combine")}
        parts["moe"] = [1e3 * b.moe_s for b in runs]
        parts["routing"] = [1e3 * (b.moe_s - b.totals.get("experts", 0.0)) for b in runs]
        parts["step"] = [1e3 * b.measured_s for b in runs]
        point.parts[p.backend] = {c: statistics.median(v) for c, v in parts.items()}
        point.spread["moe:" + p.backend] = ((max(parts["moe"]) - min(parts["moe"]))
                                            / point.parts[p.backend]["moe"])
    return point


# -------------------------------------------------------------------------------------- reports

def fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def decode_table(points: list[Point], paths: list[DecodePath]) -> str:
    names = [p.name for p in paths]
    head = (["E", "batch"] + [f"{n} ms/step" for n in names] + [f"{n} tok/s" for n in names]
            + ["naive / cache+index", "cache+einsum / cache+index"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for p in points:
        cells = [str(p.E), str(p.B)] + [fmt(p.ms[n], 2) for n in names]
        cells += [fmt(p.tokens_per_s(n)) for n in names]
        cells += [fmt(p.ms["naive"] / p.ms["cache+index"], 2),
                  fmt(p.ms["cache+einsum"] / p.ms["cache+index"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def moe_table(points: list[Point], backends: list[str]) -> str:
    head = ["E", "batch"]
    for b in backends:
        head += [f"{b} gate", f"{b} dispatch", f"{b} experts", f"{b} combine", f"{b} MoE",
                 f"{b} MoE % of step"]
    others = [b for b in backends if b != "einsum"]
    head += [f"MoE einsum/{b}" for b in others]
    head += [f"gate+dispatch+combine einsum/{b}" for b in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for p in points:
        cells = [str(p.E), str(p.B)]
        for b in backends:
            part = p.parts[b]
            cells += [fmt(part[c], 2) for c in ("gate", "dispatch", "experts", "combine", "moe")]
            cells.append(fmt(100 * part["moe"] / part["step"], 0))
        cells += [fmt(p.moe_ratio(b), 2) for b in others]
        cells += [fmt(p.moe_ratio(b, "routing"), 2) for b in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def span(values: list[float], digits: int = 2, unit: str = "x") -> str:
    """'1.20x', or '1.20-3.40x' over several points."""
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return f"{low}{unit}" if low == high else f"{low}-{high}{unit}"


def goals(points: list[Point], backends: list[str]) -> str:
    out = []
    at = [p for p in points if p.E >= GOAL_MIN_E and p.B <= GOAL_MAX_B]
    if not at:
        out.append(f"- MoE part of decode >= {GOAL_RATIO:.0f}x faster with index than einsum at "
                   f"E >= {GOAL_MIN_E} and batch <= {GOAL_MAX_B}: NOT MEASURED (no such point in "
                   "this grid)")
    else:
        ratios = [(p.moe_ratio(), p) for p in at]
        low, lp = min(ratios, key=lambda t: t[0])
        met = low >= GOAL_RATIO
        out.append(f"- MoE part of decode >= {GOAL_RATIO:.0f}x faster with index than einsum at "
                   f"E >= {GOAL_MIN_E} and batch <= {GOAL_MAX_B}: "
                   f"{'MET' if met else 'MISSED'} (lowest {low:.2f}x at E={lp.E} B={lp.B}; "
                   + ", ".join(f"E={p.E} B={p.B} {r:.2f}x" for r, p in ratios) + ")")
    for b in [b for b in backends if b != "einsum"]:
        moe = [p.moe_ratio(b) for p in points]
        routing = [p.moe_ratio(b, "routing") for p in points]
        share = [100 * p.parts[b]["experts"] / p.parts[b]["moe"] for p in points]
        verdict = "REPRODUCED" if min(routing) > PAPER_RATIO else (
            "PARTLY REPRODUCED" if max(moe + routing) > PAPER_RATIO else "NOT REPRODUCED")
        out.append(f"- paper (§5.4): \"over {PAPER_RATIO:.0f}x reduction in MoE kernel related "
                   f"latency\" (A100, fused kernels, the paper's scale): {verdict} with {b} on "
                   f"this {points[0].device}: MoE part einsum/{b} {span(moe)} over the grid; "
                   f"gate + dispatch + combine alone (what §5.4 rewrites) {span(routing)}; the "
                   f"expert FFN, the same computation in both, is {span(share, 0, '%')} of "
                   f"{b}'s MoE part")
    kv = [p.ms["naive"] / p.ms["cache+index"] for p in points]
    einsum = [p.ms["cache+einsum"] / p.ms["cache+index"] for p in points]
    out.append(f"- for reference (no goal): a decode step of cache+index is {span(kv, 1)} "
               f"faster than the naive path and {span(einsum)} faster than cache+einsum")
    return "\n".join(out)


def machine(device: torch.device) -> str:
    gpu = f"; GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"{describe_cpu()}"
            f"{gpu}; {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}")


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1; got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="E=8, B=2, a few steps: a smoke test in seconds")
    ap.add_argument("--experts", type=int_list, default=None, help="E values, e.g. 8,32,64")
    ap.add_argument("--batches", type=int_list, default=None, help="batch sizes, e.g. 1,8,32")
    ap.add_argument("--prompt", type=int, default=None, help="prompt length (default 32)")
    ap.add_argument("--steps", type=int, default=None, help="decode steps per sample (16)")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds per point (3)")
    ap.add_argument("--k", type=int, default=1, choices=(1, 2), help="top-k gating (1)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: the CPU cores this process may use)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None,
                    help="write the report (markdown) here, e.g. benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("prompt", "steps", "rounds"):
        if getattr(args, key) < (2 if key == "prompt" else 1):
            ap.error(f"--{key} is too small")
    if args.quick and args.out is not None and args.out.resolve() == RESULTS.resolve():
        ap.error("--quick numbers do not belong in benchmarks/RESULTS.md; give another --out")

    device = torch.device(args.device)
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                               else os.cpu_count() or 1)
    torch.set_num_threads(threads)
    notes: list[str] = []
    paths = decode_paths(device, notes)
    backends = list(dict.fromkeys(p.backend for p in paths if p.use_cache and not p.cuda_graph))
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = load_average_warning()
    t_start = time.perf_counter()
    points = []
    for E in args.experts:
        model = make_model(E, args, device)
        for B in args.batches:
            t0 = time.perf_counter()
            p = bench_point(model, E, B, args, paths, device)
            points.append(p)
            print(f"E={E} B={B}: " + ", ".join(f"{n} {v:.2f}" for n, v in p.ms.items())
                  + " ms/step; MoE " + ", ".join(f"{b} {p.parts[b]['moe']:.2f}" for b in backends)
                  + f" ms  [{time.perf_counter() - t0:.0f} s; check {p.check_err:.1e}]",
                  flush=True)
        del model
    elapsed = time.perf_counter() - t_start
    load_after = os.getloadavg()

    command = "python benchmarks/bench_inference.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    spread = max(points, key=lambda p: max(p.spread.values()))
    worst_name = max(spread.spread, key=spread.spread.get)
    cfg = (f"{args.layers} layers, d_model {args.d_model}, {args.heads} heads, "
           f"d_ff {4 * args.d_model}")
    worst_spread = (f"{100 * spread.spread[worst_name]:.0f}% ({worst_name} at E={spread.E} "
                    f"B={spread.B})")
    report = f"""## Decode: KV cache, einsum vs index (`benchmarks/bench_inference.py`)

Produced by `benchmarks/bench_inference.py` (its docstring says what each path is).

- Command: `{command.strip()}`
- Date: {started.strftime("%Y-%m-%d %H:%M UTC")}, wall time {elapsed / 60:.1f} min \
({elapsed:.0f} s)
- Machine: {machine(device)}; device {device}
- Load average (1/5/15 min) before: {" / ".join(f"{v:.2f}" for v in load_before)}, after: \
{" / ".join(f"{v:.2f}" for v in load_after)} (other processes may share the cores)
- torch {torch.__version__}; fp32, no_grad, eval, dropless routing (generate's default), greedy \
decoding, {omp_wait_policy()}
- Model: moelab GPT, {cfg}, vocabulary 256, MoE on every other layer (2 of {args.layers}), \
top-{args.k}; **random weights** (seed {args.seed}, no training), so routing is by random \
router weights: fine for timing, meaningless for quality.
- Prompt {args.prompt} random tokens, {args.steps} decode steps per sample (they feed positions \
{args.prompt}-{args.prompt + args.steps - 1}, 0-based; generate feeds its greedy tokens, \
decode_latency random ones, so the two route different tokens); per point one warm-up \
generate per path, then {args.rounds} rounds, candidates round-robin inside each round, median \
of the per-round samples. Largest spread (max - min over rounds, relative to the median): \
{worst_spread}.
- Checked before timing: every path's logits match cache+index (largest relative error \
{max(p.check_err for p in points):.1e}).
{"".join(f"- Note: {n}" + chr(10) for n in notes)}
### Decode step (unprofiled `generate`): per-token latency and tokens/s

ms/step: one decode step, one new token for each of the B sequences (the per-token latency).
tok/s: B / that. Ratios > 1: cache+index is faster.

{decode_table(points, paths)}

### MoE part of a decode step (latency breakdown, `decode_latency`), ms per step

Summed over the MoE layers. "MoE" = gate + dispatch + exchange (0 here) + expert FFN + combine;
"% of step" is its share of the profiled step (module hooks add their own time to the profiled
step). The last columns: einsum's time over the other backend's (> 1: the other is faster), for
the MoE part and for the MoE part without the expert FFN (gate + dispatch + combine).

{moe_table(points, backends)}

### Goals

{goals(points, backends)}
"""
    print()
    print(report)
    if args.out is not None:
        write_section(args.out, START, END, report, notes=NOTES)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
