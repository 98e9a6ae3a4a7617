"""Where inference time goes: measured here (LatencyView) and predicted at the paper's scale
(ServingView).

- `latency_table(breakdowns)` / `latency_figure(breakdowns)` / `LatencyView`: measured
  `moelab.profiling.LatencyBreakdown`s as stacked bars per (backend, batch size), one segment per
  component (attention, gate, dispatch, expert FFN, combine, ...), beside decode tokens/s against
  batch size; a dropdown shows one block or the whole model.
- `serving_table(...)` / `serving_figure(...)` / `ServingView`: `moelab.serving.predict` over GPU
  counts as stacked bars (weight reads, KV reads, compute, exchange, all-gather) and tokens/s per
  GPU, with sliders for the model, variant, hardware, GPUs, tensor / expert parallelism, the
  exchange and the batch; every change redraws in one ``batch_update``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..profiling import COMPONENT_LABELS, COMPONENTS, LatencyBreakdown
from ..serving import COMPONENT_LABELS as SERVING_LABELS
from ..serving import COMPONENTS as SERVING_COMPONENTS
from ..serving import HARDWARE, TABLE6, VARIANTS, predict
from .fit import bounded
from .view import View

COLORS = {
    "attention": "#7f7f7f", "gate": "#9467bd", "dispatch": "#1f77b4", "exchange": "#d62728",
    "experts": "#2ca02c", "combine": "#17becf", "dense_ffn": "#bcbd22", "embed_head": "#c7c7c7",
}
SERVING_COLORS = {"weight_reads": "#1f77b4", "kv_reads": "#aec7e8", "compute": "#2ca02c",
                  "exchange": "#d62728", "allgather": "#ff7f0e"}
BACKEND_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b")
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SERVING_MODELS = (*TABLE6, "paper_6_7b")  # Table 6 and the dense 6.7B of Fig. 14


# ------------------------------------------------------------------------ measured (here)

def latency_table(breakdowns: Sequence[LatencyBreakdown], layer: int | None = None) -> dict:
    """Plain arrays for the measured view: one column per breakdown.

    Keys: labels [n], backend [n], batch [n], ms {component: [n]} (milliseconds per forward,
    of the whole model or of block ``layer``), measured_ms [n], tokens_per_s [n],
    moe_ms [n] (gate + dispatch + exchange + expert FFN + combine).
    """
    breakdowns = list(breakdowns)
    if layer is None:
        ms = {c: np.array([1e3 * b.totals[c] for b in breakdowns]) for c in COMPONENTS}
    else:
        ms = {c: np.array([1e3 * (b.per_layer[c][layer] if c in b.per_layer else 0.0)
                           for b in breakdowns]) for c in COMPONENTS}
    return {
        "labels": [b.label() for b in breakdowns],
        "backend": [b.backend + ("" if b.use_cache else " (no cache)") for b in breakdowns],
        "batch": np.array([b.batch_size for b in breakdowns]),
        "ms": ms,
        "measured_ms": np.array([1e3 * b.measured_s for b in breakdowns]),
        "tokens_per_s": np.array([b.tokens_per_s for b in breakdowns]),
        "moe_ms": sum((ms[c] for c in ("gate", "dispatch", "exchange", "experts", "combine")),
                      np.zeros(len(breakdowns))),
    }


def _latency_empty() -> go.Figure:
    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.1,
                        subplot_titles=("time per forward, by component (ms)",
                                        "decode throughput"))
    for c in COMPONENTS:
        fig.add_trace(go.Bar(x=[], y=[], name=COMPONENT_LABELS[c], marker_color=COLORS[c],
                             hovertemplate="%{x}<br>" + COMPONENT_LABELS[c]
                                           + ": %{y:.3f} ms<extra></extra>"), row=1, col=1)
    fig.update_layout(barmode="stack", template="plotly_white", height=440, autosize=True,
                      legend=dict(orientation="h", y=-0.25), margin=dict(t=60, l=60, r=20, b=40))
    fig.update_yaxes(title_text="ms per forward", row=1, col=1)
    fig.update_xaxes(tickangle=0, tickfont=dict(size=10), row=1, col=1)
    fig.update_xaxes(title_text="batch size (sequences)", type="log", row=1, col=2)
    fig.update_yaxes(title_text="new tokens / s", row=1, col=2)
    return fig


def _latency_draw(fig: go.Figure, breakdowns: Sequence[LatencyBreakdown],
                  layer: int | None) -> None:
    table = latency_table(breakdowns, layer)
    ticks = [f"{backend.replace(' (', '<br>(')}<br>B={batch}" for backend, batch in
             zip(table["backend"], table["batch"], strict=True)]
    for trace, c in zip(fig.data[:len(COMPONENTS)], COMPONENTS, strict=True):
        trace.update(x=ticks, y=table["ms"][c])
    # one throughput line per backend (tokens/s is a whole-model number)
    backends = list(dict.fromkeys(table["backend"]))
    lines = list(fig.data[len(COMPONENTS):])
    for i, backend in enumerate(backends):
        pick = [j for j, b in enumerate(table["backend"]) if b == backend]
        order = sorted(pick, key=lambda j: table["batch"][j])
        values = dict(x=table["batch"][order], y=table["tokens_per_s"][order], name=backend)
        if i < len(lines):
            lines[i].update(**values)
        else:
            fig.add_trace(go.Scatter(mode="lines+markers",
                                     line=dict(color=BACKEND_COLORS[i % len(BACKEND_COLORS)]),
                                     hovertemplate="B=%{x}: %{y:.0f} tokens/s<extra>"
                                                   + html.escape(backend) + "</extra>",
                                     **values), row=1, col=2)
    batches = sorted(set(table["batch"].tolist()))
    fig.update_xaxes(tickvals=batches, ticktext=[str(b) for b in batches], row=1, col=2)
    where = "whole model" if layer is None else f"block {layer + 1}"
    fig.layout.annotations[0].text = f"time per forward, by component ({where}, ms)"


def latency_figure(breakdowns: Sequence[LatencyBreakdown], layer: int | None = None) -> go.Figure:
    """Stacked bars per (backend, batch size) and tokens/s against batch size."""
    if not breakdowns:
        raise ValueError("latency_figure needs at least one LatencyBreakdown "
                         "(see moelab.profiling.decode_sweep)")
    fig = _latency_empty()
    _latency_draw(fig, breakdowns, layer)
    return fig


class LatencyView(View):
    """Measured breakdowns (`moelab.profiling.decode_sweep`) with a block selector."""

    def __init__(self, breakdowns: Sequence[LatencyBreakdown]) -> None:
        self.breakdowns = list(breakdowns)
        if not self.breakdowns:
            raise ValueError("LatencyView needs at least one LatencyBreakdown")
        num_layers = len(next(iter(self.breakdowns[0].per_layer.values())))
        moe = set(self.breakdowns[0].moe_layers)
        options = [("whole model", -1)] + [
            (f"block {i + 1}" + (" (MoE)" if i in moe else ""), i) for i in range(num_layers)]
        self.layer_picker = widgets.Dropdown(options=options, value=-1, description="show:")
        self.figure = go.FigureWidget(latency_figure(self.breakdowns))
        self.summary = widgets.HTML()
        self.redraws = 0
        self.layer_picker.observe(lambda change: self.refresh(), names="value")
        self.widget = bounded(widgets.HBox([self.layer_picker, self.summary]), self.figure)
        self.refresh()

    @property
    def layer(self) -> int | None:
        return None if self.layer_picker.value < 0 else self.layer_picker.value

    def refresh(self) -> None:
        with self.figure.batch_update():
            _latency_draw(self.figure, self.breakdowns, self.layer)
        self.redraws += 1
        table = latency_table(self.breakdowns, self.layer)
        parts = [f"{label}: MoE {moe:.2f} ms" for label, moe in
                 zip(table["labels"], table["moe_ms"], strict=True)]
        self.summary.value = "<small>" + html.escape(" · ".join(parts)) + "</small>"


# -------------------------------------------------------------------- predicted (the paper)

def serving_table(model: str, gpu_counts: Sequence[int] = GPU_COUNTS, *,
                  variant: str = "moe", hardware: str = "A100-40GB", tp: int = 1,
                  ep: int | None = None, exchange: str = "flat", batch: int = 8,
                  context: int = 256) -> dict:
    """`moelab.serving.predict` over GPU counts, as plain arrays.

    ``ep`` None: as many expert-parallel ranks as GPUs (up to the expert count); a given ep is
    capped at each GPU count. Counts the layout rejects are left out and listed in ``skipped``
    with the reason. Keys: gpus [n], ms {component: [n]}, latency_ms [n], tokens_per_s [n],
    tokens_per_s_per_gpu [n], memory_gb [n], fits [n], skipped [(gpus, reason)].
    """
    rows, skipped = [], []
    for gpus in gpu_counts:
        try:
            rows.append(predict(model, gpus, hardware, variant=variant, tp=tp,
                                ep=None if ep is None else min(ep, gpus), exchange=exchange,
                                batch=batch, context=context))
        except ValueError as error:
            skipped.append((gpus, str(error)))
    return {
        "gpus": np.array([p.layout.gpus for p in rows], dtype=int),
        "ms": {c: np.array([1e3 * p.components[c] for p in rows]) for c in SERVING_COMPONENTS},
        "latency_ms": np.array([p.latency_ms for p in rows]),
        "tokens_per_s": np.array([p.tokens_per_s for p in rows]),
        "tokens_per_s_per_gpu": np.array([p.tokens_per_s_per_gpu for p in rows]),
        "memory_gb": np.array([p.memory_per_gpu / 1e9 for p in rows]),
        "fits": np.array([p.fits for p in rows], dtype=bool),
        "predictions": rows, "skipped": skipped,
    }


def _serving_empty() -> go.Figure:
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.1,
                        subplot_titles=("predicted decode-step latency (ms; faded: does not "
                                        "fit in GPU memory)",
                                        "throughput per GPU (tokens/s)"))
    for c in SERVING_COMPONENTS:
        fig.add_trace(go.Bar(x=[], y=[], name=SERVING_LABELS[c], marker_color=SERVING_COLORS[c],
                             hovertemplate="%{x} GPUs<br>" + SERVING_LABELS[c]
                                           + ": %{y:.2f} ms<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=[], y=[], mode="lines+markers", name="tokens/s per GPU",
                             line=dict(color="#222"), showlegend=False,
                             hovertemplate="%{x} GPUs: %{y:.0f} tokens/s per GPU"
                                           "<extra></extra>"), row=1, col=2)
    fig.add_trace(go.Scatter(x=[], y=[], mode="markers", name="selected", showlegend=False,
                             marker=dict(size=14, color="rgba(0,0,0,0)",
                                         line=dict(color="#d62728", width=3))),
                  row=1, col=2)
    fig.update_layout(barmode="stack", template="plotly_white", height=460, autosize=True,
                      legend=dict(orientation="h", y=-0.3), margin=dict(t=80, l=60, r=20, b=90))
    fig.update_xaxes(title_text="GPUs", type="category", row=1, col=1)
    fig.update_xaxes(title_text="GPUs", type="log", tickvals=list(GPU_COUNTS),
                     ticktext=[str(g) for g in GPU_COUNTS], row=1, col=2)
    fig.update_yaxes(title_text="ms per decode step", row=1, col=1)
    fig.update_yaxes(rangemode="tozero", row=1, col=2)
    return fig


def _serving_draw(fig: go.Figure, table: dict, selected: int | None, title: str) -> None:
    labels = [str(g) for g in table["gpus"]]
    # a bar whose weights and cache do not fit in the GPU's memory is drawn faded
    opacity = np.where(table["fits"], 1.0, 0.35)
    for trace, c in zip(fig.data[:len(SERVING_COMPONENTS)], SERVING_COMPONENTS, strict=True):
        trace.update(x=labels, y=table["ms"][c], marker_opacity=opacity,
                     marker_line_width=[3 if g == selected else 0 for g in table["gpus"]],
                     marker_line_color="#222")
    line, marker = fig.data[len(SERVING_COMPONENTS):]
    line.update(x=table["gpus"], y=table["tokens_per_s_per_gpu"])
    pick = [i for i, g in enumerate(table["gpus"]) if g == selected]
    marker.update(x=table["gpus"][pick], y=table["tokens_per_s_per_gpu"][pick])
    fig.layout.title = dict(text=title, x=0.01, font=dict(size=14))


def serving_figure(model: str = "1.3B+MoE-128", gpus: int | None = None, **options) -> go.Figure:
    """Predicted latency per component and throughput per GPU over GPU counts (faded bars do
    not fit in memory); ``gpus`` marks one count."""
    table = serving_table(model, **options)
    fig = _serving_empty()
    variant = options.get("variant", "moe")
    _serving_draw(fig, table, gpus, f"{model} ({variant}) on {options.get('hardware', 'A100-40GB')}"
                                    f", batch {options.get('batch', 8)} per replica")
    return fig


class ServingView(View):
    """The serving cost model with sliders; each change redraws in one ``batch_update``.

    The bars sweep the GPU count (the selected one outlined); the line is throughput per GPU
    (rising = super-linear scaling). The text gives the selected setting's numbers, or why the
    layout is invalid.
    """

    def __init__(self, model: str = "1.3B+MoE-128", *, variant: str = "moe",
                 hardware: str = "A100-40GB", gpus: int = 64, tp: int = 1,
                 ep: int | None = None, exchange: str = "hierarchical", batch: int = 8,
                 gpu_counts: Sequence[int] = GPU_COUNTS) -> None:
        self.gpu_counts = tuple(gpu_counts)
        style = {"description_width": "110px"}
        self.controls = {
            "model": widgets.Dropdown(options=list(SERVING_MODELS), value=model,
                                      description="model", style=style),
            "variant": widgets.Dropdown(options=list(VARIANTS), value=variant,
                                        description="variant", style=style),
            "hardware": widgets.Dropdown(options=list(HARDWARE), value=hardware,
                                         description="GPU", style=style),
            "gpus": widgets.SelectionSlider(options=list(self.gpu_counts), value=gpus,
                                            description="GPUs", style=style),
            "tp": widgets.SelectionSlider(options=[1, 2, 4, 8], value=tp,
                                          description="tensor slicing", style=style),
            "ep": widgets.SelectionSlider(options=["auto", 1, 2, 4, 8, 16, 32, 64, 128],
                                          value="auto" if ep is None else ep,
                                          description="expert parallel", style=style),
            "exchange": widgets.Dropdown(options=["flat", "hierarchical", "tp_coordinated"],
                                         value=exchange, description="exchange", style=style),
            "batch": widgets.SelectionSlider(options=list(BATCHES), value=batch,
                                             description="batch / replica", style=style),
        }
        self.status = widgets.HTML()
        self.figure = go.FigureWidget(_serving_empty())
        self.redraws = 0
        self.table: dict = {}
        self.prediction = None
        self.error: str | None = None
        self._quiet = False
        for control in self.controls.values():
            control.observe(self._on_change, names="value")
        names = list(self.controls)
        self.widget = bounded(
            widgets.HBox([widgets.VBox([self.controls[n] for n in names[:4]]),
                          widgets.VBox([self.controls[n] for n in names[4:]])]),
            self.status, self.figure)
        self.refresh()

    def _on_change(self, change) -> None:
        if not self._quiet:
            self.refresh()

    @property
    def options(self) -> dict:
        values = {name: control.value for name, control in self.controls.items()}
        values["ep"] = None if values["ep"] == "auto" else values["ep"]
        if values["model"] == "paper_6_7b":  # dense: no experts, no variants
            values.update(variant="moe", ep=None)
        return values

    def set(self, **values) -> None:
        """Set several controls and redraw once (e.g. ``view.set(gpus=16, tp=4)``)."""
        unknown = set(values) - set(self.controls)
        if unknown:
            raise ValueError(f"unknown controls {sorted(unknown)}; choose from "
                             f"{list(self.controls)}")
        self._quiet = True  # one redraw for the whole change, not one per control
        try:
            for name, value in values.items():
                self.controls[name].value = "auto" if (name == "ep" and value is None) else value
        finally:
            self._quiet = False
        self.refresh()

    def refresh(self) -> None:
        opts = self.options
        dense = opts["model"] == "paper_6_7b"
        sweep = dict(variant=opts["variant"], hardware=opts["hardware"], tp=opts["tp"],
                     ep=opts["ep"], exchange="flat" if dense else opts["exchange"],
                     batch=opts["batch"])
        self.table = serving_table(opts["model"], self.gpu_counts, **sweep)
        try:
            self.prediction = predict(opts["model"], opts["gpus"], opts["hardware"],
                                      variant=sweep["variant"], tp=opts["tp"], ep=opts["ep"],
                                      exchange=sweep["exchange"], batch=opts["batch"])
            self.error = None
        except ValueError as error:
            self.prediction, self.error = None, str(error)
        title = (f"{opts['model']} ({sweep['variant']}) on {opts['hardware']}, "
                 f"{sweep['exchange']} exchange, TP {opts['tp']}, batch {opts['batch']} "
                 f"per replica")
        with self.figure.batch_update():
            _serving_draw(self.figure, self.table, opts["gpus"] if self.error is None else None,
                          title)
        self.redraws += 1
        self.status.value = self._status_html()

    def _status_html(self) -> str:
        if self.error is not None:
            return (f"<span style='color:#d62728'>{self.controls['gpus'].value} GPUs: "
                    f"{html.escape(self.error)}</span>")
        p = self.prediction
        parts = ", ".join(f"{SERVING_LABELS[c]} {1e3 * s:.2f}" for c, s in p.components.items())
        fit = "fits" if p.fits else "<b style='color:#d62728'>does not fit</b>"
        layout = p.layout
        return (f"<b>{p.latency_ms:.2f} ms</b> per token ({parts} ms) · "
                f"{p.tokens_per_s:,.0f} tokens/s, {p.tokens_per_s_per_gpu:,.0f} per GPU · "
                f"TP {layout.tp} × DP {layout.dp}, EP {layout.ep} × ES {layout.es} · "
                f"{p.memory_per_gpu / 1e9:.1f} GB per GPU ({fit})")
