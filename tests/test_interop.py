"""HuggingFace MoE blocks <-> moelab MoE: identical outputs both ways (fp32, 1e-5).

The reference is each block's own transformers code: a small config, every weight random (as
transformers 5 builds expert banks with torch.empty), and the two outputs compared in eval and
in train mode (none of these blocks has randomness)."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="HF interop needs the optional 'hf' extra (transformers>=5); "
                           "CI installs it")

from moelab.interop import HF_BLOCKS, HF_CONFIGS, from_hf, hf_block_class, to_hf  # noqa: E402
from moelab.layer import MoE  # noqa: E402

D = 16

#: A small config of each block; a case's options go on top.
SMALL = {
    "mixtral": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                    router_jitter_noise=0.0),
    "qwen2_moe": dict(moe_intermediate_size=12, num_experts=6, num_experts_per_tok=4,
                      norm_topk_prob=False, shared_expert_intermediate_size=20),
    "qwen3_moe": dict(moe_intermediate_size=12, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True),
    "olmoe": dict(intermediate_size=12, num_experts=8, num_experts_per_tok=3),
    "deepseek_v3": dict(moe_intermediate_size=8, n_routed_experts=16, n_shared_experts=2,
                        num_experts_per_tok=4, n_group=4, topk_group=2,
                        routed_scaling_factor=2.5, norm_topk_prob=True),
    "gpt_oss": dict(intermediate_size=12, num_local_experts=8, num_experts_per_tok=2),
    "llama4": dict(intermediate_size=12, num_local_experts=4, num_experts_per_tok=1),
}


def hf_class(kind: str) -> type:
    try:
        return hf_block_class(kind)
    except (ImportError, AttributeError) as error:
        pytest.skip(f"this transformers ({transformers.__version__}) has no "
                    f"{HF_BLOCKS[kind]}: {error}")


def _init(block: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # transformers 5 builds expert banks with torch.empty: fill every parameter
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))
        if hasattr(block, "gate") and hasattr(block.gate, "e_score_correction_bias"):
            # DeepSeek-V3's selection bias, nonzero so that it (and the groups) change choices
            bias = block.gate.e_score_correction_bias
            bias.copy_(0.5 * torch.randn(bias.shape, generator=generator))
    return block


def build(kind: str, seed: int = 0, **options) -> torch.nn.Module:
    block_class = hf_class(kind)
    config = getattr(transformers, HF_CONFIGS[kind])(hidden_size=D, **{**SMALL[kind], **options})
    config._experts_implementation = "eager"
    with warnings.catch_warnings():  # DeepSeek-V3 without shared experts: zero-width Linears
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
        return _init(block_class(config), seed)


def x(batch: int = 3, length: int = 7) -> torch.Tensor:
    return torch.randn(batch, length, D, generator=torch.Generator().manual_seed(2))


def hf_forward(block: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The block's output [B, T, d] (gpt-oss and Llama 4 return a tuple; Llama 4's is [B·T, d])."""
    out = block(inputs)
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(inputs.shape)


def assert_same(moe: MoE, block: torch.nn.Module, train: bool = False) -> None:
    moe.train(train)
    block.train(train)
    inputs = x()
    with torch.no_grad():
        ours, routing = moe(inputs.clone())
        theirs = hf_forward(block, inputs.clone())
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert routing.capacity is None  # dropless, like the HF blocks


# ------------------------------------------------------------------------ HF -> moelab

