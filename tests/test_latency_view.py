"""LatencyView and ServingView on their data and widget state (no browser)."""

from __future__ import annotations

import numpy as np
import pytest

from moelab.profiling import COMPONENTS, LatencyBreakdown
from moelab.serving import COMPONENTS as SERVING_COMPONENTS
from moelab.serving import predict
from moelab.viz.latency_view import (
    LatencyView,
    ServingView,
    latency_figure,
    latency_table,
    serving_figure,
    serving_table,
)

LAYERS = 4


def breakdown(backend: str, batch: int, scale: float) -> LatencyBreakdown:
    """A synthetic breakdown: component c in block i takes scale · (c_index + 1) · (i + 1) µs."""
    per_layer = {c: [scale * 1e-6 * (j + 1) * (i + 1) for i in range(LAYERS)]
                 for j, c in enumerate(COMPONENTS) if c != "embed_head"}
    for c in ("gate", "dispatch", "experts", "combine", "exchange"):  # dense blocks 0 and 2
        per_layer[c][0] = per_layer[c][2] = 0.0
    total = sum(map(sum, per_layer.values())) + 5e-6
    return LatencyBreakdown(per_layer=per_layer, embed_head_s=5e-6, measured_s=total * 1.02,
                            steps=3, batch_size=batch, backend=backend, moe_layers=[1, 3])


BREAKDOWNS = [breakdown(b, n, s) for b, s in (("einsum", 3.0), ("index", 1.0)) for n in (1, 8)]


def test_latency_table_is_the_breakdowns():
    table = latency_table(BREAKDOWNS)
    assert table["labels"] == ["einsum · B=1", "einsum · B=8", "index · B=1", "index · B=8"]
    for c in COMPONENTS:
        np.testing.assert_allclose(table["ms"][c], [1e3 * b.totals[c] for b in BREAKDOWNS])
    np.testing.assert_allclose(table["tokens_per_s"], [b.tokens_per_s for b in BREAKDOWNS])
    block = latency_table(BREAKDOWNS, layer=1)
    np.testing.assert_allclose(block["ms"]["experts"],
                               [1e3 * b.per_layer["experts"][1] for b in BREAKDOWNS])
    assert block["ms"]["embed_head"].tolist() == [0.0] * 4


def test_latency_view_redraws_once_per_change():
    view = LatencyView(BREAKDOWNS)
    assert view.redraws == 1
    bars = view.figure.data[:len(COMPONENTS)]
    for trace, c in zip(bars, COMPONENTS, strict=True):
        np.testing.assert_allclose(trace.y, [1e3 * b.totals[c] for b in BREAKDOWNS])
    lines = view.figure.data[len(COMPONENTS):]
    assert [line.name for line in lines] == ["einsum", "index"]
    np.testing.assert_array_equal(lines[1].x, [1, 8])
    view.layer_picker.value = 3
    assert view.redraws == 2 and view.layer == 3
    np.testing.assert_allclose(view.figure.data[COMPONENTS.index("experts")].y,
                               [1e3 * b.per_layer["experts"][3] for b in BREAKDOWNS])
    assert "block 4" in view.figure.layout.annotations[0].text
    assert "MoE" in view.summary.value
    assert "(MoE)" in dict((v, k) for k, v in view.layer_picker.options)[1]


def test_latency_figure_needs_data():
    with pytest.raises(ValueError, match="decode_sweep"):
        latency_figure([])
    assert len(latency_figure(BREAKDOWNS).data) == len(COMPONENTS) + 2


def test_serving_table_matches_predict_and_skips_bad_layouts():
    table = serving_table("8B+MoE-128", (4, 8, 32), tp=8, exchange="tp_coordinated")
    assert table["gpus"].tolist() == [8, 32]
    assert table["skipped"][0][0] == 4 and "tp=8" in table["skipped"][0][1]
    p = predict("8B+MoE-128", 32, tp=8, exchange="tp_coordinated")
    for c in SERVING_COMPONENTS:
        assert table["ms"][c][1] == pytest.approx(1e3 * p.components[c])
    assert table["tokens_per_s_per_gpu"][1] == pytest.approx(p.tokens_per_s_per_gpu)


def test_serving_view_state_follows_the_sliders():
    view = ServingView("1.3B+MoE-128", gpus=64, exchange="hierarchical", batch=8)
    assert view.redraws == 1 and view.error is None
    expected = predict("1.3B+MoE-128", 64, exchange="hierarchical", batch=8)
    assert view.prediction.latency_s == pytest.approx(expected.latency_s)
    assert f"{expected.latency_ms:.2f} ms" in view.status.value
    bars = view.figure.data[:len(SERVING_COMPONENTS)]
    gpus = [int(g) for g in bars[0].x]
    index = gpus.index(64)
    assert bars[0].marker.line.width[index] == 3  # the selected count is outlined
    assert view.figure.data[-1].x == (64,)

    view.controls["gpus"].value = 16  # one slider: one redraw
    assert view.redraws == 2 and view.prediction.layout.gpus == 16
    view.set(model="8B+MoE-128", variant="pr_moe_mos", tp=4, exchange="tp_coordinated")
    assert view.redraws == 3  # several controls: still one redraw
    assert view.prediction.model == "serve_8b_moe128_pr_moe_mos"
    assert view.prediction.layout.tp == 4 and view.prediction.fits
    assert "TP 4 × DP 4" in view.status.value


def test_serving_view_shows_an_invalid_layout_instead_of_raising():
    view = ServingView(gpus=8)
    view.set(exchange="tp_coordinated", tp=1)
    assert view.prediction is None and "tp > 1" in view.error
    assert "tp &gt; 1" in view.status.value
    view.set(ep=16)  # more expert ranks than GPUs
    assert view.error is not None
    view.set(ep=None, exchange="flat")
    assert view.error is None
    with pytest.raises(ValueError, match="unknown controls"):
        view.set(nodes=2)


def test_serving_view_dense_model():
    view = ServingView(gpus=1)
    view.set(model="paper_6_7b", variant="pr_moe_mos")  # variants do not apply to a dense model
    assert view.error is None and view.prediction.model == "paper_6_7b"
    assert view.prediction.components["exchange"] == 0


def test_serving_figure_fades_what_does_not_fit():
    fig = serving_figure("1.3B+MoE-128", gpus=64, exchange="hierarchical")
    first = fig.data[0]
    fits = [predict("1.3B+MoE-128", int(g), exchange="hierarchical").fits for g in first.x]
    assert list(first.marker.opacity) == [1.0 if f else 0.35 for f in fits]
    assert not fits[0] and fits[-1]
