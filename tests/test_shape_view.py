"""ShapeView, checked on its data and figure state (no browser)."""

from __future__ import annotations

import pytest

from moelab.model import preset
from moelab.sizing import size
from moelab.viz.shape_view import ShapeView, model_shape, shape_figure


def test_shape_of_pr_moe_and_mos():
    shape = model_shape(preset("paper_350m_pr_moe_32_64"))
    kinds = [b["kind"] for b in shape["blocks"]]
    assert kinds == ["dense", "residual-moe"] * 12
    assert [b["experts"] for b in shape["blocks"]][1::2] == [32] * 10 + [64] * 2
    assert shape["total"] == size(preset("paper_350m_pr_moe_32_64")).total


def test_shape_figure_compares_configs_side_by_side():
    fig = shape_figure(["paper_350m_moe128", "paper_350m_pr_moe_32_64"])
    titles = [a.text for a in fig.layout.annotations]
    assert "13.1B params" in titles[0] and "4.1B params" in titles[1]
    experts_traces = [t for t in fig.data if t.name.startswith("experts")]
    assert [v for v in experts_traces[1].y if v] == [32] * 10 + [64] * 2
    residual = [t for t in fig.data if "Residual" in t.name]
    assert sum(1 for v in residual[1].y if v) == 12 and not any(residual[0].y)
    view = ShapeView("tiny", "small")
    assert len(view.shapes) == 2 and view.figure.data
    with pytest.raises(ValueError, match="unknown preset"):
        ShapeView("huge")


@pytest.mark.parametrize("num_blocks", [1, 2, 4, 12, 21, 24, 40, 58, 200])
def test_shape_view_labels_at_most_about_eight_blocks(num_blocks):
    from moelab.viz.shape_view import block_ticks

    ticks = block_ticks(num_blocks)
    assert ticks == sorted(set(ticks)) and 1 <= ticks[0] and ticks[-1] <= num_blocks
    assert len(ticks) <= 9
    if num_blocks <= 8:
        assert ticks == list(range(1, num_blocks + 1))