CASES = [
    ("mixtral", dict(num_experts_per_tok=1)), ("mixtral", dict()),
    ("mixtral", dict(num_experts_per_tok=3)),
    ("qwen2_moe", dict()), ("qwen2_moe", dict(norm_topk_prob=True, num_experts_per_tok=2)),
    ("qwen3_moe", dict()), ("qwen3_moe", dict(norm_topk_prob=False, num_experts_per_tok=1)),
    ("olmoe", dict()), ("olmoe", dict(norm_topk_prob=True)),
    ("deepseek_v3", dict()), ("deepseek_v3", dict(norm_topk_prob=False, topk_group=3)),
    ("deepseek_v3", dict(num_experts_per_tok=1, n_shared_experts=1, routed_scaling_factor=1.0)),
    ("deepseek_v3", dict(n_group=1, topk_group=1, n_shared_experts=0)),
    ("gpt_oss", dict()), ("gpt_oss", dict(swiglu_limit=1.0, swiglu_alpha=1.2)),
    ("gpt_oss", dict(num_experts_per_tok=1)),
    ("llama4", dict()), ("llama4", dict(num_experts_per_tok=2)),
]
CASE_IDS = [f"{kind}-{options}" for kind, options in CASES]


@pytest.mark.parametrize("kind, options", CASES, ids=CASE_IDS)
def test_each_hf_block_imports_with_the_same_outputs_in_eval_and_training(kind, options):
    block = build(kind, **options)
    moe = from_hf(block)
    assert_same(moe, block)
    assert_same(moe, block, train=True)  # no noise or sampling on either side


@pytest.mark.parametrize("kind", ["qwen2_moe", "deepseek_v3", "gpt_oss", "llama4"])
def test_the_einsum_backend_imports_the_same(kind):
    block = build(kind)
    assert_same(from_hf(block, backend="einsum"), block)


def test_qwen2_moe_shared_expert_is_the_sigmoid_gated_residual():
    moe = from_hf(build("qwen2_moe"))
    assert moe.residual and moe.config.residual_gate == "sigmoid"
    assert moe.mlp.fc_in.weight.shape == (40, D)  # [gate; up] of the 20-wide shared expert


def test_deepseek_v3_bias_and_groups_really_change_the_choice():
    """The correction bias and the groups choose other experts than a plain top-k of the
    sigmoid scores for some tokens, and dropping the bias would change the output: the parity
    above exercises both."""
    block = build("deepseek_v3").eval()
    moe = from_hf(block).eval()
    config = moe.router.config
    assert (config.score, config.n_group, config.topk_group, config.use_selection_bias,
            config.routed_scaling_factor, moe.config.residual_gate) == (
        "sigmoid", 4, 2, True, 2.5, "none")
    assert moe.mlp.fc_out.in_features == 16  # 2 shared experts of width 8
    tokens = x().reshape(-1, D)
    with torch.no_grad():
        _, _, chosen = block.gate(tokens)
        plain = torch.sigmoid(tokens @ block.gate.weight.t()).topk(4, dim=-1).indices
        differs = [set(a.tolist()) != set(b.tolist()) for a, b in zip(chosen, plain, strict=True)]
        assert sum(differs) > len(differs) // 4
        unbiased = from_hf(block).eval()
        unbiased.router.config = config.replace(use_selection_bias=False)
        assert not torch.allclose(unbiased(x())[0], hf_forward(block, x()), atol=1e-3)


def test_gpt_oss_clamps_and_reads_the_interleaved_bank():
    block = build("gpt_oss", swiglu_limit=1.0, swiglu_alpha=1.2)
    moe = from_hf(block)
    assert (moe.experts.activation, moe.experts.swiglu_alpha, moe.experts.swiglu_limit) == (
        "clamped_swiglu", 1.2, 1.0)
    assert moe.router.bias is not None and moe.experts.b_in is not None
    with torch.no_grad():  # the clamp is active on these inputs: the limit matters
        h = x().reshape(-1, D) @ moe.experts.w_in[0] + moe.experts.b_in[0]
    assert (h.abs() > 1.0).float().mean() > 0.2
    # gate = columns 0::2 of gate_up_proj, up = 1::2
    torch.testing.assert_close(moe.experts.w_in[:, :, :12], block.experts.gate_up_proj[..., ::2])
    torch.testing.assert_close(moe.experts.w_in[:, :, 12:], block.experts.gate_up_proj[..., 1::2])


