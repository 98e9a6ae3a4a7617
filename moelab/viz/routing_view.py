"""RoutingView: one Routing drawn for a learner, and re-routed live from a panel of controls.

Three layers, each usable alone:

- `routing_table(routing, tokens)`: the Routing as plain numpy arrays (what the figure draws),
  testable without plotly or widgets;
- `routing_figure(routing, tokens)`: a static plotly figure of it: a token × expert heatmap of
  router probabilities with the kept (○, ◇ for second choices) and dropped (✕) routes on top, and
  per-expert load bars (kept, dropped stacked above) against the capacity line;
- `RoutingView`: that figure as a ``go.FigureWidget`` plus ipywidgets controls that call
  `moelab.route` again on the *same* tokens (fixed logits, or a Router and its input x); the
  controls are made from `moelab.RouterConfig`'s fields.

The view only reads Routing fields; it never changes the router or the logits it was given.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Sequence

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor
from traitlets import TraitError

from ..router import Router, RouterConfig, gate_logits, route, uses_selection_bias
from ..routing import Routing
from .fit import autosize, bounded
from .view import View

MAX_TOKENS = 64  # heatmap rows; more tokens than this are routed and counted, but not drawn

# Colours: a sequential scale for probabilities; kept routes white-filled markers with a dark
# rim (visible on pale and dark cells alike); dropped routes a red cross, the same red as the
# dropped part of the load bars.
PROB_COLORSCALE = "Blues"
KEPT_COLOR = "#2f5f98"
DROPPED_COLOR = "#d62728"
CAPACITY_COLOR = "#222222"
CHOICE_SYMBOLS = ("circle", "diamond", "square", "triangle-up", "pentagon", "hexagon", "star")



# ------------------------------------------------------------------------------------- data

def token_labels(tokens: str | Sequence | None, num_tokens: int) -> list[str]:
    """Printable row labels: characters or words as given (whitespace made visible), else the
    token's index."""
    if tokens is None:
        return [str(i) for i in range(num_tokens)]
    labels = list(tokens)
    if len(labels) != num_tokens:
        raise ValueError(f"tokens must give one label per routed token ({num_tokens}); "
                         f"got {len(labels)}")
    visible = {" ": "␣", "\n": "↵", "\t": "⇥", "": "∅"}
    out = []
    for label in labels:
        text = str(label)
        text = visible.get(text, text.replace("\n", "↵").replace("\t", "⇥"))
        out.append(text if len(text) <= 14 else text[:13] + "…")
    return out


def routing_table(routing: Routing, tokens: str | Sequence | None = None,
                  max_tokens: int = MAX_TOKENS) -> dict:
    """The arrays a routing figure needs, as numpy (no widgets, no plotly).

    Keys:
        labels [shown] str, probs [shown, E]: heatmap rows (the first ``shown`` tokens).
        kept_token / kept_expert / kept_choice / kept_slot / kept_weight: one entry per kept
            route among the shown tokens (choice j is the token's j-th pick; for expert choice
            it is the expert's column and says nothing about preference).
        dropped_token / dropped_expert / dropped_choice: the same for dropped routes.
        load [E]: routes each expert processes (all tokens); dropped [E]: routes it was asked
            for but had no slot for; counts [E]: asked for, before dropping (= load + dropped
            for token choice).
        capacity (int or None), num_tokens, num_experts, k, shown, truncated, drop_fraction,
        aux_loss, z_loss, expert_choice, unpicked (tokens no expert took, expert choice only).
    """
    num_tokens, num_experts, k = routing.num_tokens, routing.num_experts, routing.k
    shown = min(num_tokens, max_tokens)
    expert = routing.expert.detach().cpu().numpy()  # [S, k]
    slot = routing.slot.detach().cpu().numpy()  # [S, k]
    weight = routing.weight.detach().float().cpu().numpy()  # [S, k]
    probs = routing.probs.detach().float().cpu().numpy()  # [S, E]
    kept = slot >= 0
    # With expert choice every (token, expert) cell is a column of the table; an unpicked cell
    # is not a request that was refused, so nothing counts as dropped.
    dropped = np.zeros_like(kept) if routing.expert_choice else ~kept
    token = np.broadcast_to(np.arange(num_tokens)[:, None], expert.shape)
    choice = np.broadcast_to(np.arange(k)[None, :], expert.shape)
    in_view = token < shown
    keep_shown, drop_shown = kept & in_view, dropped & in_view
    return dict(
        labels=np.array(token_labels(tokens, num_tokens)[:shown], dtype=object),
        probs=probs[:shown],
        kept_token=token[keep_shown], kept_expert=expert[keep_shown],
        kept_choice=choice[keep_shown], kept_slot=slot[keep_shown],
        kept_weight=weight[keep_shown],
        dropped_token=token[drop_shown], dropped_expert=expert[drop_shown],
        dropped_choice=choice[drop_shown],
        load=np.bincount(expert[kept], minlength=num_experts),
        dropped=np.bincount(expert[dropped], minlength=num_experts),
        counts=routing.counts.detach().cpu().numpy(),
        capacity=routing.capacity,
        num_tokens=num_tokens, num_experts=num_experts, k=k,
        shown=shown, truncated=shown < num_tokens,
        drop_fraction=routing.drop_fraction,
        aux_loss=float(routing.aux_loss.detach()), z_loss=float(routing.z_loss.detach()),
        expert_choice=routing.expert_choice,
        unpicked=int((~kept.any(axis=1)).sum()) if routing.expert_choice else 0,
    )


