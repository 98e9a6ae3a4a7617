"""The decode grid of bench_layer.py: a few tokens through one MoE layer, both layouts.

T in {1, 8, 32} tokens (a decode step of T sequences), d in {256, 1024}, f = 4d, E in {32, 64},
k in {1, 2}; eval, no_grad. Candidates (the peers hold views of moelab's weights):

- capacity layout (drop_tokens=True, min capacity 4, so C = 4 here): moelab ``index`` and
  ``einsum``, DeepSpeed, and for k=1 HF Switch beside moelab's ReLU twin (``index relu``);
- dropless: moelab ``index dropless``, DeepSpeed no-drop, HF Mixtral beside moelab's SwiGLU
  twin (``index swiglu``).

Then T=1 with E in {8, 32, 64, 128} (d=256, both k), capacity layout: the time should follow the
experts that received a token (k of them), not E; ``all experts`` runs moelab's bank over every
expert's [C, d] buffer (what it did before), for contrast.
"""

from __future__ import annotations

from collections.abc import Callable

import _peers as peers
import torch
from _candidates import LABELS, PATHS_LEGEND, RTOL, check, expert_path, layout_call
from _report import Point, fmt, peer_goal, ratio
from _timing import time_point, time_rotation, warm_up

from moelab import expert_capacity

START, END = "<!-- bench_layer_decode:start -->", "<!-- bench_layer_decode:end -->"
NOTES = "<!-- bench_layer_decode:notes (hand-written, kept by reruns) -->"
FULL = dict(T=(1, 8, 32), d=(256, 1024), E=(32, 64), k=(1, 2))
QUICK = dict(T=(1, 8), d=(32,), E=(8,), k=(1, 2))
SCALING_E, QUICK_SCALING_E = (8, 32, 64, 128), (4, 8)
COLUMNS = ("index", "einsum", "deepspeed", "index_relu", "switch", "index_dropless",
           "deepspeed_nodrop", "index_swiglu", "mixtral")
PAIRS = (("index", "deepspeed", "capacity"), ("index", "einsum", "capacity"),
         ("index_relu", "switch", "capacity"),
         ("index_dropless", "deepspeed_nodrop", "dropless"),
         ("index_swiglu", "mixtral", "dropless"))




class Layers:
    """The layers of one (d, E): moelab's three FFN variants, built once for every T and k (at
    d=1024, E=64 the three banks hold 7.5 GB), and their peers per k."""

    def __init__(self, d: int, E: int, seed: int) -> None:
        f = 4 * d
        self.gelu = peers.moelab_layer(d, f, E, 1, seed=seed).eval()
        self.swiglu = peers.moelab_layer(d, f, E, 1, activation="swiglu", bias=False,
                                         drop_tokens=False, seed=seed + 1).eval()
        self.relu = peers.moelab_layer(d, f, E, 1, activation="relu", bias=False,
                                       seed=seed + 2).eval()

    def set_k(self, k: int) -> None:
        for layer in (self.gelu, self.swiglu, self.relu):
            layer.router.config = layer.router.config.replace(k=k)


def decode_point(layers: Layers, T: int, d: int, E: int, k: int, rounds: int, seed: int
                 ) -> Point:
    point = Point(T, d, E, k)
    layers.set_k(k)
    x = torch.randn(T, d, generator=torch.Generator().manual_seed(seed + T))
    x3 = x.view(1, T, d)
    moe = layers.gelu
    cands: dict[str, Callable[[], object]] = {
        "index": layout_call(moe, x, drop_tokens=True),
        "einsum": layout_call(moe, x, drop_tokens=True, backend="einsum"),
        "index_dropless": layout_call(moe, x, drop_tokens=False),
    }
    warm: dict[str, float] = {}
    outputs = {name: peers.first(fn()).reshape(T, d) for name, fn in cands.items()}
    check("einsum", outputs["einsum"], outputs["index"], point.errors)
    # the capacity layout (the timed calls leave the router in whichever layout ran last):
    # DeepSpeed's layer below copies it
    config = moe.router.config.replace(drop_tokens=True)
    for name, drop in (("index", True), ("index_dropless", False)):
        moe.router.config = config.replace(drop_tokens=drop)
        point.paths[name] = expert_path(moe, moe.router(x))
    moe.router.config = config
    ds = peers.deepspeed_like(moe)
    if ds is not None and k == 1 and T < moe.router.config.min_capacity:
        point.notes.append(f"DeepSpeed refuses top-1 routing of fewer tokens than min_capacity "
                           f"(an assertion in top1gating, in both modes): skipped at T={T}, "
                           f"k=1")
    elif ds is not None:
        ds_nodrop = peers.deepspeed_like(moe, drop_tokens=False)
        cands["deepspeed"] = lambda: ds(x3)
        cands["deepspeed_nodrop"] = lambda: ds_nodrop(x3)
        check("deepspeed no-drop", peers.first(ds_nodrop(x3)).reshape(T, d),
              outputs["index_dropless"], point.errors)
        if k > 1:
            check("deepspeed", peers.first(ds(x3)).reshape(T, d), outputs["index"],
                  point.errors)
    mixtral = peers.mixtral_like(layers.swiglu)
    if mixtral is not None:
        cands["index_swiglu"] = layout_call(layers.swiglu, x, drop_tokens=False)
        cands["mixtral"] = lambda: mixtral(x3)
        y_mix = mixtral(x3).reshape(T, d)
        if k == 1:
            y_mix = y_mix * layers.swiglu.router(x).weight
        check("mixtral", y_mix, layers.swiglu(x)[0], point.errors)
        point.paths["index_swiglu"] = expert_path(layers.swiglu, layers.swiglu.router(x))
        if k == 1:
            switch = peers.switch_like(layers.relu, expert_capacity(T, E, 1.0, 1, 4))
            cands["index_relu"] = layout_call(layers.relu, x, drop_tokens=True)
            cands["switch"] = lambda: switch(x3)
            check("switch", switch(x3).reshape(T, d), layers.relu(x)[0], point.errors)
            point.paths["index_relu"] = expert_path(layers.relu, layers.relu.router(x))
    time_point(point, cands, rounds, warm, COLUMNS)
    return point


