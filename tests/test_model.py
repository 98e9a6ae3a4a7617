"""The GPT: dense / MoE / PR-MoE layouts, losses, presets and sizing."""

from __future__ import annotations

import pytest
import torch

from moelab.experts import Experts
from moelab.layer import MLP, MoE
from moelab.model import GPT, PRESETS, GPTConfig, preset
from moelab.sizing import PAPER_SIZES_B, paper_table, size


def test_moe_every_other_layer_and_pyramid_schedule():
    config = GPTConfig.create(n_layer=8, experts="4/8", residual=True)
    assert config.moe_layers == (1, 3, 5, 7)  # layers 2, 4, 6, 8 (1-based), as Megatron
    assert config.expert_schedule == (4, 4, 8, 8)
    model = GPT(config)
    kinds = [type(block.ffn) for block in model.blocks]
    assert kinds == [MLP, MoE] * 4
    assert [b.ffn.num_experts for b in model.blocks if b.is_moe] == [4, 4, 8, 8]
    assert all(b.ffn.residual for b in model.blocks if b.is_moe)


def test_paper_schedules():
    assert preset("paper_350m_pr_moe_32_64").expert_schedule == (32,) * 10 + (64,) * 2
    assert preset("paper_1_3b_pr_moe_64_128").expert_schedule == (64,) * 10 + (128,) * 2
    assert preset("paper_350m_moe128").expert_schedule == (128,) * 12


def test_forward_returns_losses_and_every_routing():
    torch.manual_seed(0)
    model = GPT(preset("tiny"))
    idx = torch.randint(0, 256, (2, 16))
    out = model(idx, idx)
    assert out.logits.shape == (2, 16, 256)
    assert [r is None for r in out.routings] == [True, False, True, False]
    aux = sum(r.aux_loss for r in out.routings if r is not None)
    torch.testing.assert_close(out.aux_loss, aux)
    expected = out.lm_loss + 0.01 * out.aux_loss + 0.0 * out.z_loss
    torch.testing.assert_close(out.loss, expected)
    manual_ce = torch.nn.functional.cross_entropy(out.logits.view(-1, 256), idx.view(-1))
    torch.testing.assert_close(out.lm_loss, manual_ce)


def test_losses_without_targets_or_autograd_are_summed_on_first_read():
    torch.manual_seed(0)
    model = GPT(preset("tiny")).eval()
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        lazy = model(idx)
    assert callable(lazy.__dict__["_aux_loss"]) and callable(lazy.__dict__["_z_loss"])
    eager = model(idx)  # autograd on: summed at once, with their graph
    assert eager.aux_loss.grad_fn is not None
    moe = [r for r in lazy.routings if r is not None]
    torch.testing.assert_close(lazy.aux_loss, sum(r.aux_loss for r in moe))
    torch.testing.assert_close(lazy.aux_loss, eager.aux_loss.detach())
    torch.testing.assert_close(lazy.z_loss, eager.z_loss.detach())


def test_z_loss_coefficient_enters_the_loss():
    torch.manual_seed(0)
    model = GPT(preset("tiny", z_loss_coef=1e-3))
    idx = torch.randint(0, 256, (2, 8))
    out = model(idx, idx)
    assert out.z_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + 0.01 * out.aux_loss + 1e-3 * out.z_loss)


def test_dense_model_has_no_routing():
    model = GPT(preset("tiny", experts=0))
    out = model(torch.randint(0, 256, (1, 8)))
    assert out.routings == [None] * 4 and out.loss is None
    assert out.aux_loss.item() == 0.0


def test_meta_device_builds_paper_models_without_memory():
    model = GPT.from_preset("serve_47b_moe128", device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.num_parameters() == size(PRESETS["serve_47b_moe128"]).total


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_sizing_counts_equal_the_built_model(name):
    model = GPT.from_preset(name, device="meta")
    counted = size(PRESETS[name])
    assert counted.total == model.num_parameters()
    assert counted.expert == sum(p.numel() for m in model.modules() if isinstance(m, Experts)
                                 for p in m.parameters())


def test_sizing_reproduces_the_papers_sizes():
    rows = paper_table()
    assert {row["model"] for row in rows} == set(PAPER_SIZES_B)
    for row in rows:
        assert abs(row["ratio"] - 1) <= 0.03, row
    # the paper's Table 6 lists 1064.9B for 24B+MoE-128, the tutorial 1046.9B: both within 3%
    assert abs(size(PRESETS["serve_24b_moe128"]).total / 1064.9e9 - 1) <= 0.03


def test_top1_moe_activates_its_dense_base():
    for moe_name, dense_name in (("paper_350m_moe128", "paper_350m"),
                                 ("paper_1_3b_moe128", "paper_1_3b")):
        moe, dense = size(PRESETS[moe_name]), size(PRESETS[dense_name])
        gates = 12 * 128 * PRESETS[moe_name].d_model  # the router weights are the only extra
        assert moe.active == dense.total + gates
        assert moe.flops_per_token == dense.flops_per_token + 2 * gates


def test_bad_configs_say_what_to_change():
    with pytest.raises(ValueError, match="has 3 entries but the model has 2 MoE layers"):
        GPTConfig(n_layer=4, experts=(4, 4, 8))
    with pytest.raises(ValueError, match="'32/64'"):
        GPTConfig(experts="32-64")
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gpt5")
    with pytest.raises(ValueError, match="k=2 is larger"):
        GPTConfig.create(experts=1, k=2)
    model = GPT(preset("tiny"))
    with pytest.raises(ValueError, match="exceeds block_size=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_init_zeroes_every_bias():
    """GPT-2 / Megatron init: biases start at 0 (a random expert bias tilts routing from step 0)."""
    model = GPT(GPTConfig.create(vocab_size=32, block_size=8, n_layer=2, n_head=2, d_model=16,
                          experts=4, residual=True))
    biases = {name: p for name, p in model.named_parameters()
              if name.endswith("bias") and "ln_" not in name or ".b_" in name}
    assert any(".b_in" in name for name in biases) and any("fc_out.bias" in n for n in biases)
    for name, param in biases.items():
        assert torch.count_nonzero(param) == 0, name
