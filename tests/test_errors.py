"""Bad input gets a ValueError that names the argument and what is allowed."""

from __future__ import annotations

import pytest
import torch

from moelab import Experts, MoE, Router, combine, dispatch, route

LOGITS = torch.randn(8, 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), r"k must be an integer >= 1"),
    (dict(k=5), r"k must be an integer in \[1, num_experts=4\]"),
    (dict(k=1.5), r"k must be an integer"),
    (dict(capacity_factor=0), r"capacity_factor must be a finite number > 0"),
    (dict(capacity_factor=-1.0), r"capacity_factor must be a finite number > 0"),
    (dict(capacity_factor=float("nan")), r"capacity_factor must be a finite number > 0"),
    (dict(min_capacity=-1), r"min_capacity must be an integer >= 0"),
    (dict(noisy_gate_policy="gaussian"), r"noisy_gate_policy must be one of"),
    (dict(noisy_gate_policy="RSample", k=2), r"RSample.*top-1"),
    (dict(drop_policy="random"), r"drop_policy must be one of \('position', 'probs'\)"),
    (dict(choice="both"), r"choice must be one of"),
    (dict(selection_bias=torch.zeros(3)), r"selection_bias must have shape"),
])
def test_route_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        route(LOGITS, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_route_rejects_non_finite_logits(bad):
    logits = LOGITS.clone()
    logits[3, 1] = bad
    with pytest.raises(ValueError, match="logits contain NaN or Inf"):
        route(logits)


@pytest.mark.parametrize("logits,match", [
    (torch.randn(8), "2-D tensor"), (torch.randn(2, 3, 4), "2-D tensor"),
    (torch.zeros(3, 0), "at least one expert"), (torch.ones(3, 4, dtype=torch.long), "floating"),
])
def test_route_rejects_bad_logits(logits, match):
    with pytest.raises(ValueError, match=match):
        route(logits)


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=9), r"k must be an integer in \[1, num_experts=8\]"),
    (dict(k=0), r"k must be an integer"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(eval_capacity_factor=-2.0), "capacity_factor"),
    (dict(min_capacity=-3), "min_capacity"),
    (dict(noisy_gate_policy="Gumbel"), "noisy_gate_policy"),
    (dict(drop_policy="lifo"), "drop_policy"),
    (dict(backend="cuda"), r"backend must be one of \('einsum', 'index', 'triton'\)"),
    (dict(activation="tanh"), "activation must be one of"),
    (dict(num_experts=0), "num_experts must be an integer >= 1"),
    (dict(bias_update_rate=-0.1), "bias_update_rate"),
])
def test_moe_rejects_bad_options_at_construction(kwargs, match):
    options = {"d_model": 16, "d_ff": 32, "num_experts": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        MoE(**options)


def test_moe_rejects_wrong_model_dim():
    layer = MoE(16, 32, 4)
    with pytest.raises(ValueError, match=r"last dim must be d_model=16.*\(2, 5, 12\)"):
        layer(torch.randn(2, 5, 12))


def test_router_rejects_wrong_model_dim():
    with pytest.raises(ValueError, match="d_model=8"):
        Router(8, 4)(torch.randn(3, 7))


def test_set_backend_rejects_unknown():
    layer = MoE(16, 32, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        layer.set_backend("fast")
    assert layer.backend == "index"


def test_dispatch_checks_token_count_and_backend():
    routing = route(LOGITS)
    with pytest.raises(ValueError, match=r"x must be \[tokens=8, d\]"):
        dispatch(torch.randn(7, 3), routing)
    with pytest.raises(ValueError, match="backend must be one of"):
        combine(torch.randn(4, routing.capacity, 3), routing, backend="gather")


def test_experts_check_their_input():
    experts = Experts(4, 8, 16)
    with pytest.raises(ValueError, match=r"Experts expects \[num_experts=4, rows, d_model=8\]"):
        experts(torch.randn(3, 2, 8))
    with pytest.raises(ValueError, match="offsets must have shape"):
        experts.forward_packed(torch.randn(5, 8), torch.tensor([0, 5]))


@pytest.mark.parametrize("x,match", [
    (torch.ones(3, 16, dtype=torch.long), "must be floating point .* token ids go through"),
    (torch.ones(3, 16, dtype=torch.bool), "must be floating point"),
    (torch.tensor(1.0), r"last dim must be d_model=16; got shape \(\)"),
    ([[0.0] * 16], r"must be a tensor \[..., d_model=16\]; got list"),
])
def test_moe_says_what_its_input_must_be(x, match):
    with pytest.raises(ValueError, match=match):
        MoE(16, 32, 4)(x)


def test_moe_with_no_tokens_returns_an_empty_output():
    for drop_tokens in (True, False):
        layer = MoE(16, 32, 4, k=2, drop_tokens=drop_tokens)
        x = torch.zeros(0, 16, requires_grad=True)
        y, routing = layer(x)
        assert y.shape == (0, 16) and routing.num_tokens == 0 and routing.drop_fraction == 0.0
        assert routing.counts.tolist() == [0, 0, 0, 0] and float(routing.aux_loss.detach()) == 0.0
        y.sum().backward()
