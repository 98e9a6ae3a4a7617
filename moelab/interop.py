"""HuggingFace transformers MoE blocks <-> moelab MoE layers, with identical outputs.

- ``from_hf(block)``: a Mixtral ``MixtralSparseMoeBlock`` or a Qwen2-MoE / Qwen1.5-MoE
  ``Qwen2MoeSparseMoeBlock`` as a moelab `MoE`;
- ``to_hf(moe)``: a moelab MoE (SwiGLU experts without biases, dropless) as one of those blocks.

How the two map (transformers 5.x layouts):

| transformers | moelab |
|---|---|
| gate.weight [E, d] (router, no bias) | router.weight [E, d] |
| experts.gate_up_proj [E, 2f, d]: [gate; up] | experts.w_in [E, d, 2f]: [gate \\| up] (.mT) |
| experts.down_proj [E, d, f] | experts.w_out [E, f, d] (.mT) |
| act silu(gate) · up | activation="swiglu", bias=False |
| Mixtral: top-k, weights renormalised | k, renormalize=True |
| Qwen2-MoE: top-k, renormalised iff norm_topk_prob | k, renormalize=norm_topk_prob |
| Qwen shared_expert (gate/up/down_proj) | residual MLP: fc_in = [gate_proj; up_proj], fc_out |
| Qwen shared_expert_gate Linear(d, 1, no bias) | coefficient, residual_gate="sigmoid" |

Both HF blocks are dropless (every token reaches its k experts), so the moelab layer is built
with ``drop_tokens=False``, and without routing noise or sampling, so it matches in train mode
too. A Mixtral block with ``router_jitter_noise > 0`` is refused (its jitter scales the experts'
input too, which moelab's Jitter does not).

transformers is an optional extra (``pip install moelab[hf]``); it is imported only when a
function here needs it.
"""

from __future__ import annotations

import torch
from torch import nn

from .layer import MoE

HF_HINT = "this needs HuggingFace transformers: pip install 'moelab[hf]' (transformers>=4.40)"


def _transformers():
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError(HF_HINT) from error
    return transformers


def _block_kind(block: nn.Module) -> str:
    name = type(block).__name__
    if name == "MixtralSparseMoeBlock":
        return "mixtral"
    if name == "Qwen2MoeSparseMoeBlock":
        return "qwen2_moe"
    raise ValueError(f"from_hf takes a MixtralSparseMoeBlock or a Qwen2MoeSparseMoeBlock; got "
                     f"{name}")


def _is_silu(module) -> bool:
    return isinstance(module, nn.SiLU) or "silu" in type(module).__name__.lower()


def _check_shapes(gate, gate_up, down) -> None:
    """gate [E, d], gate_up_proj [E, 2f, d], down_proj [E, d, f], or a ValueError naming them."""
    ok = (gate.dim() == 2 and gate_up.dim() == 3 and down.dim() == 3
          and gate.shape[0] == gate_up.shape[0] == down.shape[0]
          and gate.shape[1] == gate_up.shape[2] == down.shape[1]
          and gate_up.shape[1] == 2 * down.shape[2])
    if not ok:
        raise ValueError(f"the block's weights do not fit together: gate.weight "
                         f"{tuple(gate.shape)} (expected [E, d]), experts.gate_up_proj "
                         f"{tuple(gate_up.shape)} ([E, 2f, d]), experts.down_proj "
                         f"{tuple(down.shape)} ([E, d, f])")


@torch.no_grad()
def from_hf(block: nn.Module, backend: str = "index") -> MoE:
    """A moelab MoE computing what ``block`` computes (same device and dtype, copied weights).

    The HF block's experts must use SiLU (SwiGLU); the router is its ``gate``.
    """
    kind = _block_kind(block)
    experts = block.experts
    if not _is_silu(experts.act_fn):
        raise ValueError(f"moelab's gated activation is SwiGLU (silu(gate) · up); this block's "
                         f"experts use {type(experts.act_fn).__name__}")
    if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True):
        raise ValueError("only the [E, 2f, d] concatenated [gate; up] expert layout is "
                         "supported (this block's experts are transposed or interleaved)")
    num_experts, width, d_model = experts.gate_up_proj.shape  # [E, 2f, d]
    d_ff = width // 2
    _check_shapes(block.gate.weight, experts.gate_up_proj, experts.down_proj)
    jitter = getattr(block, "jitter_noise", 0.0)
    if jitter:
        raise ValueError(
            f"this Mixtral block has router_jitter_noise={jitter}: in training it multiplies the "
            "hidden states that reach the router *and the experts* by U(1 - ε, 1 + ε), which "
            "moelab's Jitter (router input only) does not represent. Build the block with "
            "router_jitter_noise=0 (what the released models use), or call from_hf on it in "
            "eval only after setting block.jitter_noise = 0")
    k = block.gate.top_k
    reference = experts.gate_up_proj
    layer_options = dict(k=k, drop_tokens=False, use_rts=False, noisy_gate_policy=None,
                         second_expert_sampling=False, activation="swiglu", bias=False,
                         backend=backend)
    if kind == "mixtral":
        moe = MoE(d_model, d_ff, num_experts, renormalize=True, **layer_options)
    else:
        shared = block.shared_expert
        if not _is_silu(shared.act_fn):
            raise ValueError(f"the shared expert uses {type(shared.act_fn).__name__}; moelab's "
                             f"residual MLP here is SwiGLU")
        moe = MoE(d_model, d_ff, num_experts, renormalize=bool(block.gate.norm_topk_prob),
                  residual=True, residual_gate="sigmoid",
                  residual_d_ff=shared.gate_proj.weight.shape[0], **layer_options)
        moe.mlp.fc_in.weight.copy_(torch.cat([shared.gate_proj.weight,
                                              shared.up_proj.weight], dim=0))
        moe.mlp.fc_out.weight.copy_(shared.down_proj.weight)
        moe.coefficient.weight.copy_(block.shared_expert_gate.weight)
    moe = moe.to(device=reference.device, dtype=reference.dtype)
    moe.router.weight.copy_(block.gate.weight)
    moe.experts.w_in.copy_(experts.gate_up_proj.transpose(1, 2))
    moe.experts.w_out.copy_(experts.down_proj.transpose(1, 2))
    return moe


