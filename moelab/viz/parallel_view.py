"""ParallelView: expert parallelism drawn from what the ranks report, live during a launch.

Four panels: which rank holds which expert (colour: tokens routed to it), the rank × rank token
traffic of the last exchange (tokens or bytes), messages each rank sent per forward for every
exchange seen (flat, hierarchical, TP-coordinated) against the paper's formulas, and the load
each rank's experts carried.

- `parallel_data(records)`: the traffic records (see `moelab.examples.parallel_demo`) as numpy
  arrays, testable without widgets;
- `parallel_figure(records)`: the static plotly figure;
- `ParallelView`: that figure as a FigureWidget, fed live by the ranks:
  ``launch("moelab.examples.parallel_demo:train_with_reports", 4, on_metric=view.update)``;
  it redraws in one batch update at most a few times a second (``view.refresh()`` draws the
  last state).

A record is one rank's report for one forward of one MoE layer: ``rank, step, layer, exchange,
world, ep_size, tp_size, node_size, num_experts, experts, ep_group, traffic (W rows sent to each
rank), row_bytes, expert_load (E routes kept), messages, bytes_sent, loss``. Only ``step``,
``world``, ``num_experts`` and ``traffic`` are required; the rest have defaults (flat exchange,
ep_size = world, the experts-first layout of `moelab.parallel.parallel_layout`).
"""

from __future__ import annotations

import threading

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..exchanges import EXCHANGES, messages_per_forward
from ..parallel.groups import parallel_layout
from .fit import bounded
from .view import MIN_REDRAW_SECONDS, LiveView

EXCHANGE_COLORS = {"flat": "#1f77b4", "hierarchical": "#ff7f0e", "tp_coordinated": "#2ca02c"}
EXCHANGE_TITLES = {"flat": "flat all-to-all", "hierarchical": "hierarchical (Fig. 8)",
                   "tp_coordinated": "TP-coordinated (Fig. 9)"}
FORMULA_TEXT = {"flat": "2(p−1)", "hierarchical": "2((G−1)+(p/G−1))",
                "tp_coordinated": "2(p/L−1)+(L−1)"}
UNITS = ("rows", "bytes")  # rows: token rows of the dispatched buffer (padding included)


# ------------------------------------------------------------------------------------- data

def _fill(record: dict) -> dict:
    """A record with the optional fields defaulted."""
    world = int(record["world"])
    out = {"layer": 0, "exchange": "flat", "ep_size": world, "tp_size": 1, "node_size": None,
           "row_bytes": 0, "expert_load": None, "messages": None, "bytes_sent": None,
           "loss": None, "experts": None, "ep_group": None, **record}
    tp_size, ep_size, rank = int(out["tp_size"]), int(out["ep_size"]), int(out["rank"])
    num_experts = int(out["num_experts"])
    if out["experts"] is None or out["ep_group"] is None:
        if tp_size > 1:  # rank = t·L + lane; EP group = one lane; experts = slice t
            lane, t = rank % tp_size, rank // tp_size
            per = num_experts // ep_size
            experts, group = range(t * per, (t + 1) * per), range(lane, world, tp_size)
        else:
            layout = parallel_layout(world, ep_size)
            experts = layout.local_experts(rank, num_experts)
            group = layout.ep_group_of(rank)
        out["experts"] = list(experts) if out["experts"] is None else out["experts"]
        out["ep_group"] = list(group) if out["ep_group"] is None else out["ep_group"]
    return out


def _pick(records: list[dict]) -> tuple[int | None, dict[int, dict]]:
    """The latest step every rank reported (else each rank's latest record): {rank: record}."""
    world = int(records[-1]["world"])
    by_step: dict[int, dict[int, dict]] = {}
    for record in records:
        by_step.setdefault(int(record["step"]), {})[int(record["rank"])] = record
    complete = [step for step, ranks in by_step.items() if len(ranks) == world]
    if complete:
        step = max(complete)
        return step, by_step[step]
    latest: dict[int, dict] = {}
    for record in records:
        latest[int(record["rank"])] = record
    return None, latest