def _ordinal(j: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(j, f"{j}th")


def _hover_text(table: dict) -> np.ndarray:
    """[shown, E] hover strings: token, expert, probability and what happened to the route."""
    shown, num_experts = table["probs"].shape
    status = np.full((shown, num_experts), "not chosen", dtype=object)
    for s, e, j, c, w in zip(table["kept_token"], table["kept_expert"], table["kept_choice"],
                             table["kept_slot"], table["kept_weight"], strict=True):
        who = "picked by this expert" if table["expert_choice"] else f"{_ordinal(j + 1)} choice"
        status[s, e] = f"{who}: kept in slot {c}, combine weight {w:.3f}"
    for s, e, j in zip(table["dropped_token"], table["dropped_expert"], table["dropped_choice"],
                       strict=True):
        status[s, e] = f"{_ordinal(j + 1)} choice: DROPPED (expert full), weight 0"
    if table["expert_choice"]:
        status[status == "not chosen"] = "not picked by this expert"
    text = np.empty((shown, num_experts), dtype=object)
    for s in range(shown):
        for e in range(num_experts):
            text[s, e] = (f"token {s} '{table['labels'][s]}' → expert {e}<br>"
                          f"router probability {table['probs'][s, e]:.3f}<br>{status[s, e]}")
    return text


def _title(table: dict) -> str:
    cap = table["capacity"]
    asked = int(table["counts"].sum())
    if table["expert_choice"]:
        what = (f"expert choice: each expert takes its top C = {cap} tokens · "
                f"{table['unpicked']}/{table['num_tokens']} tokens picked by no expert")
    elif cap is None:
        what = f"dropless (no capacity) · all {asked} routes kept"
    else:
        dropped = int(table["dropped"].sum())
        what = (f"capacity C = {cap} slots per expert · {dropped}/{asked} routes dropped "
                f"({100 * table['drop_fraction']:.1f}%)")
    if table["truncated"]:
        what += (f" · rows: first {table['shown']} of {table['num_tokens']} tokens "
                 f"(the bars count all)")
    routing = "expert-choice" if table["expert_choice"] else f"top-{table['k']}"
    return (f"<b>Where each token goes</b>: {routing} routing of {table['num_tokens']} tokens "
            f"over {table['num_experts']} experts"
            f"<br><span style='font-size:13px'>{what}</span>")


def _capacity_line(table: dict) -> tuple[list, list, str]:
    cap, num_experts = table["capacity"], table["num_experts"]
    if cap is None:
        return [], [], "capacity: none (dropless)"
    return [-0.5, num_experts - 0.5], [cap, cap], f"capacity C = {cap}"


def _figure_height(shown: int) -> int:
    return int(min(1040, max(480, 220 + 12.5 * shown)))


def routing_figure(routing: Routing, tokens: str | Sequence | None = None,
                   max_tokens: int = MAX_TOKENS) -> go.Figure:
    """A static plotly figure of one Routing (the figure RoutingView keeps live)."""
    return _figure_from_table(routing_table(routing, tokens, max_tokens))


def _figure_from_table(table: dict) -> go.Figure:
    num_experts = table["num_experts"]
    experts = np.arange(num_experts)
    fig = make_subplots(
        rows=1, cols=2, column_widths=[0.56, 0.44], horizontal_spacing=0.16,
        subplot_titles=("router probability per token (row) and expert (column)",
                        "routes per expert: kept, dropped, capacity"),
    )
    fig.add_trace(go.Heatmap(
        name="router probability", colorscale=PROB_COLORSCALE, zmin=0.0,
        colorbar=dict(title=dict(text="router<br>probability", side="top"), x=0.47,
                      thickness=12, len=0.75, y=0.5),
        xgap=1, ygap=1, hovertemplate="%{text}<extra></extra>",
    ), row=1, col=1)
    # Markers fit inside a heatmap cell: ~12 px per row, ~420 px shared by the experts.
    cell = min(420 / num_experts, 12.5)
    fig.add_trace(go.Scatter(
        name="kept route (○ 1st choice, ◇ 2nd)", mode="markers", hoverinfo="skip",
        marker=dict(color="white", size=max(4.0, min(9.0, 0.75 * cell)),
                    line=dict(color="#111111", width=1.5 if cell > 8 else 1.0)),
    ), row=1, col=1)
    fig.add_trace(go.Scatter(
        name="dropped route (expert over capacity)", mode="markers", hoverinfo="skip",
        marker=dict(symbol="x", color=DROPPED_COLOR, size=max(5.0, min(11.0, 0.9 * cell)),
                    line=dict(color="white", width=1)),
    ), row=1, col=1)
    fig.add_trace(go.Bar(name="kept routes (processed)", x=experts, marker_color=KEPT_COLOR,
                         hovertemplate="expert %{x}: %{y} kept<extra></extra>"), row=1, col=2)
    fig.add_trace(go.Bar(name="dropped routes", x=experts, marker_color=DROPPED_COLOR,
                         hovertemplate="expert %{x}: %{y} dropped<extra></extra>"), row=1, col=2)
    fig.add_trace(go.Scatter(name="capacity", mode="lines", hoverinfo="name",
                             line=dict(color=CAPACITY_COLOR, width=2, dash="dash")),
                  row=1, col=2)
    if num_experts <= 16:  # every expert labelled; beyond that, let plotly space the ticks
        tick = dict(tickmode="array", tickvals=experts, ticktext=[str(e) for e in experts])
    else:
        tick = dict(tickmode="auto", nticks=16)
    fig.update_xaxes(title_text="expert", side="bottom", range=[-0.5, num_experts - 0.5],
                     **tick, row=1, col=1)
    fig.update_yaxes(title_text="token", autorange="reversed", tickmode="array",
                     tickfont=dict(size=10, family="DejaVu Sans Mono, monospace"), row=1, col=1)
    fig.update_xaxes(title_text="expert", range=[-0.5, num_experts - 0.5], **tick, row=1, col=2)
    fig.update_yaxes(title_text="routes (token, choice) per expert", rangemode="tozero",
                     row=1, col=2)
    fig.update_layout(
        barmode="stack", template="plotly_white", height=_figure_height(table["shown"]),
        margin=dict(l=70, r=30, t=110, b=95), font=dict(size=12),
        legend=dict(orientation="h", x=0.0, xanchor="left", yref="container", y=0.0,
                    yanchor="bottom", font=dict(size=11), traceorder="normal"),
        hovermode="closest",
    )
    _update_figure(fig, table)
    return autosize(fig)  # as wide as the output area


def _update_figure(fig: go.Figure, table: dict) -> None:
    """Copy one routing_table into the six traces and the titles of a routing figure."""
    heatmap, kept, dropped, kept_bars, dropped_bars, capacity = fig.data
    shown = table["shown"]
    rows = np.arange(shown)
    heatmap.update(z=table["probs"], x=np.arange(table["num_experts"]), y=rows,
                   text=_hover_text(table), zmax=max(float(table["probs"].max()), 1e-6))
    symbols = [CHOICE_SYMBOLS[min(j, len(CHOICE_SYMBOLS) - 1)] for j in table["kept_choice"]]
    if table["expert_choice"]:
        symbols = ["circle"] * len(symbols)
    kept.update(x=table["kept_expert"], y=table["kept_token"], marker_symbol=symbols,
                name="picked (expert choice)" if table["expert_choice"] else
                ("kept route (○ 1st choice, ◇ 2nd)" if table["k"] > 1 else "kept route"))
    dropped.update(x=table["dropped_expert"], y=table["dropped_token"])
    kept_bars.update(y=table["load"])
    dropped_bars.update(y=table["dropped"])
    line_x, line_y, line_name = _capacity_line(table)
    capacity.update(x=line_x, y=line_y, name=line_name, visible=table["capacity"] is not None)
    fig.update_yaxes(tickvals=rows, ticktext=list(table["labels"]), range=[shown - 0.5, -0.5],
                     autorange=False, row=1, col=1)
    top = max(int((table["load"] + table["dropped"]).max()), table["capacity"] or 0, 1)
    fig.update_yaxes(range=[0, top * 1.12], autorange=False, row=1, col=2)
    fig.update_layout(title=dict(text=_title(table), x=0.01, xanchor="left", yref="container",
                                 y=1.0, yanchor="top", pad=dict(t=14)))


# ------------------------------------------------------------------------------------ view

def _summary_html(table: dict, config: RouterConfig) -> str:
    cap = table["capacity"]
    if table["expert_choice"]:
        cap_text = f"{cap} tokens per expert (expert choice)"
    elif cap is None:
        cap_text = "none: dropless, every route kept"
    else:
        cap_text = (f"{cap} = max(⌈S/E·cf·k⌉, min) = max(⌈{table['num_tokens']}/"
                    f"{table['num_experts']}·{config.capacity_factor:g}·{table['k']}⌉, "
                    f"{config.min_capacity})")
    asked = int(table["counts"].sum())
    if table["expert_choice"]:
        drop_text = (f"{table['unpicked']} of {table['num_tokens']} tokens picked by no "
                     f"expert ({100 * table['drop_fraction']:.1f}%)")
    else:
        drop_text = (f"{int(table['dropped'].sum())} of {asked} routes "
                     f"({100 * table['drop_fraction']:.1f}%)")
    rows = [
        ("tokens × experts", f"S = {table['num_tokens']}, E = {table['num_experts']}, "
                             f"k = {table['k']}"),
        ("capacity C", cap_text),
        ("dropped", drop_text),
        ("aux loss l_aux", f"{table['aux_loss']:.4f} (1 when balanced, and also whenever the "
                           f"probabilities are uniform)"),
        ("router z-loss", f"{table['z_loss']:.4f}"),
    ]
    body = "".join(f"<tr><td style='padding-right:10px;color:#555;white-space:nowrap;"
                   f"vertical-align:top'>{html.escape(name)}</td>"
                   f"<td><b>{html.escape(value)}</b></td></tr>" for name, value in rows)
    return f"<table style='font-size:13px;line-height:1.5'>{body}</table>"


def _error_html(message: str) -> str:
    return ("<div style='color:#a40000;background:#fdecea;border-left:4px solid #d62728;"
            "padding:6px 10px;font-size:13px;line-height:1.4'>"
            f"<b>These options cannot route</b> (the figure still shows the last valid "
            f"routing):<br>{html.escape(message)}</div>")


#: RouterConfig fields the view has no control for: it routes with one capacity factor in both
#: modes; it shows a router's selection bias as it was (it cannot run the bias updates); and a
#: gate bias is part of the router's weights, not a way of routing.
NOT_CONTROLS = ("eval_capacity_factor", "bias_update_rate", "use_selection_bias", "router_bias")
#: Slider ranges (min, max, step) for numeric options; any other numeric option gets a text box.
SLIDERS = {"k": (1, None, 1), "capacity_factor": (0.25, 4.0, 0.25), "min_capacity": (0, 16, 1)}
#: Friendlier names for some choices; any other choice shows its value.
CHOICE_LABELS = {
    "choice": {"token": "tokens pick top-k experts", "expert": "experts pick tokens"},
    "drop_policy": {"position": "by position (earlier first)",
                    "probs": "by probability (surer first)"},
    "noisy_gate_policy": {"RSample": "RSample (k=1 only)"},
    "renormalize": {None: "DeepSpeed's (k > 1)", True: "always", False: "never"},
}
VIEW_OPTIONS = ("training", "seed")  # the view's own, beside RouterConfig's


def _controlled_fields() -> list:
    return [f for f in dataclasses.fields(RouterConfig) if f.name not in NOT_CONTROLS]


class RoutingView(View):
    """A live view of one Routing of fixed tokens, with controls that re-route them.

    Build it with `RoutingView.from_logits(logits)` (gate logits [S, E]) or
    `RoutingView.from_router(router, x)` (a Router, or an MoE layer, and its input [S, d]; only
    this form can show Jitter, which perturbs the router *input*). The controls are made from
    `moelab.RouterConfig`'s fields (a new routing option gets a control), plus ``training`` and
    ``seed``. Each change of a control calls `set_options`, which routes the same tokens again
    and redraws the figure in one ``batch_update``. Options that cannot route (RSample with
    k > 1, say) leave the last valid routing drawn and show the error in the panel.

    Attributes: ``widget`` (the ipywidgets box to display), ``figure`` (the go.FigureWidget),
    ``routing`` (the Routing drawn), ``table`` (its `routing_table`), ``config`` (the
    RouterConfig it was routed with), ``training`` and ``seed``, ``error`` (the message of the
    last rejected options, or None), ``controls`` (option name -> its widget), ``summary`` and
    ``message`` (the HTML widgets with the numbers and with the error).
    """

    def __init__(self, logits: Tensor, tokens: str | Sequence | None = None, *,
                 router: Router | None = None, x: Tensor | None = None,
                 max_tokens: int = MAX_TOKENS, config: RouterConfig | None = None,
                 **options) -> None:
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise ValueError("logits must be a 2-D tensor [tokens, experts]")
        # Snapshots on the CPU: the view re-routes these exact tokens whatever happens to the
        # router afterwards (more training, another device).
        self._logits = logits.detach().float().cpu()
        self._x = None if x is None else x.detach().float().cpu()
        self._gate_weight = self._gate_bias = self._selection_bias = None
        if router is not None:
            self._gate_weight = router.weight.detach().float().cpu()
            if router.bias is not None:  # gpt-oss's gate has one
                self._gate_bias = router.bias.detach().float().cpu()
            if uses_selection_bias(router.config):  # the aux-free bias, or DeepSeek-V3's fixed one
                self._selection_bias = router.selection_bias.detach().float().cpu().clone()
        num_tokens, self.num_experts = self._logits.shape
        self.tokens = tokens
        token_labels(tokens, num_tokens)  # validate the length now
        self.max_tokens = max_tokens
        # The requested value of every control (valid together or not), by option name.
        base = config or RouterConfig()
        self._requested = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        self._requested.update(training=True, seed=0)
        self._check_names(options)
        self._requested.update(options)
        self.config: RouterConfig | None = None
        self.routing: Routing | None = None
        self.table: dict | None = None
        self.error: str | None = None
        self._syncing = False
        self._build_controls()
        self.refresh()
        if self.routing is None:  # the initial options cannot route: a caller's mistake
            raise ValueError(self.error)
        self.figure = go.FigureWidget(_figure_from_table(self.table))
        self.widget = bounded(
            widgets.HBox([self._control_box,
                          widgets.VBox([self.summary, self.message],
                                       layout=widgets.Layout(margin="0 0 0 24px"))],
                         layout=widgets.Layout(align_items="flex-start", flex_flow="row wrap")),
            self.figure)

    # ---- constructors

    @classmethod
    def from_logits(cls, logits: Tensor, tokens: str | Sequence | None = None,
                    **options) -> RoutingView:
        """A view of gate logits [S, E]; ``options`` are RouterConfig options by name (or
        ``config=``), ``training`` and ``seed``."""
        return cls(logits, tokens, **options)

    @classmethod
    def from_router(cls, router, x: Tensor, tokens: str | Sequence | None = None,
                    **options) -> RoutingView:
        """A view of a Router (or anything with a ``.router``, such as an MoE layer) on input x
        [..., d]. The controls start at the router's own config and mode (its capacity factor
        for that mode); ``options`` override them. The router is only read, never changed."""
        router = getattr(router, "router", router)
        if not isinstance(router, Router):
            raise TypeError(f"from_router needs a moelab Router or MoE; got {type(router)}")
        x = x.detach().reshape(-1, router.d_model).float().cpu()
        config = router.config.replace(
            capacity_factor=router.config.capacity_factor_for(router.training),
            eval_capacity_factor=None)
        with torch.no_grad():
            bias = None if router.bias is None else router.bias.detach().cpu()
            logits = gate_logits(x, router.weight.detach().cpu(), bias=bias)  # clean  [S, E]
        return cls(logits, tokens, router=router, x=x, config=config,
                   **{"training": router.training, **options})

    # ---- routing

    @property
    def training(self) -> bool:
        return self._requested["training"]

    @property
    def seed(self) -> int:
        return self._requested["seed"]

    @staticmethod
    def _check_names(options: dict) -> None:
        valid = [f.name for f in _controlled_fields()] + list(VIEW_OPTIONS)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(f"unknown RoutingView option(s) {unknown}; valid: {valid}")

    def _route(self) -> tuple[RouterConfig, Routing]:
        requested = dict(self._requested)
        training, seed = requested.pop("training"), requested.pop("seed")
        config = RouterConfig(**requested)
        generator = torch.Generator().manual_seed(int(seed))
        logits = self._logits
        if config.noisy_gate_policy == "Jitter":
            if self._x is None:
                raise ValueError("Jitter multiplies the router input x by U(1-ε, 1+ε), and "
                                 "this view was built from logits only; build it with "
                                 "RoutingView.from_router(router, x) to see Jitter.")
            if training:  # applied here, to the input, as Router does
                with torch.no_grad():
                    logits = gate_logits(self._x, self._gate_weight, jitter=True,
                                         generator=generator, bias=self._gate_bias)
        routing = route(logits, config, training=training, generator=generator,
                        selection_bias=self._selection_bias)
        return config, routing

    def set_options(self, **options) -> Routing | None:
        """Re-route the same tokens with new RouterConfig options (and/or ``training``,
        ``seed``); update the controls and redraw. Returns the new Routing, or None when the
        options cannot route (the message is then in ``error`` and in the panel)."""
        self._check_names(options)
        self._requested.update(options)
        self._sync_controls()
        return self.refresh()

    def refresh(self) -> Routing | None:
        try:
            config, routing = self._route()
        except ValueError as err:
            self.error = str(err)
            self.message.value = _error_html(self.error)
            self.message.layout.display = None
            return None
        self.error = None
        self.message.value = ""
        self.message.layout.display = "none"
        self.config, self.routing = config, routing
        self.table = routing_table(routing, self.tokens, self.max_tokens)
        self.summary.value = _summary_html(self.table, config)
        if hasattr(self, "figure"):
            with self.figure.batch_update():
                _update_figure(self.figure, self.table)
        return routing

    # ---- controls

    def _control_for(self, f) -> widgets.Widget:
        """A widget for one RouterConfig field, from its declaration."""
        meta = f.metadata
        label = meta.get("label") or f.name.replace("_", " ")
        style = {"description_width": "118px"}
        wide = widgets.Layout(width="330px")
        tooltip = meta.get("doc", "")
        if meta["kind"] == "bool" and not meta.get("optional"):
            return widgets.Checkbox(description=label, indent=False, tooltip=tooltip)
        if meta["kind"] in ("choice", "bool"):
            choices = meta["choices"] if meta["kind"] == "choice" else (None, True, False)
            names = CHOICE_LABELS.get(f.name, {})
            if f.name == "noisy_gate_policy" and self._x is None:
                names = {**names, "Jitter": "Jitter (needs a Router)"}
            # a Dropdown's value None means "nothing selected": None travels as "None"
            return widgets.Dropdown(options=[(names.get(c, str(c)), "None" if c is None else c)
                                             for c in choices],
                                    description=label, style=style, layout=wide)
        current = self._requested[f.name]
        if f.name in SLIDERS:
            low, high, step = SLIDERS[f.name]
            high = self.num_experts if f.name == "k" else max(high, current)
            kind = widgets.IntSlider if meta["kind"] == "int" else widgets.FloatSlider
            extra = {} if meta["kind"] == "int" else {"readout_format": ".2f"}
            return kind(min=low, max=high, step=step, description=label, style=style,
                        layout=wide, continuous_update=False, **extra)
        kind = widgets.IntText if meta["kind"] == "int" else widgets.FloatText
        return kind(description=label, style=style, layout=wide)

    def _build_controls(self) -> None:
        self.controls = {f.name: self._control_for(f) for f in _controlled_fields()}
        self.controls["training"] = widgets.Checkbox(
            description="training (noise, RTS, sampling on)", indent=False)
        self.controls["seed"] = widgets.IntText(description="seed",
                                                style={"description_width": "40px"},
                                                layout=widgets.Layout(width="130px"))
        self._resample = widgets.Button(description="resample", icon="refresh",
                                        tooltip="new seed: new noise, RTS and sampling draws",
                                        layout=widgets.Layout(width="110px"))
        self._resample.on_click(lambda _: self.set_options(seed=self.seed + 1))
        for name, widget in self.controls.items():
            widget.observe(lambda change, name=name: self._on_control(name, change["new"]),
                           names="value")
        boxes = [w for n, w in self.controls.items() if isinstance(w, widgets.Checkbox)]
        others = [w for n, w in self.controls.items()
                  if not isinstance(w, widgets.Checkbox) and n != "seed"]
        self._control_box = widgets.HBox([
            widgets.VBox(others),
            widgets.VBox([*boxes, widgets.HBox([self.controls["seed"], self._resample])],
                         layout=widgets.Layout(width="290px", margin="0 0 0 16px")),
        ], layout=widgets.Layout(flex_flow="row wrap"))
        self.summary = widgets.HTML(layout=widgets.Layout(width="380px"))
        self.message = widgets.HTML(layout=widgets.Layout(display="none", width="380px"))
        self._sync_controls()

    def _on_control(self, name: str, value) -> None:
        if not self._syncing:
            self.set_options(**{name: None if value == "None" else value})

    def _sync_controls(self) -> None:
        """Show the requested options on the controls (without re-routing per control) and
        grey out the controls that cannot change the routing under the other options."""
        values, w = self._requested, self.controls
        self._syncing = True
        try:
            for name, widget in w.items():
                value = "None" if values[name] is None else values[name]
                if isinstance(widget, widgets.Dropdown) and \
                        value not in [v for _, v in widget.options]:
                    continue  # an invalid value: routing reports it; the control keeps its own
                try:
                    widget.value = value
                except TraitError:  # a value the control cannot hold: routing judges it
                    pass
        finally:
            self._syncing = False
        token_choice = values["choice"] == "token"
        drops = values["drop_tokens"] or not token_choice
        rts_active = (values["training"] and values["k"] == 1 and values["drop_tokens"]
                      and token_choice)
        w["use_rts"].disabled = not rts_active
        w["noisy_gate_policy"].disabled = not values["training"]
        w["second_expert_sampling"].disabled = not (values["training"] and values["k"] == 2
                                                    and token_choice)
        w["drop_policy"].disabled = not (values["drop_tokens"] and token_choice) or \
            (rts_active and values["use_rts"])
        w["capacity_factor"].disabled = not drops
        w["min_capacity"].disabled = not drops
        w["drop_tokens"].disabled = not token_choice

    # ---- display

    def __repr__(self) -> str:
        state = "invalid options" if self.error else f"capacity={self.table['capacity']}"
        return (f"RoutingView(S={self.table['num_tokens']}, E={self.num_experts}, "
                f"k={self.table['k']}, {state})")
