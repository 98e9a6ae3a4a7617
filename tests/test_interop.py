"""HuggingFace MoE blocks <-> moelab MoE: identical outputs both ways (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="HF interop needs the optional 'hf' extra (transformers>=4.40); "
                           "CI installs it")

from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402

from moelab.interop import from_hf, to_hf  # noqa: E402
from moelab.layer import MoE  # noqa: E402

D = 16


def _init(block: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # transformers 5 builds expert banks with torch.empty: fill every parameter
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return block


def mixtral(k: int = 2, experts: int = 4) -> MixtralSparseMoeBlock:
    config = transformers.MixtralConfig(hidden_size=D, intermediate_size=24,
                                        num_local_experts=experts, num_experts_per_tok=k,
                                        router_jitter_noise=0.0)
    config._experts_implementation = "eager"
    return _init(MixtralSparseMoeBlock(config))


def qwen(norm_topk_prob: bool, k: int = 4) -> Qwen2MoeSparseMoeBlock:
    config = transformers.Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=12, num_experts=6,
                                         num_experts_per_tok=k, norm_topk_prob=norm_topk_prob,
                                         shared_expert_intermediate_size=20)
    config._experts_implementation = "eager"
    return _init(Qwen2MoeSparseMoeBlock(config), seed=1)


def x(batch: int = 3, length: int = 7) -> torch.Tensor:
    return torch.randn(batch, length, D, generator=torch.Generator().manual_seed(2))


def assert_same(moe: MoE, block: torch.nn.Module, train: bool = False) -> None:
    moe.train(train)
    block.train(train)
    inputs = x()
    with torch.no_grad():
        ours, routing = moe(inputs.clone())
        theirs = block(inputs.clone())
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert routing.capacity is None  # dropless, like the HF blocks


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("backend", ["index", "einsum"])
def test_mixtral_block_to_moelab(k, backend):
    block = mixtral(k=k)
    moe = from_hf(block, backend=backend)
    assert moe.experts.activation == "swiglu" and moe.experts.b_in is None
    assert_same(moe, block)
    assert_same(moe, block, train=True)  # no noise or sampling either way


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_qwen2_moe_block_with_its_shared_expert_to_moelab(norm_topk_prob):
    block = qwen(norm_topk_prob)
    moe = from_hf(block)
    assert moe.residual and moe.config.residual_gate == "sigmoid"
    assert moe.mlp.fc_in.weight.shape == (40, D)  # [gate; up] of the 20-wide shared expert
    assert_same(moe, block)


@pytest.mark.parametrize("make", [lambda: mixtral(k=2), lambda: qwen(False),
                                  lambda: qwen(True, k=2)])
def test_back_to_hf(make):
    block = make()
    moe = from_hf(block)
    again = to_hf(moe)
    assert type(again) is type(block)
    assert_same(moe, again)
    for ours, theirs in zip(again.state_dict().values(), block.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_a_moelab_layer_built_here_exports():
    torch.manual_seed(0)
    moe = MoE(D, 24, 4, k=2, activation="swiglu", bias=False, drop_tokens=False,
              second_expert_sampling=False).eval()
    block = to_hf(moe)
    assert isinstance(block, MixtralSparseMoeBlock)
    assert_same(moe, block)


@pytest.mark.parametrize("kwargs, message", [
    (dict(activation="gelu", bias=False, drop_tokens=False), "SwiGLU"),
    (dict(activation="swiglu", bias=True, drop_tokens=False), "biases"),
    (dict(activation="swiglu", bias=False), "dropless"),
    (dict(activation="swiglu", bias=False, drop_tokens=False, residual=True),
     "residual_gate='softmax'"),
    (dict(activation="swiglu", bias=False, drop_tokens=False, k=1), "renormalize=True"),
])
def test_layers_without_an_hf_equivalent_are_refused(kwargs, message):
    options = dict(k=2)
    options.update(kwargs)
    with pytest.raises(ValueError, match=message):
        to_hf(MoE(D, 24, 4, **options))


def test_from_hf_refuses_other_modules():
    with pytest.raises(ValueError, match="MixtralSparseMoeBlock"):
        from_hf(torch.nn.Linear(4, 4))


def test_a_mixtral_block_with_router_jitter_is_refused_not_converted_approximately():
    config = transformers.MixtralConfig(hidden_size=D, intermediate_size=24, num_local_experts=4,
                                        num_experts_per_tok=2, router_jitter_noise=0.1)
    config._experts_implementation = "eager"
    with pytest.raises(ValueError, match=r"router_jitter_noise=0.1.*router \*and the experts\*"):
        from_hf(_init(MixtralSparseMoeBlock(config)))


def test_a_block_whose_weights_do_not_fit_together_is_named():
    block = mixtral()
    with torch.no_grad():
        block.experts.down_proj = torch.nn.Parameter(torch.zeros(4, D, 20))  # f 20, not 24
    with pytest.raises(ValueError, match=r"do not fit together: .*down_proj \(4, 16, 20\)"):
        from_hf(block)