def parallel_data(records: list[dict], layer: int | None = None,
                  exchange: str | None = None) -> dict:
    """Arrays for the figure from traffic records (each with its ``rank``).

    The traffic, placement and load panels show one (exchange, layer): by default those of the
    last record, at the latest step that every rank reported. The messages panel shows every
    exchange seen for that layer and world size, from each rank's latest record.

    Keys: world W, num_experts E, exchange, layer, step (None while a step is incomplete),
    reported [W] bool; placement [W, E] bool (rank holds expert); expert_tokens [E] routes kept
    per expert, each token group counted once (TP lanes share their tokens); traffic [W, W]
    rows sent src -> dst and traffic_bytes [W, W]; rows_received [W] (capacity padding
    included); rank_tokens [W] routes its expert-parallel group sent to its experts;
    messages {exchange: [W]} measured per forward (NaN where unknown) and bytes_sent likewise;
    formula {exchange: messages per forward by formula}; settings {exchange: (node_size,
    tp_size)}; loss (mean over ranks at that step or None); losses (steps, mean loss) history.
    """
    if not records:
        return {"world": 0, "num_experts": 0, "exchange": None, "layer": 0, "step": None,
                "reported": np.zeros(0, bool), "placement": np.zeros((0, 0), bool),
                "expert_tokens": np.zeros(0), "traffic": np.zeros((0, 0)),
                "traffic_bytes": np.zeros((0, 0)), "rows_received": np.zeros(0),
                "rank_tokens": np.zeros(0), "messages": {}, "bytes_sent": {}, "formula": {},
                "settings": {}, "loss": None, "losses": (np.zeros(0), np.zeros(0))}
    records = [_fill(r) for r in records]
    last = records[-1]
    layer = last["layer"] if layer is None else layer
    exchange = last["exchange"] if exchange is None else exchange
    world, num_experts = int(last["world"]), int(last["num_experts"])
    same_run = [r for r in records if r["layer"] == layer and int(r["world"]) == world]
    current = [r for r in same_run if r["exchange"] == exchange]
    if not current:
        raise ValueError(f"no records for exchange {exchange!r} and layer {layer}")
    step, chosen = _pick(current)

    reported = np.zeros(world, bool)
    placement = np.zeros((world, num_experts), bool)
    traffic = np.zeros((world, world), dtype=np.int64)
    row_bytes = np.zeros(world, dtype=np.int64)
    loads = np.zeros((world, num_experts))
    for rank in range(world):
        record = chosen.get(rank) or _fill({**current[-1], "rank": rank, "experts": None,
                                            "ep_group": None})
        placement[rank, record["experts"]] = True
        if rank in chosen:
            reported[rank] = True
            traffic[rank] = np.asarray(record["traffic"], dtype=np.int64)
            row_bytes[rank] = int(record["row_bytes"])
            if record["expert_load"] is not None:
                loads[rank] = np.asarray(record["expert_load"], dtype=float)
    tp_size = int(current[-1]["tp_size"])
    rank_tokens = np.zeros(world)
    for rank in range(world):
        record = chosen.get(rank) or _fill({**current[-1], "rank": rank, "experts": None,
                                            "ep_group": None})
        rank_tokens[rank] = loads[np.ix_(record["ep_group"], record["experts"])].sum()

    messages, bytes_sent, formula, settings = {}, {}, {}, {}
    for name in EXCHANGES:
        mine = [r for r in same_run if r["exchange"] == name]
        if not mine:
            continue
        measured, sent = np.full(world, np.nan), np.full(world, np.nan)
        for record in mine:  # later records overwrite earlier ones
            if record["messages"] is not None:
                measured[int(record["rank"])] = record["messages"]
            if record["bytes_sent"] is not None:
                sent[int(record["rank"])] = record["bytes_sent"]
        messages[name], bytes_sent[name] = measured, sent
        node_size, lanes = mine[-1]["node_size"], int(mine[-1]["tp_size"])
        settings[name] = (node_size, lanes)
        formula[name] = messages_per_forward(world, name, node_size, lanes)

    history: dict[int, list[float]] = {}
    for record in current:
        if record["loss"] is not None:
            history.setdefault(int(record["step"]), []).append(float(record["loss"]))
    loss_steps = np.array(sorted(history))
    loss_values = np.array([np.mean(history[s]) for s in sorted(history)])
    at_step = [float(r["loss"]) for r in chosen.values() if r["loss"] is not None]
    return {
        "world": world, "num_experts": num_experts, "exchange": exchange, "layer": layer,
        "step": step, "reported": reported, "placement": placement,
        "expert_tokens": loads.sum(axis=0) / tp_size,
        "traffic": traffic, "traffic_bytes": traffic * row_bytes[:, None],
        "rows_received": traffic.sum(axis=0), "rank_tokens": rank_tokens,
        "messages": messages, "bytes_sent": bytes_sent, "formula": formula,
        "settings": settings, "loss": float(np.mean(at_step)) if at_step else None,
        "losses": (loss_steps, loss_values),
    }


def _json_safe(values) -> list:
    """NaN -> None, so that a FigureWidget can send the values as JSON (NaN is not JSON)."""
    array = np.asarray(values, dtype=float)
    if array.ndim > 1:
        return [_json_safe(row) for row in array]
    return [None if np.isnan(v) else float(v) for v in array]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# ----------------------------------------------------------------------------------- figure

