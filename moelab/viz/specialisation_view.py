"""SpecialisationView: do the experts specialise, and on what? Live while a Trainer runs.

- `specialisation_arrays(history)`: a `moelab.specialisation.SpecialisationProbe` history as
  numpy arrays (tested without widgets);
- `specialisation_figure(history, domain_names)`: the static plotly figure;
- `SpecialisationView`: that figure as a FigureWidget fed by a probe (``view.attach(probe)``),
  redrawn at most a few times a second, with a selector for the MoE layer the heatmaps show.

Four panels: expert co-activation (how often experts i and j serve the same token; the diagonal,
an expert with itself, is left blank) and the
domain × expert share of routes for one layer at the latest probe; the dead-expert fraction and
the domain selectivity I(domain; expert) / H(domain) of every layer over training.
"""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .fit import bounded
from .load_balance import LAYER_COLORS
from .view import MIN_REDRAW_SECONDS, LiveView


def specialisation_arrays(history: list[dict]) -> dict:
    """Keys: steps [N]; dead [L, N] and selectivity [L, N] (NaN where a probe had no domain
    labels); coactivation[layer] [E, E] and domain_share[layer] [D, E] at the last probe."""
    if not history:
        return {"steps": np.zeros(0), "dead": np.zeros((0, 0)),
                "selectivity": np.zeros((0, 0)), "coactivation": [], "domain_share": []}
    last = history[-1]["layers"]
    return {
        "steps": np.array([entry["step"] for entry in history]),
        "dead": np.array([[layer["dead"] for layer in entry["layers"]]
                          for entry in history], dtype=float).T.reshape(len(last), -1),
        "selectivity": np.array([[layer.get("selectivity", np.nan) for layer in entry["layers"]]
                                 for entry in history], dtype=float).T.reshape(len(last), -1),
        "coactivation": [np.array(layer["coactivation"]) for layer in last],
        "domain_share": [np.array(layer.get("domain_share", [[]])) for layer in last],
    }


def _empty_figure(layer_names: list[str], domain_names: list[str]) -> go.Figure:
    fig = make_subplots(
        rows=2, cols=2, horizontal_spacing=0.16, vertical_spacing=0.2,
        subplot_titles=("co-activation: tokens served by both experts (%)",
                        "where each domain's routes go (%)",
                        "dead experts (% of the layer's experts)",
                        "domain selectivity I(domain; expert) / H(domain)"))
    fig.add_trace(go.Heatmap(z=[[0]], colorscale="Viridis", zmin=0,
                             colorbar=dict(x=0.42, len=0.42, y=0.79, thickness=10),
                             hovertemplate="experts %{y} and %{x}<br>%{z:.1f}% of tokens"
                                           "<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Heatmap(z=[[0]], colorscale="Blues", zmin=0,
                             colorbar=dict(x=1.0, len=0.42, y=0.79, thickness=10),
                             hovertemplate="%{y} → expert %{x}<br>%{z:.1f}% of its routes"
                                           "<extra></extra>"), row=1, col=2)
    for i, name in enumerate(layer_names):
        color = LAYER_COLORS[i % len(LAYER_COLORS)]
        for col in (1, 2):
            fig.add_trace(go.Scatter(x=[], y=[], mode="lines+markers", name=name,
                                     legendgroup=name, showlegend=col == 1,
                                     line=dict(color=color)), row=2, col=col)
    fig.update_xaxes(title_text="expert", dtick=1, row=1, col=1)
    fig.update_yaxes(title_text="expert", dtick=1, autorange="reversed", row=1, col=1)
    fig.update_xaxes(title_text="expert", dtick=1, row=1, col=2)
    fig.update_yaxes(tickvals=list(range(len(domain_names))), ticktext=domain_names,
                     autorange="reversed", row=1, col=2)
    for col in (1, 2):
        fig.update_xaxes(title_text="training step", row=2, col=col)
    fig.update_yaxes(range=[0, 100], row=2, col=1)
    fig.update_yaxes(range=[0, 1], row=2, col=2)
    fig.update_layout(height=640, autosize=True, margin=dict(l=70, r=30, t=60, b=90),
                      legend=dict(orientation="h", y=-0.16), template="plotly_white")
    return fig


def _json(values: np.ndarray) -> list:
    """Nested lists with None where a value is NaN: a FigureWidget's messages are JSON, which
    has no NaN (plotly draws None as a gap)."""
    return np.where(np.isnan(values), None, values).tolist()