def _check_exportable(moe: MoE) -> None:
    router = moe.router.config
    problems = []
    if moe.experts.activation != "swiglu":
        problems.append(f"activation={moe.experts.activation!r} (HF blocks use SwiGLU)")
    if moe.experts.b_in is not None:
        problems.append("expert biases (HF experts have none)")
    if router.drop_tokens:
        problems.append("drop_tokens=True (HF blocks are dropless; build with "
                        "drop_tokens=False)")
    if router.choice != "token":
        problems.append("expert-choice routing")
    if moe.parallel is not None:
        problems.append("expert parallelism (a parallelized layer holds a slice of the experts)")
    if router.bias_update_rate > 0:
        problems.append("an aux-free selection bias")
    if moe.residual and moe.config.residual_gate != "sigmoid":
        problems.append("residual_gate='softmax' (DeepSpeed's Residual-MoE has no HF block; "
                        "Qwen's shared expert is residual_gate='sigmoid')")
    if moe.residual and moe.mlp.fc_in.bias is not None:
        problems.append("a residual MLP with biases")
    if problems:
        raise ValueError("this MoE has no HuggingFace equivalent: " + "; ".join(problems))


@torch.no_grad()
def to_hf(moe: MoE) -> nn.Module:
    """The HF block for a moelab MoE: Qwen2MoeSparseMoeBlock when it has the sigmoid-gated
    residual (shared expert), MixtralSparseMoeBlock otherwise (whose weights are always
    renormalised: the layer must renormalise, which k > 1 does by default)."""
    _check_exportable(moe)
    transformers = _transformers()
    experts = moe.experts
    d_model, d_ff, num_experts = experts.d_model, experts.d_ff, moe.num_experts
    k = moe.router.k
    renormalize = moe.router.config.renormalize
    renormalize = k > 1 if renormalize is None else renormalize
    reference = experts.w_in
    if moe.residual:
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

        config = transformers.Qwen2MoeConfig(
            hidden_size=d_model, moe_intermediate_size=d_ff, num_experts=num_experts,
            num_experts_per_tok=k, norm_topk_prob=renormalize, hidden_act="silu",
            shared_expert_intermediate_size=moe.mlp.fc_out.weight.shape[1])
        config._experts_implementation = "eager"  # a standalone block: the plain loop
        block = Qwen2MoeSparseMoeBlock(config)
        gate_proj, up_proj = moe.mlp.fc_in.weight.chunk(2, dim=0)
        block.shared_expert.gate_proj.weight.copy_(gate_proj)
        block.shared_expert.up_proj.weight.copy_(up_proj)
        block.shared_expert.down_proj.weight.copy_(moe.mlp.fc_out.weight)
        block.shared_expert_gate.weight.copy_(moe.coefficient.weight)
    else:
        if not renormalize:
            raise ValueError("Mixtral renormalises the top-k weights; this layer does not "
                             "(renormalize=False, or k=1 with the default): build it with "
                             "renormalize=True")
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        config = transformers.MixtralConfig(
            hidden_size=d_model, intermediate_size=d_ff, num_local_experts=num_experts,
            num_experts_per_tok=k, hidden_act="silu", router_jitter_noise=0.0)
        config._experts_implementation = "eager"
        block = MixtralSparseMoeBlock(config)
    block = block.to(device=reference.device, dtype=reference.dtype)
    block.gate.weight.copy_(moe.router.weight)
    block.experts.gate_up_proj.copy_(experts.w_in.transpose(1, 2))
    block.experts.down_proj.copy_(experts.w_out.transpose(1, 2))
    return block
