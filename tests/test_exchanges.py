"""The exchange formulas of §5.3 (moelab.exchanges) against the paper's numbers."""

from __future__ import annotations

import pytest

from moelab.exchanges import (
    hops,
    message_table,
    messages_per_exchange,
    messages_per_forward,
    paper_layouts,
)


def test_formulas_match_the_paper():
    assert messages_per_forward(128, "flat") == 2 * 127
    assert messages_per_forward(128, "hierarchical", node_size=8) == 2 * (7 + 15)
    assert messages_per_forward(128, "tp_coordinated", tp_size=8) == 2 * 15 + 7
    rows = {(r["world"], r["exchange"]): r for r in paper_layouts()}
    assert rows[(256, "flat")]["messages_per_exchange"] == 255
    assert rows[(256, "hierarchical")]["messages_per_exchange"] == 7 + 31
    assert rows[(128, "hierarchical")]["volume"] == pytest.approx(7 / 8 + 15 / 16)
    assert message_table(4, 2, 2)[2]["messages_per_forward"] == 3


def test_hops_split_inside_and_across_nodes():
    # p = 128 ranks, G = 8 per node, L = 8: flat p - 1; hierarchical (G-1) + (p/G - 1);
    # coordinated p/L - 1 (§5.3: 128·C1 + C2 -> 16·C1 + C2).
    assert sum(hops(128, "flat", 8)) == 127
    assert hops(128, "hierarchical", 8) == (7, 15)
    assert sum(hops(128, "tp_coordinated", 8, tp_size=8)) == 15
    assert hops(8, "flat", 8) == (7, 0)  # one node: NVLink only
    assert hops(4, "flat", 8) == (3, 0)  # fewer ranks than a node holds




def test_bad_exchange_names_are_refused():
    with pytest.raises(ValueError, match="exchange must be one of"):
        messages_per_exchange(8, "ring")
    assert messages_per_exchange(8, "flat") == 7
