"""MoE after DeepSpeed: fine-grained and shared experts, gpt-oss's activation, and the published
sizes of DeepSeek-V3 and Qwen3-30B-A3B reproduced from their configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab import GPT, MoE
from moelab.experts import activate
from moelab.model import preset
from moelab.modern import PUBLISHED_SIZES, fine_grained, published_table
from moelab.sizing import size


def test_fine_grained_with_m_1_and_no_shared_experts_is_todays_moe():
    """m=1 returns the config unchanged, and an explicit expert width equal to d_ff (what m=1
    would set) builds the same model, the same numbers bit for bit."""
    config = preset("tiny", experts=4, k=2)
    assert fine_grained(config, 1) is config
    explicit = config.replace(expert_d_ff=config.ffn_dim)
    models = []
    for c in (config, explicit):
        torch.manual_seed(0)
        models.append(GPT(c).eval())
    idx = torch.randint(0, config.vocab_size, (2, 8))
    torch.testing.assert_close(models[0](idx).logits, models[1](idx).logits, rtol=0, atol=0)


@pytest.mark.parametrize("m,n_shared", [(2, 0), (4, 1), (2, 2), (4, 3)])
def test_fine_grained_keeps_the_active_ffn_flops(m, n_shared):
    """m× more experts, 1/m as wide, k·m chosen of which n_shared always on: each token's FFN
    matrices hold as many weights as before (2·d·f per FFN of width f)."""
    config = preset("tiny", experts=4, k=2, drop_tokens=False)
    fine = fine_grained(config, m, n_shared)
    d, width = config.d_model, config.ffn_dim // m
    assert fine.expert_schedule == tuple(4 * m for _ in config.expert_schedule)
    assert (fine.moe.router.k, fine.moe.expert_d_ff) == (2 * m - n_shared, width)
    assert (fine.moe.residual_d_ff or 0) == n_shared * width

    def ffn_weights_per_token(c):
        routed = c.moe.router.k * 2 * d * (c.moe.expert_d_ff or c.ffn_dim)
        return routed + (2 * d * c.moe.residual_d_ff if c.moe.residual else 0)

    assert ffn_weights_per_token(fine) == ffn_weights_per_token(config)
    # sizing agrees: per MoE layer, the weights cancel and what changes is the router (4m·d
    # instead of 4·d) and one output bias d per FFN a token runs (k' routed, 1 shared MLP, vs 2)
    routed = fine.moe.router.k
    per_layer = 4 * d * (m - 1) + d * (routed + (n_shared > 0) - 2)
    assert size(fine).active == size(config).active + len(config.moe_layers) * per_layer
    model = GPT(fine)
    assert model.num_parameters() == size(fine).total
    out = model(torch.randint(0, fine.vocab_size, (2, 8)))
    assert all(r.expert.shape[1] == 2 * m - n_shared for r in out.routings if r is not None)


def test_fine_grained_says_what_it_cannot_do():
    config = preset("tiny", experts=4)
    with pytest.raises(ValueError, match="m=3 must divide"):
        fine_grained(config, 3)
    with pytest.raises(ValueError, match="m must be"):
        fine_grained(config, 0)
    with pytest.raises(ValueError, match="n_shared=2 must be below k·m = 2"):
        fine_grained(config, 2, n_shared=2)
    with pytest.raises(ValueError, match="residual=False"):
        fine_grained(preset("tiny", experts=4, residual=True), 2, n_shared=1)


def test_a_shared_expert_is_a_dense_mlp_added_to_the_moe():
    """residual_gate='none': y = MoE(x) + MLP(x), the same MoE and MLP run on their own."""
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, k=2, activation="swiglu", residual=True, residual_gate="none",
                residual_d_ff=12, drop_tokens=False).double().eval()
    assert not hasattr(layer, "coefficient")
    plain = MoE(8, 16, 4, k=2, activation="swiglu", drop_tokens=False).double().eval()
    plain.load_state_dict({k: v for k, v in layer.state_dict().items()
                           if not k.startswith("mlp.")})
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    y, _ = layer(x)
    routed, _ = plain(x)
    torch.testing.assert_close(y, routed + layer.mlp(x.reshape(-1, 8)).reshape(2, 5, 8))


@settings(max_examples=50, deadline=None)
@given(st.floats(0.5, 3.0), st.floats(0.5, 10.0))
def test_clamped_swiglu_follows_gpt_oss(alpha, limit):
    """gpt-oss's expert activation, written out per element: gate clamped from above, up both
    ways, gate · sigmoid(alpha · gate) · (up + 1)."""
    h = torch.randn(3, 8, dtype=torch.float64) * 6
    out = activate(h, "clamped_swiglu", alpha=alpha, limit=limit)
    for i in range(3):
        for j in range(4):
            gate, up = min(h[i, j].item(), limit), max(-limit, min(h[i, 4 + j].item(), limit))
            expected = gate / (1 + math.exp(-alpha * gate)) * (up + 1)
            assert abs(out[i, j].item() - expected) < 1e-12


def test_clamped_swiglu_experts_and_mlp_share_the_constants():
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, k=2, activation="clamped_swiglu", swiglu_alpha=1.2, swiglu_limit=0.5,
                residual=True, residual_gate="none").double()
    assert layer.experts.swiglu_limit == layer.mlp.swiglu_limit == 0.5
    x = torch.randn(6, 8, dtype=torch.float64)
    h = layer.mlp.fc_in(x)
    gate, up = h.chunk(2, dim=-1)
    gate, up = gate.clamp(max=0.5), up.clamp(-0.5, 0.5)
    expected = layer.mlp.fc_out(gate * torch.sigmoid(1.2 * gate) * (up + 1))
    torch.testing.assert_close(layer.mlp(x), expected)
    assert not torch.allclose(layer.mlp(x), layer.mlp.fc_out(F.silu(h[:, :16]) * h[:, 16:]))


def test_the_triton_backend_refuses_an_activation_its_kernel_lacks():
    with pytest.raises(ValueError, match="clamped_swiglu"):
        MoE(8, 16, 4, activation="clamped_swiglu", backend="triton")


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZES))
def test_published_sizes_are_reproduced_within_3_percent(name):
    (row,) = [row for row in published_table() if row["model"] == name]
    assert abs(row["total_B"] / row["published_total_B"] - 1) <= 0.03, row
    assert abs(row["active_B"] / row["published_active_B"] - 1) <= 0.03, row
    model = GPT.from_preset(name, device="meta")
    assert model.num_parameters() == size(preset(name)).total


def test_deepseek_v3_preset_routes_as_published():
    config = preset("deepseek_v3")
    router = config.moe.router
    assert (router.score, router.n_group, router.topk_group, router.k) == ("sigmoid", 8, 4, 8)
    assert router.routed_scaling_factor == 2.5 and config.moe.residual_gate == "none"
    assert config.moe_layers == tuple(range(3, 61))


@pytest.mark.parametrize("name,gpus", [("deepseek_v3", 256), ("qwen3_30b_a3b", 8)])
def test_the_serving_model_counts_shared_and_fine_grained_experts(name, gpus):
    """The cost model reads the same block counts as sizing: the weights it places on each GPU
    add up to the model (shared experts sit with the tensor-sliced part, routed experts spread
    over the expert-parallel ranks)."""
    from moelab.serving import BYTES_PER_PARAM, embedding_params, layer_params, predict

    config, sizes = preset(name), size(preset(name))
    blocks = layer_params(config)
    assert sum(b["shared"] + b["experts"] * b["expert"] for b in blocks) \
        + embedding_params(config) == sizes.total
    p = predict(name, gpus, batch=1, context=0, dtype="fp16")
    expected = (sizes.non_expert + sizes.expert / gpus) * BYTES_PER_PARAM["fp16"]
    assert math.isclose(p.memory_per_gpu, expected, rel_tol=1e-9)
    assert p.latency_s > 0
