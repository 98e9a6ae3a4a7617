"""Dispatch/combine backends, Experts and the MoE layer against per-token references."""

from __future__ import annotations

import itertools

import pytest
import torch
from reference import reference_moe_forward
from torch.func import functional_call

from moelab import Experts, MoE, combine, dispatch, dispatch_masks, expert_offsets, route

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
                                     dict(k=2, drop_tokens=False), dict(k=3, backend="einsum")],
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
            offsets = expert_offsets(routing)
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


@pytest.mark.parametrize("options", LAYER_CASES, ids=str)
def test_inference_forward_equals_the_token_loop(options):
    """The no-grad path (in-place combine, grouped experts) against the per-token reference."""
    layer = make_layer(**options).eval()
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    with torch.no_grad():
        y, routing = layer(x)
        expected = reference_moe_forward(layer, x, routing)
    torch.testing.assert_close(y, expected)


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
        layer.residual = False
        y_plain, _ = layer(x)
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