def _draw(fig: go.Figure, arrays: dict, layer: int, layer_name: str = "") -> None:
    """Put `arrays` into the figure's traces (inside fig.batch_update() for widgets)."""
    num_layers = len(arrays["coactivation"])
    if num_layers:
        step = int(arrays["steps"][-1])
        fig.layout.annotations[0].text = (f"{layer_name} at step {step}: tokens served by both "
                                          "experts (%)")
        fig.layout.annotations[1].text = f"{layer_name}: where each domain's routes go (%)"
        co = 100 * arrays["coactivation"][layer]
        np.fill_diagonal(co, np.nan)  # an expert with itself: its own share, off the scale
        fig.data[0].update(z=_json(co), x=np.arange(co.shape[1]), y=np.arange(co.shape[0]))
        share = 100 * arrays["domain_share"][layer]
        fig.data[1].update(z=share, x=np.arange(share.shape[1]), y=np.arange(share.shape[0]))
    for i in range(num_layers):
        fig.data[2 + 2 * i].update(x=arrays["steps"], y=100 * arrays["dead"][i])
        fig.data[3 + 2 * i].update(x=arrays["steps"], y=_json(arrays["selectivity"][i]))


def _layer_names(history: list[dict]) -> list[str]:
    return [f"MoE layer {i}" for i in range(len(history[-1]["layers"]))] if history else []


def specialisation_figure(history: list[dict], domain_names, layer: int = 0,
                          layer_names: list[str] | None = None) -> go.Figure:
    """A static figure of a probe's history."""
    names = layer_names or _layer_names(history)
    fig = _empty_figure(names, list(domain_names))
    _draw(fig, specialisation_arrays(history), layer, names[layer] if names else "")
    return fig


class SpecialisationView(LiveView):
    """Co-activation, domain selectivity and dead experts of every MoE layer, live.

    ``probe = SpecialisationProbe(corpus, every=10).attach(trainer)``;
    ``view = SpecialisationView().attach(probe); display(view); trainer.train()``.
    """

    def __init__(self, min_redraw_seconds: float = MIN_REDRAW_SECONDS) -> None:
        super().__init__(min_redraw_seconds)
        self.history: list[dict] = []
        self.domain_names: list[str] = []
        self.layer_names: list[str] = []
        self.layer_picker = widgets.Dropdown(description="heatmaps:")
        self.status = widgets.HTML()
        self.figure = go.FigureWidget(_empty_figure([], []))
        self.widget = bounded(widgets.HBox([self.layer_picker, self.status]), self.figure)
        self._building = False
        self.layer_picker.observe(lambda change: self._building or self.refresh(),
                                  names="value")

    def attach(self, probe) -> SpecialisationView:
        """Take the probe's history so far and every measurement after it."""
        self.domain_names = list(probe.domain_names)
        self.history = list(probe.history)
        self._rebuild(_layer_names(self.history))
        probe.subscribe(self.update, on_end=self.refresh)
        return self

    def _rebuild(self, layer_names: list[str]) -> None:
        """A new figure for these layers in the same widget (the old one closed)."""
        self.layer_names = layer_names
        self.figure.close()
        self.figure = go.FigureWidget(_empty_figure(layer_names, self.domain_names))
        self.widget.children = (self.widget.children[0], self.figure)
        self._building = True  # the picker's new options must not trigger a redraw
        try:
            self.layer_picker.options = [(name, i) for i, name in enumerate(layer_names)]
            self.layer_picker.value = 0 if layer_names else None
        finally:
            self._building = False
        self.refresh()

    def update(self, entry: dict) -> None:
        """Add one probe measurement; redraw if the last redraw is old enough."""
        self.history.append(entry)
        if len(entry["layers"]) != len(self.layer_names):
            self._rebuild(_layer_names(self.history))
        elif self.redraw_due():
            self.refresh()

    def refresh(self) -> None:
        """Redraw everything now, in one batch update."""
        arrays = specialisation_arrays(self.history)
        self._redraw_layer(_draw, arrays)
        if self.history:
            dead = ", ".join(f"{100 * v:.0f}%" for v in arrays["dead"][:, -1])
            chosen = ", ".join(f"{v:.2f}" for v in arrays["selectivity"][:, -1])
            self.status.value = (f"step {self.history[-1]['step']} · dead experts per layer "
                                 f"[{dead}] · selectivity [{chosen}]")
