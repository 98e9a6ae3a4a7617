"""The Routing table and its arithmetic: capacity, ranks within an expert, derived layouts,
and when work happens (kept derived tensors, losses computed on first read)."""

from __future__ import annotations

import dataclasses
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import random_logits

from moelab import expert_capacity, route
from moelab import routing as routing_module


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=60), st.booleans())
def test_rank_within_expert_both_ways_equal_a_running_count(experts, one_hot):
    # the one-hot prefix count (small R·E) and the stable sort (large) against a Python loop;
    # id num_experts (= 5 here) is the ignored group that routes without a slot go to
    expert = torch.tensor(experts)
    seen = [0] * 6
    expected_rank = []
    for e in experts:
        expected_rank.append(seen[e])
        seen[e] += 1
    with mock.patch.object(routing_module, "ONE_HOT_RANK_MAX_CELLS", 10**9 if one_hot else 0):
        rank, counts = routing_module.rank_within_expert(expert, 5)
    assert rank.tolist() == expected_rank
    assert counts.tolist() == seen


def test_capacity_formula_and_float32_rounding():
    assert expert_capacity(64, 8, 1.0) == 8
    assert expert_capacity(64, 8, 1.0, k=2) == 16
    assert expert_capacity(10, 8, 1.0, min_capacity=4) == 4
    assert expert_capacity(100, 8, 1.25) == 16  # ceil(15.625)
    # DeepSpeed computes ceil((S/E) * cf) on float32 tensors; find cases where float64 and
    # float32 disagree and check moelab follows float32.
    disagreements = 0
    for num_tokens in range(1, 200):
        for num_experts in (3, 6, 7, 12):
            for cf in (0.1, 0.3, 0.7, 1.1, 1.2, 1.3):
                ds = torch.ceil(torch.tensor(num_tokens / num_experts)
                                * torch.tensor(cf)).to(torch.int64).item()
                ours = expert_capacity(num_tokens, num_experts, cf, min_capacity=0)
                assert ours == ds, (num_tokens, num_experts, cf)
                disagreements += ds != math.ceil(num_tokens / num_experts * cf)
    assert disagreements > 0  # the float32 rounding really matters somewhere


@pytest.mark.parametrize("drop_tokens", [True, False])
def test_routing_layout_tensors_are_computed_once_and_match_their_definitions(drop_tokens):
    # load, offsets and row are kept on the Routing after first use (dispatch, the experts and
    # combine all read them); a Routing made by dataclasses.replace computes its own.
    routing = route(random_logits(5, 30, 4), k=2, capacity_factor=0.5, training=False,
                    drop_tokens=drop_tokens)
    assert routing.load is routing.load and routing.row is routing.row
    kept = [(int(e), int(slot)) for e, slot in zip(routing.expert.flatten(),
                                                   routing.slot.flatten(), strict=True)
            if slot >= 0]
    assert len(kept) < 60 if drop_tokens else len(kept) == 60
    load = [sum(1 for e, _ in kept if e == x) for x in range(4)]
    assert routing.load.tolist() == load
    assert routing.offsets.tolist() == [sum(load[:e]) for e in range(5)]
    for s in range(30):
        for j in range(2):
            e, slot = int(routing.expert[s, j]), int(routing.slot[s, j])
            start = e * routing.capacity if drop_tokens else sum(load[:e])
            assert int(routing.row[s, j]) == (start + slot if slot >= 0 else -1)
    if drop_tokens:
        dropped = dataclasses.replace(routing, slot=torch.full_like(routing.slot, -1))
        assert dropped.load.tolist() == [0, 0, 0, 0] and bool((dropped.row == -1).all())
    else:  # dropless: every route asked for is kept, so the load is the counts
        moved = dataclasses.replace(routing, counts=routing.counts.flip(0))
        assert moved.load.tolist() == routing.counts.flip(0).tolist()


def test_losses_are_computed_on_first_read_when_no_gradient_needs_them():
    logits = random_logits(6, 24, 5)
    with torch.no_grad():
        lazy = route(logits, k=2, training=False)
    assert callable(lazy.__dict__["_aux_loss"]) and callable(lazy.__dict__["_z_loss"])
    eager = route(logits.clone().requires_grad_(), k=2, training=False)
    assert isinstance(eager.__dict__["_aux_loss"], torch.Tensor)
    assert eager.aux_loss.grad_fn is not None and eager.z_loss.grad_fn is not None
    torch.testing.assert_close(lazy.aux_loss, eager.aux_loss.detach())
    torch.testing.assert_close(lazy.z_loss, eager.z_loss.detach())
    assert lazy.aux_loss is lazy.aux_loss  # computed once, then kept
    copy = dataclasses.replace(lazy, weight=lazy.weight * 2)  # reads the losses, keeps them
    assert copy.aux_loss is lazy.aux_loss and "aux_loss=" in repr(copy)