def test_llama4_scales_the_expert_input_which_is_not_the_output_weighting():
    block = build("llama4", num_experts_per_tok=2).eval()
    moe = from_hf(block).eval()
    assert moe.config.scale_expert_input and moe.router.config.score == "sigmoid"
    output_weighted = MoE(D, 12, 4, moe.config.replace(scale_expert_input=False))
    output_weighted.load_state_dict(moe.state_dict())
    with torch.no_grad():
        assert not torch.allclose(output_weighted.eval()(x())[0], hf_forward(block, x()),
                                  atol=1e-3)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3",
                                  "llama4"])
def test_a_block_whose_experts_are_not_swiglu_is_refused(kind):
    with pytest.raises(ValueError, match=r"SwiGLU.*this block's experts use GELUActivation "
                                         r"\(hidden_act\)"):
        from_hf(build(kind, hidden_act="gelu"))


def test_a_deepseek_block_whose_k_does_not_fit_its_groups_is_refused():
    # HF's top-k would pick masked (-inf) experts outside the kept groups
    with pytest.raises(ValueError, match=r"k=5 is more than the 4 experts of topk_group=1"):
        from_hf(build("deepseek_v3", num_experts_per_tok=5, topk_group=1))


def test_a_mixtral_block_with_router_jitter_is_refused_not_converted_approximately():
    with pytest.raises(ValueError, match=r"router_jitter_noise=0.1.*router \*and the experts\*"):
        from_hf(build("mixtral", router_jitter_noise=0.1))


def test_a_gpt_oss_bank_in_another_layout_is_refused():
    block = build("gpt_oss")
    block.experts.is_concatenated = True  # as if transformers stopped interleaving gate and up
    with pytest.raises(ValueError, match=r"GptOssExperts declares .*transformers changed"):
        from_hf(block)


def test_a_bank_without_packed_weights_is_refused():
    block = build("qwen3_moe")
    del block.experts.gate_up_proj  # transformers 4 kept a ModuleList of experts
    with pytest.raises(ValueError, match=r"no packed gate_up_proj.*transformers"):
        from_hf(block)


def test_from_hf_refuses_other_modules():
    with pytest.raises(ValueError, match="MixtralSparseMoeBlock.*Llama4TextMoe; got Linear"):
        from_hf(torch.nn.Linear(4, 4))


def test_a_block_whose_weights_do_not_fit_together_is_named():
    block = build("mixtral")
    with torch.no_grad():
        block.experts.down_proj = torch.nn.Parameter(torch.zeros(4, D, 20))  # f 20, not 24
    with pytest.raises(ValueError, match=r"do not fit together: .*down_proj \(4, 16, 20\)"):
        from_hf(block)


# ------------------------------------------------------------------------ moelab -> HF

