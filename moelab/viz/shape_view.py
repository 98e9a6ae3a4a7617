"""ShapeView: a model's layers × experts drawn like the paper's PR-MoE figure (§4.1, Fig. 3).

Each block is a column: a dense block is one grey MLP; an MoE block is a stack of expert boxes
(drawn as a bar as tall as its expert count); Residual-MoE adds the fixed MLP beside the experts.
Several configs side by side show what Pyramid, Residual and Mixture-of-Students change, with
parameter counts from `moelab.sizing`.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..model import GPTConfig, preset
from ..sizing import ffn_params, size
from .fit import autosize, bounded
from .view import View

DENSE_COLOR, EXPERT_COLOR, RESIDUAL_COLOR = "#9e9e9e", "#2f5f98", "#ff7f0e"


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def block_ticks(num_blocks: int, max_ticks: int = 8) -> list[int]:
    """Block numbers to label on a panel's x axis: every block when few, else every step-th
    (step from 1, 2, 3, 4, 5, 6, 8, 10, ...) and block 1, at most about ``max_ticks`` labels."""
    steps = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 25, 32, 50, 64, 100)
    step = next((s for s in steps if math.ceil(num_blocks / s) <= max_ticks), steps[-1])
    ticks = list(range(step, num_blocks + 1, step))
    return ([1] if step > 2 else []) + ticks


def model_shape(config: GPTConfig) -> dict:
    """Per block: its kind, its expert count (0 = dense) and its FFN parameters; totals."""
    experts_by_layer = dict(zip(config.moe_layers, config.expert_schedule, strict=True))
    ffn = ffn_params(config.d_model, config.ffn_dim, config.moe.activation)
    blocks = []
    for layer in range(config.n_layer):
        num_experts = experts_by_layer.get(layer, 0)
        kind = "dense" if not num_experts else ("residual-moe" if config.moe.residual else "moe")
        params = ffn if not num_experts else num_experts * ffn + (ffn if config.moe.residual else 0)
        blocks.append({"block": layer + 1, "kind": kind, "experts": num_experts,
                       "ffn_params": params})
    sizes = size(config)
    return {"name": config.name, "blocks": blocks, "total": sizes.total, "active": sizes.active}


def shape_figure(configs: list[GPTConfig | str]) -> go.Figure:
    """One panel per config: blocks on x, experts per block on y (a pyramid grows at the top)."""
    configs = [preset(c) if isinstance(c, str) else c for c in configs]
    if not configs:
        raise ValueError("shape_figure needs at least one config or preset name")
    shapes = [model_shape(c) for c in configs]
    titles = [f"<b>{s['name']}</b><br>{_count(s['total'])} params, {_count(s['active'])} "
              f"active per token" for s in shapes]
    fig = make_subplots(rows=1, cols=len(configs), subplot_titles=titles, shared_yaxes=True,
                        horizontal_spacing=0.04)
    for col, shape in enumerate(shapes, start=1):
        blocks = shape["blocks"]
        x = [b["block"] for b in blocks]
        hover = [f"block {b['block']}: {b['kind']}, {b['experts'] or 'no'} experts, "
                 f"{_count(b['ffn_params'])} FFN params" for b in blocks]
        # Beside each block's experts, a bar of height 1 for a dense MLP: the block's only FFN
        # (grey) or the fixed MLP that Residual-MoE runs next to the experts (orange).
        fig.add_trace(go.Bar(x=x, y=[b["experts"] or None for b in blocks],
                             name="experts (bar height = count)", marker_color=EXPERT_COLOR,
                             hovertext=hover, hoverinfo="text", offsetgroup="experts",
                             showlegend=col == 1, legendgroup="experts"), row=1, col=col)
        for kind, color, label in (("dense", DENSE_COLOR, "dense MLP (a dense block)"),
                                   ("residual-moe", RESIDUAL_COLOR,
                                    "fixed MLP beside the experts (Residual-MoE)")):
            fig.add_trace(go.Bar(x=x, y=[1 if b["kind"] == kind else None for b in blocks],
                                 name=label, marker_color=color, hovertext=hover,
                                 hoverinfo="text", offsetgroup="mlp", showlegend=col == 1,
                                 legendgroup=kind), row=1, col=col)
        fig.update_xaxes(title_text="block", row=1, col=col, tickvals=block_ticks(len(blocks)))
    most = max(max(b["experts"] for b in s["blocks"]) for s in shapes)
    ticks = [2 ** i for i in range(most.bit_length() + 1)]
    fig.update_yaxes(type="log", tickvals=ticks, range=[-0.15, 0.15 + math.log10(max(most, 2))])
    fig.update_yaxes(title_text="experts in the block's FFN (log scale)", row=1, col=1)
    fig.update_layout(barmode="group", bargap=0.1, height=440, template="plotly_white",
                      legend=dict(orientation="h", y=-0.3), margin=dict(t=80, l=70, r=20, b=100))
    return autosize(fig)  # as wide as the output area


class ShapeView(View):
    """The paper's PR-MoE picture for one or more configs (names of presets or GPTConfigs)."""

    def __init__(self, *configs: GPTConfig | str) -> None:
        self.configs = [preset(c) if isinstance(c, str) else c for c in configs]
        self.shapes = [model_shape(c) for c in self.configs]
        self.figure = go.FigureWidget(shape_figure(self.configs))
        self.widget = bounded(self.figure)