def _empty_figure() -> go.Figure:
    fig = make_subplots(
        rows=2, cols=2, horizontal_spacing=0.16, vertical_spacing=0.2,
        subplot_titles=("which rank holds which expert", "rows sent, rank → rank",
                        "messages each rank sent per forward", "load per rank"))
    fig.add_trace(go.Heatmap(  # 0: placement
        z=[[None]], colorscale="Blues", zmin=0, xgap=2, ygap=2, texttemplate="%{text}",
        colorbar=dict(title=dict(text="routes", side="top"), x=0.42, y=0.8, len=0.4,
                      thickness=10),
        hovertemplate="rank %{y} · %{text}<br>%{z:.0f} tokens routed to it<extra></extra>"),
        row=1, col=1)
    fig.add_trace(go.Heatmap(  # 1: traffic
        z=[[0]], colorscale="Oranges", zmin=0, xgap=2, ygap=2, texttemplate="%{text}",
        colorbar=dict(title=dict(text="rows", side="top"), x=1.0, y=0.8, len=0.4,
                      thickness=10),
        hovertemplate="rank %{y} → rank %{x}<br>%{text}<extra></extra>"), row=1, col=2)
    for name in EXCHANGES:  # 2-4: measured messages
        fig.add_trace(go.Bar(x=[], y=[], name=f"{EXCHANGE_TITLES[name]}: measured",
                             marker_color=EXCHANGE_COLORS[name], legendgroup=name,
                             offsetgroup=name, visible=False,
                             hovertemplate="rank %{x}: %{y} messages<extra></extra>"),
                      row=2, col=1)
    for name in EXCHANGES:  # 5-7: formulas
        fig.add_trace(go.Scatter(x=[], y=[], mode="lines", legendgroup=name, visible=False,
                                 name=f"formula {FORMULA_TEXT[name]}",
                                 line=dict(color=EXCHANGE_COLORS[name], dash="dash")),
                      row=2, col=1)
    fig.add_trace(go.Bar(x=[], y=[], name="routes kept for its experts (from its EP group)",
                         marker_color="#6a51a3", offsetgroup="tokens",
                         hovertemplate="rank %{x}: %{y:.0f} routes<extra></extra>"),
                  row=2, col=2)  # 8
    fig.add_trace(go.Bar(x=[], y=[],
                         name="rows it received (empty slots incl.; TP lanes split them)",
                         marker_color="#bcbddc", offsetgroup="rows",
                         hovertemplate="rank %{x}: %{y:.0f} rows<extra></extra>"),
                  row=2, col=2)  # 9
    fig.add_trace(go.Scatter(x=[], y=[], mode="lines", name="mean routes (perfect balance)",
                             line=dict(color="#222", dash="dot")), row=2, col=2)  # 10
    fig.update_yaxes(autorange="reversed", title_text="rank", dtick=1, row=1, col=1)
    fig.update_xaxes(title_text="expert", dtick=1, row=1, col=1)
    fig.update_yaxes(autorange="reversed", title_text="from rank", dtick=1, row=1, col=2)
    fig.update_xaxes(title_text="to rank", dtick=1, row=1, col=2)
    fig.update_xaxes(title_text="rank", dtick=1, row=2, col=1)
    fig.update_xaxes(title_text="rank", dtick=1, row=2, col=2)
    fig.update_yaxes(rangemode="tozero", row=2, col=1)
    fig.update_yaxes(rangemode="tozero", row=2, col=2)
    fig.update_layout(height=760, autosize=True, template="plotly_white", barmode="group",
                      margin=dict(l=60, r=30, t=90, b=120),
                      legend=dict(orientation="h", y=-0.12, x=0.0),
                      title=dict(text="expert parallelism: no records yet", x=0.01, y=0.98))
    return fig


def _title(data: dict) -> str:
    if not data["world"]:
        return "expert parallelism: no records yet"
    name = data["exchange"]
    node_size, lanes = data["settings"].get(name, (None, 1))
    extra = f", G = {node_size}" if name == "hierarchical" else ""
    extra += f", L = {lanes}" if name == "tp_coordinated" else ""
    step = "incomplete step" if data["step"] is None else f"step {data['step']}"
    loss = "" if data["loss"] is None else f" · loss {data['loss']:.3f}"
    return (f"<b>expert parallelism</b>: {data['world']} ranks, {data['num_experts']} experts, "
            f"{EXCHANGE_TITLES[name]}{extra} · MoE layer {data['layer']} · {step}{loss}")


