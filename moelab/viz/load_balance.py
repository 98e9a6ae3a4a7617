"""LoadBalanceView: how evenly the experts share the work, step by step, while a model trains.

- `load_arrays(history)`: a Trainer history as numpy arrays (tested without widgets);
- `load_balance_figure(history)`: the static plotly figure;
- `LoadBalanceView`: that figure as a FigureWidget fed live by a Trainer (``view.attach(trainer)``),
  redrawn at most a few times a second, with a selector for the MoE layer the heatmap shows.
"""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .fit import bounded
from .view import MIN_REDRAW_SECONDS, LiveView

LAYER_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                "#bcbd22")


def load_arrays(history: list[dict]) -> dict:
    """Per-step arrays from Trainer records.

    Keys: steps [N]; share[layer] [E, N]: % of the layer's routes each expert was asked for;
    cv [L, N]: coefficient of variation (std / mean) of those counts; drop [L, N]: fraction of
    routes dropped; aux [N], z [N]: the MoE losses summed over layers; lm [N]: the LM loss.
    """
    if not history:
        return {"steps": np.zeros(0), "share": [], "cv": np.zeros((0, 0)),
                "drop": np.zeros((0, 0)), "aux": np.zeros(0), "z": np.zeros(0),
                "lm": np.zeros(0)}
    steps = np.array([r["step"] for r in history])
    counts = [np.array([r["counts"][layer] for r in history], dtype=float).T
              for layer in range(len(history[0]["counts"]))]  # per layer [E, N]
    share = [100 * c / np.maximum(c.sum(axis=0, keepdims=True), 1) for c in counts]
    cv = np.array([c.std(axis=0) / np.maximum(c.mean(axis=0), 1e-12) for c in counts])
    return {
        "steps": steps, "share": share, "cv": cv.reshape(len(counts), len(steps)),
        "drop": np.array([r["drop_fraction"] for r in history], dtype=float).T.reshape(
            len(counts), len(steps)),
        "aux": np.array([r["aux_loss"] for r in history]),
        "z": np.array([r["z_loss"] for r in history]),
        "lm": np.array([r["lm_loss"] for r in history]),
    }


def _empty_figure(num_layers: int, layer_names: list[str]) -> go.Figure:
    fig = make_subplots(
        rows=3, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.12,
        vertical_spacing=0.11, specs=[[{"rowspan": 3}, {}], [None, {}], [None, {}]],
        subplot_titles=("expert load over steps (% of the layer's routes)",
                        "load imbalance: coefficient of variation", "dropped routes (%)",
                        "MoE losses (sum over layers)"))
    fig.add_trace(go.Heatmap(z=[[0]], x=[0], y=[0], colorscale="Viridis", zmin=0,
                             colorbar=dict(title="% of routes", orientation="h", x=0.24,
                                           y=-0.2, len=0.45, thickness=12),
                             hovertemplate="step %{x}<br>expert %{y}<br>%{z:.1f}% of routes"
                                           "<extra></extra>"), row=1, col=1)
    for layer in range(num_layers):
        color = LAYER_COLORS[layer % len(LAYER_COLORS)]
        for row in (1, 2):  # CV line, then drop line
            fig.add_trace(go.Scatter(x=[], y=[], mode="lines", line=dict(color=color),
                                     name=layer_names[layer], legendgroup=layer_names[layer],
                                     showlegend=row == 1), row=row, col=2)
    fig.add_trace(go.Scatter(x=[], y=[], mode="lines", name="aux loss l_aux",
                             line=dict(color="#222")), row=3, col=2)
    fig.add_trace(go.Scatter(x=[], y=[], mode="lines", name="z-loss",
                             line=dict(color="#d62728", dash="dot")), row=3, col=2)
    fig.update_xaxes(title_text="training step", row=1, col=1)
    fig.update_yaxes(title_text="expert", dtick=1, row=1, col=1)
    fig.update_xaxes(title_text="training step", row=3, col=2)
    fig.update_yaxes(rangemode="tozero", row=1, col=2)
    fig.update_yaxes(rangemode="tozero", row=2, col=2)
    fig.update_layout(height=600, autosize=True, margin=dict(l=60, r=20, t=60, b=110),
                      legend=dict(orientation="h", y=-0.14, x=0.56),
                      template="plotly_white")
    return fig


