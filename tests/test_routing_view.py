"""RoutingView and routing_table, checked on their data and widget state (no browser).

Every figure check compares a trace's data with the Routing it should show: heatmap z with
routing.probs, the kept/dropped markers with routing.slot, the bars with routing.load and the
dropped counts, the capacity line with routing.capacity.
"""

from __future__ import annotations

import dataclasses

import ipywidgets as widgets
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab import MoE, Router, RouterConfig, route
from moelab.viz import MAX_TOKENS, RoutingView, routing_figure, routing_table
from moelab.viz.routing_view import NOT_CONTROLS

S, E = 12, 4


def make_logits(num_tokens: int = S, num_experts: int = E, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Tilted towards expert 0 so that it overflows at capacity factor 1.
    tilt = torch.linspace(1.0, -0.5, num_experts)
    return torch.randn(num_tokens, num_experts, generator=generator) + tilt


def traces(view: RoutingView):
    heatmap, kept, dropped, kept_bars, dropped_bars, capacity = view.figure.data
    return heatmap, kept, dropped, kept_bars, dropped_bars, capacity


def route_positions(routing, mask: torch.Tensor, shown: int) -> set[tuple[int, int]]:
    """{(token, expert)} of the routes in mask [S, k] among the first `shown` tokens."""
    token = torch.arange(routing.num_tokens)[:, None].expand_as(routing.expert)
    mask = mask & (token < shown)
    return set(zip(token[mask].tolist(), routing.expert[mask].tolist(), strict=True))


def marker_positions(trace) -> set[tuple[int, int]]:
    return set(zip(np.asarray(trace.y, dtype=int).tolist(),
                   np.asarray(trace.x, dtype=int).tolist(), strict=True))


def assert_figure_shows(view: RoutingView, routing) -> None:
    """The six traces hold exactly this routing."""
    heatmap, kept, dropped, kept_bars, dropped_bars, capacity = traces(view)
    shown = min(routing.num_tokens, view.max_tokens)
    np.testing.assert_allclose(np.asarray(heatmap.z, dtype=float),
                               routing.probs[:shown].numpy(), rtol=1e-6)
    assert marker_positions(kept) == route_positions(routing, routing.kept, shown)
    if routing.expert_choice:
        assert marker_positions(dropped) == set()
    else:
        assert marker_positions(dropped) == route_positions(routing, ~routing.kept, shown)
    np.testing.assert_array_equal(np.asarray(kept_bars.y), routing.load.numpy())
    asked_not_kept = (routing.counts - routing.load).numpy()
    np.testing.assert_array_equal(np.asarray(dropped_bars.y),
                                  0 * asked_not_kept if routing.expert_choice
                                  else asked_not_kept)
    if routing.capacity is None:
        assert capacity.visible is False
        assert len(capacity.y) == 0
    else:
        assert capacity.visible is True
        assert list(capacity.y) == [routing.capacity, routing.capacity]
        assert list(capacity.x) == [-0.5, routing.num_experts - 0.5]


def assert_same_routing(a, b) -> None:
    assert torch.equal(a.expert, b.expert)
    assert torch.equal(a.slot, b.slot)
    torch.testing.assert_close(a.weight, b.weight)
    assert a.capacity == b.capacity


# ----------------------------------------------------------------------------- routing_table

def test_routing_table_lists_kept_and_dropped_routes():
    logits = make_logits()
    routing = route(logits, k=2, capacity_factor=0.5, min_capacity=0, training=False)
    table = routing_table(routing, tokens="abcdefghijkl")
    assert routing.capacity == 3  # ceil(12/4 · 0.5 · 2)
    np.testing.assert_allclose(table["probs"], routing.probs.numpy())
    assert list(table["labels"]) == list("abcdefghijkl")
    kept = routing.kept.numpy()
    assert len(table["kept_token"]) == kept.sum() and len(table["dropped_token"]) == (~kept).sum()
    for s, e, j, c, w in zip(table["kept_token"], table["kept_expert"], table["kept_choice"],
                             table["kept_slot"], table["kept_weight"], strict=True):
        assert routing.expert[s, j] == e and routing.slot[s, j] == c >= 0
        assert routing.weight[s, j].item() == pytest.approx(w)
    for s, e, j in zip(table["dropped_token"], table["dropped_expert"], table["dropped_choice"],
                       strict=True):
        assert routing.expert[s, j] == e and routing.slot[s, j] == -1
    np.testing.assert_array_equal(table["load"], routing.load.numpy())
    np.testing.assert_array_equal(table["load"] + table["dropped"], routing.counts.numpy())
    assert table["dropped"].sum() > 0
    assert table["capacity"] == 3 and table["k"] == 2
    assert table["drop_fraction"] == pytest.approx(routing.drop_fraction)
    assert table["aux_loss"] == pytest.approx(routing.aux_loss.item())
    assert table["z_loss"] == pytest.approx(routing.z_loss.item())


def test_routing_table_truncates_rows_but_counts_every_token():
    routing = route(make_logits(num_tokens=150), k=1, min_capacity=0, use_rts=False)
    table = routing_table(routing)
    assert table["shown"] == MAX_TOKENS and table["truncated"]
    assert table["probs"].shape == (MAX_TOKENS, E)
    assert list(table["labels"]) == [str(i) for i in range(MAX_TOKENS)]
    assert len(table["kept_token"]) == int(routing.kept[:MAX_TOKENS].sum())
    assert table["kept_token"].max() == MAX_TOKENS - 1
    # Dropping by position hits the late tokens: none among the rows drawn, all in the bars.
    assert len(table["dropped_token"]) == 0 and table["dropped"].sum() > 0
    np.testing.assert_array_equal(table["load"], routing.load.numpy())  # all 150 tokens
    np.testing.assert_array_equal(table["load"] + table["dropped"], routing.counts.numpy())
    fig = routing_figure(routing)
    assert f"first {MAX_TOKENS} of 150 tokens" in fig.layout.title.text
    assert "150 tokens" in fig.layout.title.text


def test_token_labels_make_whitespace_visible_and_must_match_the_tokens():
    routing = route(make_logits(num_tokens=4), k=1)
    table = routing_table(routing, tokens=["a", " ", "\n", "word"])
    assert list(table["labels"]) == ["a", "␣", "↵", "word"]
    with pytest.raises(ValueError, match="one label per routed token"):
        routing_table(routing, tokens="abc")


@settings(max_examples=40, deadline=None)
@given(num_tokens=st.integers(1, 80), num_experts=st.integers(1, 6), k=st.integers(1, 3),
       cf=st.sampled_from([0.25, 0.5, 1.0, 2.0]), drop=st.booleans(),
       choice=st.sampled_from(["token", "expert"]), seed=st.integers(0, 2**16))
def test_routing_table_accounts_for_every_route(num_tokens, num_experts, k, cf, drop, choice,
                                                seed):
    k = min(k, num_experts)
    routing = route(make_logits(num_tokens, num_experts, seed), k=k, capacity_factor=cf,
                    min_capacity=0, drop_tokens=drop, choice=choice,
                    generator=torch.Generator().manual_seed(seed))
    table = routing_table(routing)
    shown = min(num_tokens, MAX_TOKENS)
    kept = routing.kept[:shown]
    assert len(table["kept_token"]) == int(kept.sum())
    np.testing.assert_array_equal(table["load"], routing.load.numpy())
    if choice == "token":
        assert len(table["dropped_token"]) == int((~kept).sum())
        np.testing.assert_array_equal(table["load"] + table["dropped"], routing.counts.numpy())
    else:
        assert len(table["dropped_token"]) == 0 and table["dropped"].sum() == 0
        assert table["unpicked"] == int((~routing.kept.any(dim=1)).sum())


# ------------------------------------------------------------------------------- RoutingView

def test_view_from_logits_draws_the_routing():
    logits = make_logits()
    view = RoutingView.from_logits(logits, tokens="abcdefghijkl", k=1, min_capacity=0,
                                   use_rts=False)
    expected = route(logits, k=1, min_capacity=0, use_rts=False)
    assert_same_routing(view.routing, expected)
    assert expected.capacity == 3 and int((~expected.kept).sum()) > 0  # some routes dropped
    assert_figure_shows(view, expected)
    heatmap = traces(view)[0]
    assert list(view.figure.layout.yaxis.ticktext) == list("abcdefghijkl")
    assert list(heatmap.y) == list(range(S))
    assert "capacity C = 3" in view.figure.layout.title.text
    assert "capacity C = 3" == traces(view)[5].name
    assert view.error is None and view.message.layout.display == "none"
    assert "S = 12, E = 4, k = 1" in view.summary.value
    assert f"{expected.aux_loss.item():.4f}" in view.summary.value
    assert f"{expected.z_loss.item():.4f}" in view.summary.value


def test_set_options_reroutes_the_same_tokens_and_redraws():
    logits = make_logits()
    view = RoutingView.from_logits(logits, k=1, min_capacity=0, use_rts=False)
    before = view.routing
    routing = view.set_options(k=2, capacity_factor=0.5, training=False)
    expected = route(logits, k=2, capacity_factor=0.5, min_capacity=0, use_rts=False,
                     training=False)
    assert routing is view.routing
    assert_same_routing(routing, expected)
    assert routing.capacity == 3 and before.capacity == 3
    assert not torch.equal(routing.load, before.load)
    assert_figure_shows(view, expected)
    assert view.config.k == 2 and view.config.capacity_factor == 0.5
    assert view.controls["k"].value == 2
    assert view.controls["capacity_factor"].value == 0.5
    assert view.controls["training"].value is False
    assert "top-2 routing" in view.figure.layout.title.text
    # Second choices are drawn as diamonds, first choices as circles.
    symbols = list(traces(view)[1].marker.symbol)
    choices = routing_table(expected)["kept_choice"]
    assert symbols == ["circle" if j == 0 else "diamond" for j in choices]


def test_each_refresh_reaches_the_browser_as_one_update_message():
    """All trace and layout changes of a refresh go out in one batch_update: one "update"
    message to the front end, no separate restyle or relayout messages."""
    view = RoutingView.from_logits(make_logits(), min_capacity=0)
    sent = []
    for kind in ("update", "restyle", "relayout"):
        method = getattr(view.figure, f"_send_{kind}_msg")

        def record(*args, kind=kind, method=method, **kwargs):
            sent.append(kind)
            return method(*args, **kwargs)

        setattr(view.figure, f"_send_{kind}_msg", record)
    view.set_options(k=2, capacity_factor=2.0)
    assert sent == ["update"]
    assert list(traces(view)[5].y) == [12, 12]  # ceil(12/4 · 2 · 2)


def test_dropless_has_no_capacity_line():
    logits = make_logits()
    view = RoutingView.from_logits(logits, k=2, min_capacity=0, training=False)
    view.set_options(drop_tokens=False)
    expected = route(logits, k=2, drop_tokens=False, training=False)
    assert view.routing.capacity is None
    assert_figure_shows(view, expected)
    assert np.asarray(traces(view)[4].y).sum() == 0
    assert view.controls["drop_tokens"].value is False
    assert view.controls["capacity_factor"].disabled  # capacity options do nothing now
    assert "dropless" in view.figure.layout.title.text
    assert "dropless" in traces(view)[5].name
    view.set_options(drop_tokens=True)
    assert traces(view)[5].visible is True and view.controls["drop_tokens"].value is True


def test_expert_choice_marks_picks_and_drops_nothing():
    logits = make_logits()
    view = RoutingView.from_logits(logits, choice="expert", min_capacity=0)
    expected = route(logits, choice="expert", min_capacity=0)
    assert_same_routing(view.routing, expected)
    assert_figure_shows(view, expected)
    np.testing.assert_array_equal(np.asarray(traces(view)[3].y), [3, 3, 3, 3])
    assert "expert-choice" in view.figure.layout.title.text


def test_invalid_options_show_the_error_in_the_panel_instead_of_raising():
    logits = make_logits()
    view = RoutingView.from_logits(logits, k=1, min_capacity=0, use_rts=False)
    valid = view.routing
    bars_before = np.asarray(traces(view)[3].y).copy()

    assert view.set_options(k=2, noisy_gate_policy="RSample") is None
    assert "RSample" in view.error and "top-1" in view.error
    assert view.message.layout.display != "none"
    assert "cannot route" in view.message.value and "RSample" in view.message.value
    assert view.routing is valid  # the last valid routing stays drawn
    np.testing.assert_array_equal(np.asarray(traces(view)[3].y), bars_before)
    assert view.controls["noisy_gate_policy"].value == "RSample"
    assert view.controls["k"].value == 2

    routing = view.set_options(k=1)  # RSample with k=1 is valid again
    assert routing is not None and view.error is None
    assert view.message.layout.display == "none" and view.message.value == ""
    expected = route(logits, k=1, min_capacity=0, use_rts=False, noisy_gate_policy="RSample",
                     generator=torch.Generator().manual_seed(0))
    assert_same_routing(routing, expected)


def test_unknown_option_names_raise():
    view = RoutingView.from_logits(make_logits())
    with pytest.raises(TypeError, match="unknown RoutingView option"):
        view.set_options(capacity=3)
    with pytest.raises(ValueError, match="k must be"):
        RoutingView.from_logits(make_logits(), k=9)  # initial options must route


def test_controls_call_set_options():
    logits = make_logits()
    view = RoutingView.from_logits(logits, min_capacity=0, use_rts=False, training=False)
    view.controls["k"].value = 2
    assert view.routing.k == 2 and view.config.k == 2
    assert_figure_shows(view, route(logits, k=2, min_capacity=0, training=False))
    view.controls["drop_tokens"].value = False
    assert view.routing.capacity is None and view.config.drop_tokens is False
    view.controls["drop_tokens"].value = True
    view.controls["drop_policy"].value = "probs"
    assert_same_routing(view.routing, route(logits, k=2, min_capacity=0, training=False,
                                            drop_policy="probs"))
    view.controls["k"].value = 1
    view.controls["noisy_gate_policy"].value = "RSample"
    assert view.config.noisy_gate_policy == "RSample"
    view.controls["noisy_gate_policy"].value = "None"
    assert view.config.noisy_gate_policy is None  # the widget's "None" is route's None


def test_resample_draws_new_random_routing_reproducibly():
    logits = make_logits(num_tokens=40)
    view = RoutingView.from_logits(logits, k=1, min_capacity=0, use_rts=True, training=True)
    first = view.routing
    assert_same_routing(first, route(logits, k=1, min_capacity=0,
                                     generator=torch.Generator().manual_seed(0)))
    view._resample.click()
    assert view.seed == 1 and view.controls["seed"].value == 1
    assert not torch.equal(view.routing.slot, first.slot)  # RTS dropped other tokens
    assert torch.equal(view.routing.load, first.load)  # but as many per expert
    view.set_options(seed=0)
    assert_same_routing(view.routing, first)


def test_rts_control_greys_out_where_rts_does_nothing():
    view = RoutingView.from_logits(make_logits(), k=1, training=True)
    assert not view.controls["use_rts"].disabled
    assert view.controls["drop_policy"].disabled  # RTS decides who keeps a slot
    view.set_options(k=2)
    assert view.controls["use_rts"].disabled and not view.controls["drop_policy"].disabled
    view.set_options(training=False)
    assert view.controls["noisy_gate_policy"].disabled


def test_jitter_needs_the_router_input():
    view = RoutingView.from_logits(make_logits())
    assert view.set_options(noisy_gate_policy="Jitter") is None
    assert "from_router" in view.error


def test_view_from_router_matches_the_router_and_leaves_it_alone():
    torch.manual_seed(0)
    router = Router(8, E, k=2, min_capacity=0, capacity_factor=0.75)
    router.eval()
    x = torch.randn(S, 8)
    weight_before = router.weight.detach().clone()
    view = RoutingView.from_router(router, x, tokens=[f"t{i}" for i in range(S)])
    assert view.config.k == 2 and view.training is False
    assert view.config.capacity_factor == 0.75
    with torch.no_grad():
        assert_same_routing(view.routing, router(x))
    assert_figure_shows(view, view.routing)

    view.set_options(noisy_gate_policy="Jitter", training=True, seed=3)
    jittered = view.routing
    assert view.error is None
    # Jitter perturbs the input: probabilities move a little, reproducibly per seed.
    difference = (jittered.probs - torch.softmax(x @ router.weight.T, -1)).abs().max()
    assert 0 < difference < 0.05
    view.set_options(seed=4)
    assert not torch.equal(view.routing.probs, jittered.probs)
    view.set_options(seed=3)
    torch.testing.assert_close(view.routing.probs, jittered.probs)

    assert torch.equal(router.weight, weight_before) and router.training is False
    assert router.config.noisy_gate_policy is None


def test_view_from_moe_layer_uses_its_router():
    torch.manual_seed(0)
    moe = MoE(8, 16, num_experts=E, k=1, min_capacity=0)
    moe.eval()
    x = torch.randn(2, 6, 8)  # [batch, seq, d] is flattened like the layer does
    view = RoutingView.from_router(moe, x)
    with torch.no_grad():
        _, routing = moe(x)
    assert_same_routing(view.routing, routing)


@pytest.mark.parametrize("options", [
    dict(router_bias=True, renormalize=True),  # gpt-oss: a bias in the gate's linear map
    dict(use_selection_bias=True, score="sigmoid", renormalize=True, n_group=2, topk_group=1,
         routed_scaling_factor=2.5),  # DeepSeek-V3: a fixed selection bias, groups, scaling
], ids=["gate bias", "selection bias"])
def test_view_from_router_routes_with_the_routers_biases(options):
    """The view re-routes what the router routes, biases included; neither is a control."""
    torch.manual_seed(0)
    router = Router(8, E, k=2, drop_tokens=False, **options).eval()
    with torch.no_grad():
        for bias in (router.bias, router.selection_bias):
            if bias is not None:
                bias.copy_(3 * torch.randn(E))
    x = torch.randn(S, 8)
    view = RoutingView.from_router(router, x)
    with torch.no_grad():
        assert_same_routing(view.routing, router(x))
    assert not {"router_bias", "use_selection_bias"} & set(view.controls)


def test_view_displays_as_its_widget():
    view = RoutingView.from_logits(make_logits())
    bundle = view._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == \
        view.widget.model_id
    assert view.figure in view.widget.children
    assert "RoutingView(S=12, E=4, k=1, capacity=4)" == repr(view)


def test_every_router_option_gets_a_control_from_its_declaration():
    """The controls are made from RouterConfig's fields: every field but the ones the view
    documents it leaves out has one (a new routing option gets a control with no view code)."""
    view = RoutingView.from_logits(make_logits())
    fields = {f.name for f in dataclasses.fields(RouterConfig)}
    assert set(view.controls) == (fields - set(NOT_CONTROLS)) | {"training", "seed"}
    assert isinstance(view.controls["renormalize"], widgets.Dropdown)  # bool | None: 3 values


def test_a_control_made_from_a_declaration_routes():
    logits = make_logits()
    view = RoutingView.from_logits(logits, k=2, min_capacity=0, training=False)
    view.controls["renormalize"].value = False
    routing = view.routing
    expected = route(logits, k=2, min_capacity=0, training=False, renormalize=False)
    assert_same_routing(routing, expected)
    torch.testing.assert_close(routing.weight[routing.kept],
                               routing.probs.gather(1, routing.expert)[routing.kept])