def _draw(fig: go.Figure, data: dict, units: str = "rows") -> None:
    """Put `data` into the figure's traces (call inside fig.batch_update() for widgets)."""
    fig.layout.title.text = _title(data)
    world, num_experts = data["world"], data["num_experts"]
    if not world:
        return
    ranks = np.arange(world)
    placement = data["placement"]
    z = np.where(placement, data["expert_tokens"][None, :], np.nan)
    text = np.where(placement, np.array([f"e{e}" for e in range(num_experts)])[None, :], "")
    fig.data[0].update(z=_json_safe(z), x=np.arange(num_experts), y=ranks, text=text)
    traffic = data["traffic"] if units == "rows" else data["traffic_bytes"]
    labels = np.empty((world, world), dtype=object)
    for src in range(world):
        for dst in range(world):
            rows, size = data["traffic"][src, dst], data["traffic_bytes"][src, dst]
            if not data["reported"][src]:
                labels[src, dst] = "?"
            else:
                labels[src, dst] = f"{rows}<br>{_human_bytes(size)}" + \
                    ("<br>(stays)" if src == dst else "")
    fig.data[1].update(z=traffic, x=ranks, y=ranks, text=labels)
    fig.data[1].colorbar.title.text = units
    moved = data["traffic"].sum() - np.trace(data["traffic"])
    fig.layout.annotations[1].text = (f"{units} sent, rank → rank, last exchange "
                                      f"({moved} rows cross ranks)")
    fig.layout.annotations[0].text = ("which rank holds which expert "
                                      "(colour: routes it got)")
    for i, name in enumerate(EXCHANGES):
        present = name in data["messages"]
        fig.data[2 + i].update(x=ranks if present else [],
                               y=_json_safe(data["messages"][name]) if present else [],
                               visible=present)
        value = data["formula"].get(name)
        fig.data[5 + i].update(x=[-0.5, world - 0.5] if present else [],
                               y=[value, value] if present else [], visible=present,
                               name=f"formula {FORMULA_TEXT[name]} = {value}")
    fig.data[8].update(x=ranks, y=data["rank_tokens"])
    fig.data[9].update(x=ranks, y=data["rows_received"])
    mean = float(data["rank_tokens"].mean()) if world else 0.0
    fig.data[10].update(x=[-0.5, world - 0.5], y=[mean, mean])


def parallel_figure(records: list[dict], layer: int | None = None, exchange: str | None = None,
                    units: str = "rows") -> go.Figure:
    """A static figure of traffic records (the figure ParallelView keeps live)."""
    if units not in UNITS:
        raise ValueError(f"units must be one of {UNITS}; got {units!r}")
    fig = _empty_figure()
    _draw(fig, parallel_data(records, layer, exchange), units)
    return fig


# ------------------------------------------------------------------------------ live widget

class ParallelView(LiveView):
    """Expert placement, traffic, messages and load of an expert-parallel run, live.

    ``view = ParallelView(); display(view)`` then
    ``launch("moelab.examples.parallel_demo:train_with_reports", 4, on_metric=view.update)`` and
    ``view.refresh()`` once it returns (the throttle may have skipped the last records).
    ``view.extend(results)`` adds records a launch returned (one list per rank).
    """

    def __init__(self, records: list[dict] | None = None,
                 min_redraw_seconds: float = MIN_REDRAW_SECONDS) -> None:
        self.records: list[dict] = []
        super().__init__(min_redraw_seconds)
        self._lock = threading.RLock()
        self.figure = go.FigureWidget(_empty_figure())
        self.units = widgets.ToggleButtons(options=UNITS, value="rows",
                                           description="traffic in:")
        self.units.observe(lambda change: self.refresh(), names="value")
        self.status = widgets.HTML()
        self.widget = bounded(widgets.HBox([self.units, self.status]), self.figure)
        if records:
            self.extend(records)
        else:
            self.refresh()

    def update(self, rank: int, record: dict) -> None:
        """``launch(..., on_metric=view.update)``: add one rank's record; redraw if the last
        redraw is old enough. Safe to call from launch's reader thread."""
        with self._lock:
            self.records.append({**record, "rank": int(rank)})
            due = self.redraw_due()
        if due:
            self.refresh()

    def extend(self, records) -> ParallelView:
        """Add records (a flat list, or launch's per-rank lists of them) and redraw."""
        flat = []
        for item in records:
            flat.extend(item if isinstance(item, list) else [item])
        with self._lock:
            self.records.extend(flat)
        self.refresh()
        return self

    def data(self) -> dict:
        with self._lock:
            return parallel_data(list(self.records))

    def refresh(self) -> None:
        """Redraw everything now, in one batch update."""
        with self._lock:
            data = parallel_data(list(self.records))
            with self.figure.batch_update():
                _draw(self.figure, data, self.units.value)
            self._drew()
            if data["world"]:
                crossing = int(data["traffic"].sum() - np.trace(data["traffic"]))
                self.status.value = (f"{len(self.records)} records · {crossing} rows crossed "
                                     f"ranks in the last exchange")
            else:
                self.status.value = "waiting for records (launch(..., on_metric=view.update))"