def scaling(E_values, k: int, rounds: int, seed: int, d: int = 256) -> list[dict]:
    """T=1, capacity layout: moelab with only the experts that have a token, against its bank
    over every expert, and DeepSpeed, as E grows."""
    rows = []
    for E in E_values:
        moe = peers.moelab_layer(d, 4 * d, E, k, seed=seed).eval()
        x = torch.randn(1, d, generator=torch.Generator().manual_seed(seed))
        routing = moe.router(x)
        buffer = moe.dispatch(x, routing)
        cands = {"index": lambda moe=moe, x=x: moe(x),
                 "all experts": lambda moe=moe, buffer=buffer: moe.experts(buffer)}
        ds = peers.deepspeed_like(moe) if k > 1 else None  # (top-1: see decode_point)
        if ds is not None:
            cands["deepspeed"] = lambda ds=ds, x=x: ds(x.view(1, 1, d))
        warm: dict[str, float] = {}
        warm_up(cands, warm)
        walls, _ = time_rotation(cands, rounds, warm)
        rows.append({"E": E, "k": k, "C": routing.capacity,
                     "active": int((routing.load > 0).sum()),
                     **{n: walls[n] * 1e3 for n in cands}})
        del moe, ds
    return rows


def table(points: list[Point], clock: str = "ms") -> str:
    shown = [c for c in COLUMNS if any(getattr(p, clock)[c] is not None for p in points)]
    ratios = [(a, b) for a, b, _ in PAIRS if a in shown and b in shown]
    head = (["T", "d", "E", "k"] + [LABELS.get(c, c) for c in shown]
            + [f"{LABELS.get(a, a)} / {LABELS.get(b, b)}" for a, b in ratios])
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for p in points:
        m = getattr(p, clock)
        cells = [p.T, p.d, p.E, p.k] + [fmt(m[c], 2) for c in shown]
        cells += [fmt(ratio(m[a], m[b]), 2) for a, b in ratios]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def scaling_table(rows: list[dict], names: list[str]) -> str:
    lines = ["| E | k | C | experts with a token | "
             + " | ".join(f"{LABELS.get(n, n)} ms" for n in names) + " |",
             "|" + "---:|" * (4 + len(names))]
    for r in rows:
        lines.append(f"| {r['E']} | {r['k']} | {r['C']} | {r['active']} | "
                     + " | ".join(fmt(r.get(n), 3) for n in names) + " |")
    return "\n".join(lines)


def run(quick: bool, rounds: int, seed: int, header) -> tuple[str, tuple[str, str, str]]:
    import time

    spec = QUICK if quick else FULL
    t0 = time.perf_counter()
    points = []
    with torch.no_grad():
        for d in spec["d"]:
            for E in spec["E"]:
                layers = Layers(d, E, seed)
                for T in spec["T"]:
                    for k in spec["k"]:
                        p = decode_point(layers, T, d, E, k, rounds, seed)
                        points.append(p)
                        print(f"decode T={T} d={d} E={E} k={k}: " + ", ".join(
                            f"{n} {fmt(v, 3)}" for n, v in p.ms.items() if v) + " ms",
                            flush=True)
                del layers
        scale = [row for k in (1, 2)
                 for row in scaling(QUICK_SCALING_E if quick else SCALING_E, k, rounds, seed)]
    scale_names = [n for n in ("index", "all experts", "deepspeed") if any(n in r for r in scale)]
    worst = max((float(e.split()[-1]) for p in points for e in p.errors), default=0.0)
    notes = "".join(f"- Note: {n}\n" for n in sorted(
        set(peers.missing()) | {n for p in points for n in p.notes}))
    report = f"""{header(time.perf_counter() - t0)}- Decode: T tokens through one layer, eval, \
no_grad; capacity layout: capacity factor 1.0, min capacity 4; every peer holds views of a \
moelab layer's weights and was checked against it (largest relative error {worst:.1e}, \
limit {RTOL:.0e}).
{notes}
## Median wall-clock ms per call, and ratios

{table(points)}

Goals (wall clock):

{chr(10).join(peer_goal(points, "ms", PAIRS, LABELS))}

## Median CPU ms per call

{table(points, "cpu")}

## T=1, capacity layout: time against the number of experts

"index" runs only the experts that received the token; "all experts" is moelab's bank over every
expert's [C, d] buffer, what a capacity-layout decode step did before.

{scaling_table(scale, scale_names)}

## Which code ran moelab's experts

{PATHS_LEGEND}

| T | d | E | k | index | index dropless | index swiglu | index relu |
|---:|---:|---:|---:|---|---|---|---|
""" + "\n".join(f"| {p.T} | {p.d} | {p.E} | {p.k} | " + " | ".join(
        p.paths.get(n, "—") for n in ("index", "index_dropless", "index_swiglu", "index_relu"))
        + " |" for p in points) + "\n"
    return report, (START, END, NOTES)
