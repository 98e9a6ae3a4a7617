"""The Experts bank against per-expert computations, in every layout and path."""

from __future__ import annotations

import itertools

import pytest
import torch

from moelab import Experts


def test_experts_run_each_expert_on_its_rows():
    torch.manual_seed(0)
    experts = Experts(3, 4, 8, activation="swiglu").double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    out = experts(x)
    for e in range(3):
        h = x[e] @ experts.w_in[e] + experts.b_in[e]
        gate, up = h.chunk(2, dim=-1)
        expected = (torch.nn.functional.silu(gate) * up) @ experts.w_out[e] + experts.b_out[e]
        torch.testing.assert_close(out[e], expected)


@pytest.mark.parametrize("group_bytes", [1, 200, 1 << 30], ids=["1 expert", "2 experts", "all"])
@pytest.mark.parametrize("activation,bias", [("gelu", True), ("relu", False), ("swiglu", True)])
def test_experts_inference_path_runs_each_expert_on_its_rows(activation, bias, group_bytes,
                                                            monkeypatch):
    """Without autograd the bank runs experts in groups with the activation in place: the same
    numbers as a per-expert loop, whatever the group size, and its input is left untouched."""
    import moelab.experts

    monkeypatch.setattr(moelab.experts, "HIDDEN_GROUP_BYTES", group_bytes)
    torch.manual_seed(1)
    experts = Experts(5, 4, 3, activation=activation, bias=bias).double()
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    x_before = x.clone()
    with torch.no_grad():
        out = experts(x)
    act = {"gelu": torch.nn.functional.gelu, "relu": torch.relu,
           "swiglu": lambda h: torch.nn.functional.silu(h[:, :3]) * h[:, 3:]}[activation]
    for e in range(5):
        h = x[e] @ experts.w_in[e] + (experts.b_in[e] if bias else 0)
        expected = act(h) @ experts.w_out[e] + (experts.b_out[e] if bias else 0)
        torch.testing.assert_close(out[e], expected.detach())
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("load", [[2, 0, 5, 1], [0, 0, 4, 0], [0, 3, 0, 1], [0, 0, 0, 0]],
                         ids=["padded batch", "one expert", "two experts", "no rows"])
@pytest.mark.parametrize("grad", [False, True])
def test_experts_forward_packed_runs_each_segment_with_its_expert(load, grad):
    """Both packed paths (padded batch when most experts have rows, a loop over the experts that
    have rows otherwise) against a per-expert computation, outputs and weight gradients."""
    torch.manual_seed(0)
    experts = Experts(4, 4, 8, activation="swiglu").double()
    load = torch.tensor(load)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), load.cumsum(0)])
    x = torch.randn(int(load.sum()), 4, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        out = experts.forward_packed(x, offsets)
    assert out.shape == x.shape
    expected = []
    for e in range(4):
        h = x[offsets[e]:offsets[e + 1]] @ experts.w_in[e] + experts.b_in[e]
        gate, up = h.chunk(2, dim=-1)
        expected.append((torch.nn.functional.silu(gate) * up) @ experts.w_out[e]
                        + experts.b_out[e])
    expected = torch.cat(expected)
    torch.testing.assert_close(out, expected.detach())
    if grad:  # also with no rows: zero gradients, not None (expert-parallel ranks need them)
        got = torch.autograd.grad(out.square().sum(), [experts.w_in, experts.b_out])
        want = torch.autograd.grad(expected.square().sum(), [experts.w_in, experts.b_out])
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)


def test_experts_start_independent():
    # DeepSpeed deep-copies one expert, so all experts start identical; moelab's do not.
    experts = Experts(4, 8, 16)
    for a, b in itertools.combinations(range(4), 2):
        assert not torch.allclose(experts.w_in[a], experts.w_in[b])
        assert not torch.allclose(experts.w_out[a], experts.w_out[b])
