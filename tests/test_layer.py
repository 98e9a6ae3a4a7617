"""The MoE layer: backends against each other and a token loop, gradients, Residual-MoE."""

from __future__ import annotations

import pytest
import torch
from reference import reference_moe_forward
from torch.func import functional_call

from moelab import MoE

LAYER_CASES = [
    dict(k=1), dict(k=2), dict(k=3), dict(k=1, drop_tokens=False), dict(k=2, drop_tokens=False),
    dict(k=2, drop_policy="probs", capacity_factor=0.5), dict(k=1, residual=True),
    dict(k=2, activation="swiglu", bias=False), dict(k=1, choice="expert"),
    dict(k=2, activation="relu", capacity_factor=0.5, min_capacity=1),
]


def make_layer(seed=0, dtype=torch.float64, **options):
    torch.manual_seed(seed)
    options = {"use_rts": False, **options}
    return MoE(d_model=8, d_ff=16, num_experts=4, **options).to(dtype)


@pytest.mark.parametrize("options", LAYER_CASES, ids=str)
def test_backends_agree_with_each_other_and_a_token_loop(options):
    layer = make_layer(**options).eval()
    x = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    outputs, grads = {}, {}
    for backend in ("index", "einsum"):
        layer.set_backend(backend)
        y, routing = layer(x)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()
        params = [x, *layer.parameters()]
        grads[backend] = torch.autograd.grad(loss, params, allow_unused=True)
        outputs[backend] = y.detach()
    torch.testing.assert_close(outputs["index"], outputs["einsum"])
    for g_index, g_einsum in zip(grads["index"], grads["einsum"], strict=True):
        if g_index is None or g_einsum is None:
            assert g_index is None and g_einsum is None
        else:
            torch.testing.assert_close(g_index, g_einsum)
    with torch.no_grad():
        expected = reference_moe_forward(layer, x, routing)
    torch.testing.assert_close(outputs["index"], expected)
    assert y.shape == x.shape


def test_router_receives_gradient_through_combine_weights():
    layer = make_layer(k=2).eval()
    x = torch.randn(10, 8, dtype=torch.float64)
    y, routing = layer(x)
    (gate_grad,) = torch.autograd.grad(y.square().sum(), layer.router.weight)
    assert gate_grad.abs().sum() > 0


@pytest.mark.parametrize("options", [dict(k=1), dict(k=2, residual=True),
                                     dict(k=2, drop_tokens=False), dict(k=3, backend="einsum"),
                                     dict(k=2, activation="swiglu", scale_expert_input=True)],
                         ids=str)
def test_gradcheck_float64(options):
    layer = make_layer(**options).eval()
    names = [name for name, _ in layer.named_parameters()]
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def forward(x, *flat_params):
        return functional_call(layer, dict(zip(names, flat_params, strict=True)), (x,))[0]

    # fast_mode checks random projections of the full Jacobian (Chen et al.), not every entry
    assert torch.autograd.gradcheck(forward, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("options", LAYER_CASES, ids=str)
def test_inference_forward_equals_the_token_loop(options):
    """The no-grad path (in-place combine, grouped experts) against the per-token reference."""
    layer = make_layer(**options).eval()
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    with torch.no_grad():
        y, routing = layer(x)
        expected = reference_moe_forward(layer, x, routing)
    torch.testing.assert_close(y, expected)


def test_residual_moe_mixes_dense_and_expert_branches():
    layer = make_layer(residual=True, k=1).eval()
    x = torch.randn(5, 8, dtype=torch.float64)
    with torch.no_grad():
        layer.coefficient.weight.zero_()
        layer.coefficient.bias.copy_(torch.tensor([0.0, 50.0]))  # coefficient ≈ (0, 1)
        y, _ = layer(x)
        torch.testing.assert_close(y, layer.mlp(x))
        layer.coefficient.bias.copy_(torch.tensor([50.0, 0.0]))  # coefficient ≈ (1, 0)
        y_moe, _ = layer(x)
        y_plain, _ = make_layer(residual=False, k=1).eval()(x)  # same seed: same experts
    torch.testing.assert_close(y_moe, y_plain)


def test_layer_keeps_input_dtype_and_shape():
    layer = MoE(16, 32, 4, k=2)
    x = torch.randn(2, 3, 16)
    y, routing = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert routing.num_tokens == 6 and routing.k == 2
    assert routing.aux_loss.requires_grad


def test_eval_routing_is_deterministic_with_rts():
    layer = MoE(8, 16, 4, k=1, use_rts=True, capacity_factor=0.5).eval()
    x = torch.randn(64, 8)
    first = layer(x)[1].slot
    for _ in range(3):
        assert torch.equal(layer(x)[1].slot, first)


def test_gradcheck_every_jacobian_entry_at_tiny_size():
    torch.manual_seed(3)
    layer = MoE(d_model=3, d_ff=4, num_experts=3, k=2, residual=True,
                use_rts=False).double().eval()
    names = [name for name, _ in layer.named_parameters()]
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def forward(x, *flat_params):
        return functional_call(layer, dict(zip(names, flat_params, strict=True)), (x,))[0]

    assert torch.autograd.gradcheck(forward, (x, *params), eps=1e-6, atol=1e-5)


def _swiglu_expert(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of a SwiGLU bank without biases, written out: (silu(x·G) · x·U) · W_out."""
    gate, up = (x @ experts.w_in[e]).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ experts.w_out[e]


@pytest.mark.parametrize("options", [dict(k=1, drop_tokens=False, score="sigmoid"),
                                     dict(k=2, drop_tokens=False),
                                     dict(k=2, capacity_factor=0.5, min_capacity=1)], ids=str)
@pytest.mark.parametrize("backend", ["index", "einsum"])
def test_scale_expert_input_weights_the_input_as_llama_4_does(options, backend):
    """scale_expert_input: y_s = Σ_j E_j(w_sj · x_s) token by token (Llama 4), which for SwiGLU
    experts is not Σ_j w_sj · E_j(x_s)."""
    layer = make_layer(activation="swiglu", bias=False, scale_expert_input=True,
                       backend=backend, **options).eval()
    x = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    y, routing = layer(x)
    tokens = x.detach().reshape(-1, 8)
    expected, output_weighted = torch.zeros_like(tokens), torch.zeros_like(tokens)
    with torch.no_grad():
        for s in range(tokens.shape[0]):
            for j in range(routing.k):
                if routing.slot[s, j] >= 0:
                    e, w = int(routing.expert[s, j]), routing.weight[s, j]
                    expected[s] += _swiglu_expert(layer.experts, e, w * tokens[s])
                    output_weighted[s] += w * _swiglu_expert(layer.experts, e, tokens[s])
    torch.testing.assert_close(y.detach().reshape(-1, 8), expected)
    assert not torch.allclose(expected, output_weighted)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], y.detach())  # the inference path too
    # the router learns through the scaled input
    (gate_grad,) = torch.autograd.grad(y.square().sum(), layer.router.weight)
    assert gate_grad.abs().sum() > 0


def test_scale_expert_input_gradients_agree_between_backends():
    layer = make_layer(k=2, activation="swiglu", bias=False, drop_tokens=False,
                       scale_expert_input=True).eval()
    x = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    grads = {}
    for backend in ("index", "einsum"):
        layer.set_backend(backend)
        y, _ = layer(x)
        grads[backend] = torch.autograd.grad(y.sin().sum(), [x, *layer.parameters()])
    for g_index, g_einsum in zip(grads["index"], grads["einsum"], strict=True):
        torch.testing.assert_close(g_index, g_einsum)
