"""dispatch and combine (index and einsum backends) against per-token loops."""

from __future__ import annotations

import itertools

import pytest
import torch

from moelab import combine, dispatch, dispatch_masks, route


@pytest.mark.parametrize("k,drop_tokens", list(itertools.product([1, 2, 3], [True, False])))
def test_dispatch_places_each_token_at_its_slot(k, drop_tokens):
    torch.manual_seed(k)
    x = torch.randn(20, 5)
    logits = torch.randn(20, 4)
    logits[:, 1] += 1.5  # overflow expert 1
    routing = route(logits, k=k, drop_tokens=drop_tokens, training=False)
    for backend in ("index", "einsum"):
        buffer = dispatch(x, routing, backend)
        if drop_tokens:
            assert buffer.shape == (4, routing.capacity, 5)
            rows = buffer
            used = torch.zeros(4, routing.capacity, dtype=torch.bool)
        else:
            offsets = routing.offsets
            assert buffer.shape == (int(offsets[-1]), 5) == (20 * k, 5)
            rows = [buffer[offsets[e]:offsets[e + 1]] for e in range(4)]
            used = None
        for s, j in itertools.product(range(20), range(k)):
            e, slot = int(routing.expert[s, j]), int(routing.slot[s, j])
            if slot >= 0:
                torch.testing.assert_close(rows[e][slot], x[s])
                if used is not None:
                    used[e, slot] = True
        if used is not None:  # unused capacity rows are zero
            assert bool((buffer[~used] == 0).all())


def test_combine_is_weighted_sum_over_routes():
    torch.manual_seed(0)
    routing = route(torch.randn(12, 3), k=2, capacity_factor=0.5, min_capacity=2, training=False)
    expert_out = torch.randn(3, routing.capacity, 4)
    expected = torch.zeros(12, 4)
    for s, j in itertools.product(range(12), range(2)):
        if routing.slot[s, j] >= 0:
            expected[s] += routing.weight[s, j] * expert_out[routing.expert[s, j],
                                                             routing.slot[s, j]]
    for backend in ("index", "einsum"):
        torch.testing.assert_close(combine(expert_out, routing, backend), expected)


def test_dispatch_masks_are_one_hot_and_hold_the_weights():
    torch.manual_seed(1)
    routing = route(torch.randn(16, 4), k=2, training=False)
    mask, combine_weights = dispatch_masks(routing)
    assert mask.shape == (16, 4, routing.capacity)
    assert int(mask.sum()) == int(routing.kept.sum())
    assert bool((mask.sum(dim=(1, 2)) == routing.kept.sum(dim=1)).all())
    torch.testing.assert_close(combine_weights.sum(dim=(1, 2)), routing.weight.sum(dim=1))
