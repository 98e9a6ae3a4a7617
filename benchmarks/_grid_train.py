"""The training-step grid of bench_layer.py: forward + backward of one MoE layer.

T=4096 tokens, d in {256, 1024}, f = 4d, E in {8, 32}, k in {1, 2}, training mode, with capacity
(factor 1.0, min capacity 4; no RTS, no second-expert sampling, so both layers route the same).
A step is ``loss = (y · probe).sum() + 0.01 · l_aux``, then ``loss.backward()`` into every
weight and the input, the gradients set to None before each step.

Candidates: moelab ``index``; DeepSpeed's MoE layer holding views of the same weights; the
dense FFN with the same active FLOPs (T·k rows through one expert FFN, forward and backward).
Before timing, DeepSpeed's input gradient is checked against moelab's (k=2: the same drops;
k=1: in the no-drop mode, where the two keep the same routes; see bench_layer's docstring).
"""

from __future__ import annotations

import time

import _peers as peers
import torch
import torch.nn.functional as F
from _candidates import check
from _report import Point, fmt, ratio
from _timing import time_point

START, END = "<!-- bench_layer_train:start -->", "<!-- bench_layer_train:end -->"
NOTES = "<!-- bench_layer_train:notes (hand-written, kept by reruns) -->"
FULL = dict(T=(4096,), d=(256, 1024), E=(8, 32), k=(1, 2))
QUICK = dict(T=(64,), d=(32,), E=(4,), k=(1, 2))
AUX_COEF = 0.01


def step(forward, x, probe, params) -> torch.Tensor:
    """One training step of a layer: forward, the loss, backward; returns dL/dx."""
    for p in params:
        p.grad = None
    x.grad = None
    y, aux = forward(x)
    ((y * probe).sum() + AUX_COEF * aux).backward()
    return x.grad


def train_point(T: int, d: int, E: int, k: int, rounds: int, seed: int) -> Point:
    f = 4 * d
    point = Point(T, d, E, k)
    moe = peers.moelab_layer(d, f, E, k, seed=seed, train=True)
    x = torch.randn(T, d, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    probe = torch.randn(T, d, generator=torch.Generator().manual_seed(seed + 1))

    def moelab_forward(inputs):
        y, routing = moe(inputs)
        return y, routing.aux_loss

    cands = {"index": lambda: step(moelab_forward, x, probe, list(moe.parameters()))}
    grad_index = cands["index"]().clone()
    ds = peers.deepspeed_like(moe)
    if ds is not None:
        def ds_forward(inputs, layer=ds):
            y, aux, _ = layer(inputs.view(1, T, d))
            return y.view(T, d), aux

        cands["deepspeed"] = lambda: step(ds_forward, x, probe, list(ds.parameters()))
        grad_ds = cands["deepspeed"]().clone()
        if k > 1:
            check("deepspeed dL/dx", grad_ds, grad_index, point.errors)
        else:  # top-1: compare where both keep every route
            nodrop = peers.deepspeed_like(moe, drop_tokens=False)
            config = moe.router.config
            moe.router.config = config.replace(drop_tokens=False)
            want = step(moelab_forward, x, probe, list(moe.parameters())).clone()
            moe.router.config = config

            def nodrop_forward(inputs):
                y, aux, _ = nodrop(inputs.view(1, T, d))
                return y.view(T, d), aux

            got = step(nodrop_forward, x, probe, list(nodrop.parameters()))
            check("deepspeed no-drop dL/dx", got, want, point.errors)
    # the dense FFN with the same active FLOPs: T·k rows through one expert, forward + backward
    ex = moe.experts
    w1 = ex.w_in[0].detach().clone().requires_grad_()
    b1 = ex.b_in[0].detach().clone().requires_grad_()
    w2 = ex.w_out[0].detach().clone().requires_grad_()
    b2 = ex.b_out[0].detach().clone().requires_grad_()
    x_rows = x.detach().repeat(k, 1).requires_grad_()
    probe_rows = probe.repeat(k, 1)

    def dense_forward(inputs):
        return torch.addmm(b2, F.gelu(torch.addmm(b1, inputs, w1)), w2), inputs.new_zeros(())

    cands["dense"] = lambda: step(dense_forward, x_rows, probe_rows, [w1, b1, w2, b2])
    warm: dict[str, float] = {}
    time_point(point, cands, rounds, warm, ("index", "deepspeed", "dense"))
    return point


def table(points: list[Point], clock: str = "ms") -> str:
    lines = ["| T | d | E | k | index | DeepSpeed | dense | index / DeepSpeed | index / dense |",
             "|" + "---:|" * 9]
    for p in points:
        m = getattr(p, clock)
        lines.append(f"| {p.T} | {p.d} | {p.E} | {p.k} | {fmt(m['index'])} | "
                     f"{fmt(m['deepspeed'])} | {fmt(m['dense'])} | "
                     f"{fmt(ratio(m['index'], m['deepspeed']), 2)} | "
                     f"{fmt(ratio(m['index'], m['dense']), 2)} |")
    return "\n".join(lines)


def goals(points: list[Point], clock: str = "ms") -> str:
    out = []
    for peer, limit, label in (("deepspeed", 1.0, "DeepSpeed's layer"),
                               ("dense", 1.15, "the dense FFN with the same active FLOPs")):
        rs = [(ratio(getattr(p, clock)["index"], getattr(p, clock)[peer]), p) for p in points
              if getattr(p, clock)[peer] is not None]
        if not rs:
            out.append(f"- index vs {label}: not measured")
            continue
        worst, wp = max(rs, key=lambda t: t[0])
        over = [p for r, p in rs if r > limit]
        out.append(f"- index <= {limit:.2f}x {label} at every point: "
                   f"{'MET' if not over else 'MISSED'} (worst {worst:.2f}x at d={wp.d} E={wp.E} "
                   f"k={wp.k}; {len(over)}/{len(rs)} points over)")
    return "\n".join(out)


def run(quick: bool, rounds: int, seed: int, header) -> tuple[str, tuple[str, str, str]]:
    spec = QUICK if quick else FULL
    t0 = time.perf_counter()
    points = []
    for T in spec["T"]:
        for d in spec["d"]:
            for E in spec["E"]:
                for k in spec["k"]:
                    p = train_point(T, d, E, k, rounds, seed)
                    points.append(p)
                    print(f"train T={T} d={d} E={E} k={k}: " + ", ".join(
                        f"{n} {fmt(v, 1)}" for n, v in p.ms.items() if v) + " ms", flush=True)
    worst = max((float(e.split()[-1]) for p in points for e in p.errors), default=0.0)
    notes = "".join(f"- Note: {n}\n" for n in peers.missing())
    report = f"""{header(time.perf_counter() - t0)}- One training step of one layer (forward + \
backward, training mode, capacity factor 1.0, min capacity 4); DeepSpeed holds views of \
moelab's weights; its input gradient matched moelab's to {worst:.1e} (relative).
{notes}
## Median wall-clock ms per step, and ratios

{table(points)}

Goals (wall clock):

{goals(points)}

## Median CPU ms per step

{table(points, "cpu")}

Goals (CPU time):

{goals(points, "cpu")}
"""
    return report, (START, END, NOTES)