def _draw(fig: go.Figure, arrays: dict, layer: int, layer_name: str = "") -> None:
    """Put `arrays` into the figure's traces (call inside fig.batch_update() for widgets)."""
    steps = arrays["steps"]
    num_layers = len(arrays["share"])
    heat = fig.data[0]
    if num_layers:
        fig.layout.annotations[0].text = f"{layer_name}: expert load over steps (% of routes)"
        share = arrays["share"][layer]
        heat.z, heat.x, heat.y = share, steps, np.arange(share.shape[0])
        heat.zmax = max(100.0 / share.shape[0] * 3, float(share.max()) if share.size else 1)
    for i in range(num_layers):
        fig.data[1 + 2 * i].update(x=steps, y=arrays["cv"][i])
        fig.data[2 + 2 * i].update(x=steps, y=100 * arrays["drop"][i])
    fig.data[-2].update(x=steps, y=arrays["aux"])
    fig.data[-1].update(x=steps, y=arrays["z"])


def load_balance_figure(history: list[dict], layer: int = 0,
                        layer_names: list[str] | None = None) -> go.Figure:
    """A static figure of a finished (or running) training history."""
    arrays = load_arrays(history)
    names = layer_names or [f"MoE layer {i}" for i in range(len(arrays["share"]))]
    fig = _empty_figure(len(arrays["share"]), names)
    _draw(fig, arrays, layer, names[layer] if names else "")
    return fig


class LoadBalanceView(LiveView):
    """Expert load of every MoE layer over training steps, live.

    ``view = LoadBalanceView(); view.attach(trainer); display(view); trainer.train()``.
    The heatmap shows one layer (pick it in the dropdown); the line plots show all layers.
    """

    def __init__(self, history: list[dict] | None = None, num_layers: int | None = None,
                 layer_names: list[str] | None = None,
                 min_redraw_seconds: float = MIN_REDRAW_SECONDS) -> None:
        self.history: list[dict] = list(history or [])
        if num_layers is None:
            num_layers = (len(layer_names) if layer_names is not None else
                          len(self.history[0]["counts"]) if self.history else 0)
        if layer_names is not None and len(layer_names) != num_layers:
            raise ValueError(f"layer_names has {len(layer_names)} names for num_layers="
                             f"{num_layers}; give one name per MoE layer")
        super().__init__(min_redraw_seconds)
        self.layer_picker = widgets.Dropdown(description="heatmap:")
        self.status = widgets.HTML()
        self.widget = bounded(widgets.HBox([self.layer_picker, self.status]))
        self.figure: go.FigureWidget | None = None
        self.layer_names: list[str] = []
        self._set_layers(num_layers, layer_names)
        self.layer_picker.observe(lambda change: self._building or self.refresh(),
                                  names="value")

    def _set_layers(self, num_layers: int, layer_names: list[str] | None = None,
                    draw: bool = True) -> None:
        """(Re)build the figure for ``num_layers`` MoE layers inside the same widget, so a view
        already on screen shows the new one; the old FigureWidget is closed (its state would
        otherwise be saved into the notebook too)."""
        self.layer_names = list(layer_names or [f"MoE layer {i}" for i in range(num_layers)])
        if self.figure is not None:
            self.figure.close()
        self.figure = go.FigureWidget(_empty_figure(num_layers, self.layer_names))
        self.widget.set_children(self.widget.children[0], self.figure)  # keeps the width probe
        self._building = True  # the picker's new options must not trigger a redraw
        try:
            self.layer_picker.options = [(name, i) for i, name in enumerate(self.layer_names)]
            self.layer_picker.value = 0 if num_layers else None
        finally:
            self._building = False
        if draw:
            self.refresh()

    def attach(self, trainer) -> LoadBalanceView:
        """Subscribe to a Trainer: every step lands here; the last one is always drawn. A view
        made without layers takes the model's MoE layers (named by their block)."""
        moe_layers = trainer.model.config.moe_layers
        if len(self.layer_names) != len(moe_layers):
            self._set_layers(len(moe_layers), [f"MoE layer {i} (block {b + 1})"
                                               for i, b in enumerate(moe_layers)],
                             draw=bool(self.history))
        trainer.subscribe(self.update, on_end=self.refresh)
        return self

    def update(self, record: dict) -> None:
        """Add one step's record; redraw if the last redraw is old enough."""
        self.history.append(record)
        if len(record["counts"]) != len(self.layer_names):  # a history of another model
            self._set_layers(len(record["counts"]), draw=False)
        if self.redraw_due():
            self.refresh()

    def refresh(self) -> None:
        """Redraw everything now, in one batch update."""
        arrays = load_arrays(self.history)
        self._redraw_layer(_draw, arrays)
        if self.history:
            last = self.history[-1]
            cv = ", ".join(f"{v:.2f}" for v in arrays["cv"][:, -1])
            self.status.value = (f"step {last['step']} · LM loss {last['lm_loss']:.3f} · "
                                 f"load CV per layer [{cv}] · aux {last['aux_loss']:.3f}")