@pytest.mark.parametrize("kind, options", CASES, ids=CASE_IDS)
def test_back_to_hf_gives_the_same_block(kind, options):
    block = build(kind, **options)
    moe = from_hf(block)
    again = to_hf(moe, kind)
    assert type(again) is type(block)
    assert_same(moe, again)
    assert_same(moe, again, train=True)
    theirs = block.state_dict()
    assert list(again.state_dict()) == list(theirs)
    for name, value in again.state_dict().items():
        torch.testing.assert_close(value, theirs[name], atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("kind, options", CASES, ids=CASE_IDS)
def test_to_hf_without_a_kind_picks_a_block_computing_the_same(kind, options):
    moe = from_hf(build(kind, **options))
    expected = kind
    if kind in ("qwen3_moe", "olmoe"):  # the same router: Mixtral's when it renormalises
        expected = "mixtral" if moe.router.config.renormalize else "qwen3_moe"
    block = to_hf(moe)
    assert type(block).__name__ == HF_BLOCKS[expected]
    assert_same(moe, block)


def random_layer(seed: int = 0, **options) -> MoE:
    torch.manual_seed(seed)
    options = {"activation": "swiglu", "bias": False, "drop_tokens": False,
               "second_expert_sampling": False, **options}
    return MoE(D, options.pop("d_ff", 24), options.pop("experts", 4), **options).eval()


@pytest.mark.parametrize("kind, options", [
    ("mixtral", dict(k=2)),
    ("qwen3_moe", dict(k=1)),
    ("qwen2_moe", dict(k=2, renormalize=False, residual=True, residual_gate="sigmoid",
                       residual_d_ff=20)),
    ("deepseek_v3", dict(k=4, experts=16, d_ff=8, score="sigmoid", n_group=4, topk_group=2,
                         routed_scaling_factor=2.5, renormalize=True, residual=True,
                         residual_gate="none", residual_d_ff=16, use_selection_bias=True)),
    ("deepseek_v3", dict(k=2, experts=8, score="sigmoid")),  # no shared experts
    ("gpt_oss", dict(k=2, activation="clamped_swiglu", swiglu_limit=0.5)),  # zero biases
    ("gpt_oss", dict(k=2, activation="clamped_swiglu", bias=True, router_bias=True)),
    ("llama4", dict(k=1, score="sigmoid", scale_expert_input=True, residual=True,
                    residual_gate="none")),
], ids=str)
def test_a_moelab_layer_built_here_exports(kind, options):
    moe = random_layer(**options)
    with torch.no_grad():
        moe.router.selection_bias.normal_(0, 0.5)  # used only with use_selection_bias
    block = to_hf(moe)
    assert type(block).__name__ == HF_BLOCKS[kind]
    assert_same(moe, block)


@pytest.mark.parametrize("kind, options, message", [
    (None, dict(activation="gelu"), "SwiGLU"),
    (None, dict(bias=True), "expert biases"),
    (None, dict(drop_tokens=True), "dropless"),
    (None, dict(residual=True), r"residual_gate='softmax' \(.*DeepSpeed's Residual-MoE"),
    ("mixtral", dict(k=1), "renormalize=True"),
    ("mixtral", dict(score="sigmoid"), r"score='sigmoid'"),
    ("qwen3_moe", dict(router_bias=True), "a router bias"),
    ("qwen3_moe", dict(n_group=2, routed_scaling_factor=2.0),
     r"routed_scaling_factor=2.0 .*group-limited routing \(n_group=2"),
    ("qwen2_moe", dict(), r"no residual branch \(Qwen2MoeSparseMoeBlock has "
                          r"residual_gate='sigmoid'\)"),
    ("gpt_oss", dict(), r"activation='swiglu' \(GptOssMLP uses gpt-oss's clamped SwiGLU\)"),
    ("deepseek_v3", dict(score="sigmoid", residual=True, residual_gate="none",
                         residual_d_ff=30), r"residual MLP 30 wide .*width 24"),
    ("deepseek_v3", dict(score="sigmoid", n_group=4, topk_group=2), r"groups of 1 expert"),
    ("llama4", dict(score="sigmoid", residual=True, residual_gate="none"),
     r"scale_expert_input=False \(Llama4TextMoe scales the experts' input\)"),
    ("llama4", dict(score="sigmoid", scale_expert_input=True, residual=True,
                    residual_gate="none", residual_d_ff=12), r"residual MLP 12 wide"),
    ("mixtral", dict(scale_expert_input=True), r"scale_expert_input=True"),
    ("deepseek_v3", dict(score="sigmoid", bias_update_rate=0.001),
     r"bias_update_rate > 0.*use_selection_bias=True"),
], ids=str)
def test_layers_without_an_hf_equivalent_are_refused(kind, options, message):
    options = dict(dict(k=2, activation="swiglu", bias=False, drop_tokens=False), **options)
    with pytest.raises(ValueError, match=message):
        to_hf(MoE(D, 24, 4, **options), kind)


def test_to_hf_names_the_kinds_it_takes():
    with pytest.raises(ValueError, match=r"kind must be one of \('mixtral', .*'llama4'\)"):
        to_hf(random_layer(k=2), "switch")
