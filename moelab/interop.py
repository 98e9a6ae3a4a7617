"""HuggingFace transformers MoE blocks <-> moelab MoE layers, with identical outputs.

- ``from_hf(block)``: one of the transformers 5 MoE blocks below as a moelab `MoE` (same device
  and dtype, the weights copied);
- ``to_hf(moe, kind=None)``: a moelab MoE as one of those blocks (``kind`` names it; None
  picks the block the layer's options describe).

What each block computes, as moelab options (every block here is dropless and has no routing
noise, so the layer is built with ``drop_tokens=False`` and no RTS, Jitter or sampling, and it
matches in train mode too; experts are SwiGLU without biases unless the row says otherwise):

| kind | transformers block | moelab options |
|---|---|---|
| mixtral | MixtralSparseMoeBlock | softmax top-k, renormalize=True |
| qwen2_moe | Qwen2MoeSparseMoeBlock | renormalize=norm_topk_prob, residual_gate="sigmoid" |
| qwen3_moe | Qwen3MoeSparseMoeBlock | renormalize=norm_topk_prob |
| olmoe | OlmoeSparseMoeBlock | renormalize=norm_topk_prob (False in OLMoE) |
| deepseek_v3 | DeepseekV3MoE | score="sigmoid", DeepSeek's routing (1), residual_gate="none" |
| gpt_oss | GptOssMLP | router_bias, renormalize=True, activation="clamped_swiglu" (2) |
| llama4 | Llama4TextMoe | score="sigmoid", scale_expert_input (3), residual_gate="none" |

(1) DeepSeek-V3 chooses by sigmoid score + e_score_correction_bias inside the topk_group best of
n_group groups and weighs by the unbiased score, renormalised iff norm_topk_prob, times
routed_scaling_factor: ``use_selection_bias=True`` (the bias fixed in router.selection_bias),
``n_group``, ``topk_group``, ``renormalize``, ``routed_scaling_factor``; its n_shared_experts
shared experts are one residual MLP n · f wide (none when n_shared_experts = 0).
(2) gpt-oss: top-k of the logits (its router has a bias), then a softmax over the k chosen,
which is the softmax renormalised over them; experts with biases and gpt-oss's clamped SwiGLU
(``swiglu_alpha``, ``swiglu_limit`` from the block), ``bias=True``.
(3) Llama 4: top-k of the logits, sigmoid of the chosen, renormalize=False; the score
multiplies each chosen expert's *input*, y = Σ_j E_j(s_j · x) + MLP(x), which for SwiGLU experts
is not Σ_j s_j · E_j(x): ``scale_expert_input=True``. Its shared expert is as wide as an expert.

``to_hf`` rebuilds every one of these blocks from a moelab layer whose options are in its row
(all seven round-trip exactly, weights bit for bit). One corner differs by construction: a
renormalised token whose chosen scores sum below float32's eps (1.2e-7; DeepSeek sigmoids of
logits under about -16) is divided by eps in moelab (DeepSpeed's clamp) and by the sum + 1e-20
in DeepSeek-V3.

How the weights map (transformers 5 packs each expert matrix into one tensor):

| transformers | moelab |
|---|---|
| gate.weight or router.weight [E, d]; gpt-oss router.bias [E] | router.weight; router.bias |
| experts.gate_up_proj [E, 2f, d]: [gate; up] | experts.w_in [E, d, 2f]: [gate \\| up] (.mT) |
| experts.down_proj [E, d, f] | experts.w_out [E, f, d] (.mT) |
| Llama 4: gate_up_proj [E, d, 2f] = [gate \\| up], down_proj [E, f, d] | w_in, w_out as they are |
| gpt-oss: gate_up_proj [E, d, 2f], gate 0::2 and up 1::2 | w_in = [gate \\| up] |
| gpt-oss: gate_up_proj_bias [E, 2f] (interleaved alike), down_proj_bias [E, d] | b_in, b_out |
| DeepSeek gate.e_score_correction_bias [E] | router.selection_bias [E] |
| shared expert(s) gate_proj, up_proj [g, d], down_proj [d, g] | mlp.fc_in = [gate; up], fc_out |
| Qwen2-MoE shared_expert_gate Linear(d, 1, no bias) | coefficient (residual_gate="sigmoid") |

Refused, never converted approximately (a ValueError naming what is missing): experts or
shared experts whose activation is not SiLU (moelab's gated activation is SwiGLU), a Mixtral
block with ``router_jitter_noise > 0`` (its jitter scales the experts' input too, which
moelab's Jitter does not), a DeepSeek-V3 block whose k does not fit in its topk_group groups,
and expert layouts other than the ones above. ``to_hf`` refuses a layer with no equivalent
in the chosen block, naming each option that has none.

The exported block computes the layer's eval-mode function; moelab's training-only routing
noise (second-expert sampling, Jitter, RSample) has no HF counterpart and is not exported.

transformers is an optional extra (``pip install moelab[hf]``); it is imported only when a
function here needs it.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .layer import MoE

HF_HINT = "this needs HuggingFace transformers: pip install 'moelab[hf]' (transformers>=5)"

#: The transformers MoE blocks interop reads and writes, by the kind ``to_hf`` takes.
HF_BLOCKS = {
    "mixtral": "MixtralSparseMoeBlock",
    "qwen2_moe": "Qwen2MoeSparseMoeBlock",
    "qwen3_moe": "Qwen3MoeSparseMoeBlock",
    "olmoe": "OlmoeSparseMoeBlock",
    "deepseek_v3": "DeepseekV3MoE",
    "gpt_oss": "GptOssMLP",
    "llama4": "Llama4TextMoe",
}
#: The config class each block is built from.
HF_CONFIGS = {
    "mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig", "qwen3_moe": "Qwen3MoeConfig",
    "olmoe": "OlmoeConfig", "deepseek_v3": "DeepseekV3Config", "gpt_oss": "GptOssConfig",
    "llama4": "Llama4TextConfig",
}
#: Options that make a moelab layer dropless and noise-free, as every HF block is.
DROPLESS = dict(drop_tokens=False, use_rts=False, noisy_gate_policy=None,
                second_expert_sampling=False)


def _transformers():
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError(HF_HINT) from error
    return transformers


def hf_block_class(kind: str) -> type[nn.Module]:
    """The transformers class of a block kind (``hf_block_class("qwen3_moe")``)."""
    _check_kind(kind)
    _transformers()
    module = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    return getattr(module, HF_BLOCKS[kind])


def block_kind(block: nn.Module) -> str:
    """The kind of an HF MoE block ("mixtral", "deepseek_v3", ...), or a ValueError."""
    name = type(block).__name__
    for kind, class_name in HF_BLOCKS.items():
        if name == class_name:
            return kind
    raise ValueError(f"from_hf takes one of {', '.join(HF_BLOCKS.values())}; got {name}")


def _check_kind(kind: str) -> None:
    if kind not in HF_BLOCKS:
        raise ValueError(f"kind must be one of {tuple(HF_BLOCKS)}; got {kind!r}")


def _copy_into(module: nn.Module, values: dict[str, Tensor]) -> None:
    """Write ``values`` into ``module``'s parameters and buffers by name. Every parameter must
    get one (transformers 5 builds expert banks with torch.empty, and a converter that misses
    one silently keeps garbage: sglang#29659, vllm#31849)."""
    missed = [name for name, p in module.named_parameters() if name not in values and p.numel()]
    if missed:  # pragma: no cover - a mapping below is incomplete
        raise RuntimeError(f"interop has no value for {missed} of {type(module).__name__}")
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    for name, value in values.items():
        tensors[name].copy_(value)


# ----------------------------------------------------------------------- HF -> moelab

@dataclass
class _Block:
    """What an HF block computes, in moelab's terms: the MoE options beyond `DROPLESS` and the
    weights by moelab parameter name, in moelab's layouts."""

    options: dict
    weights: dict[str, Tensor] = field(default_factory=dict)


def _is_silu(module) -> bool:
    return isinstance(module, nn.SiLU) or "silu" in type(module).__name__.lower()


def _require_silu(act_fn, where: str) -> None:
    if not _is_silu(act_fn):
        raise ValueError(f"moelab's gated activation is SwiGLU (silu(gate) · up); this block's "
                         f"{where} use {type(act_fn).__name__} (hidden_act): moelab has no "
                         "gated form of it")


def _check_shapes(gate: Tensor, gate_up: Tensor, down: Tensor, transposed: bool) -> None:
    """gate [E, d] and the expert bank, [E, 2f, d] and [E, d, f] (``transposed``: [E, d, 2f]
    and [E, f, d]), or a ValueError naming them."""
    if transposed:
        d_in, width, f_out, d_out, expected = 1, 2, 1, 2, ("[E, d, 2f]", "[E, f, d]")
    else:
        d_in, width, f_out, d_out, expected = 2, 1, 2, 1, ("[E, 2f, d]", "[E, d, f]")
    ok = (gate.dim() == 2 and gate_up.dim() == 3 and down.dim() == 3
          and gate.shape[0] == gate_up.shape[0] == down.shape[0]
          and gate.shape[1] == gate_up.shape[d_in] == down.shape[d_out]
          and gate_up.shape[width] == 2 * down.shape[f_out])
    if not ok:
        raise ValueError(f"the block's weights do not fit together: router weight "
                         f"{tuple(gate.shape)} (expected [E, d]), experts.gate_up_proj "
                         f"{tuple(gate_up.shape)} ({expected[0]}), experts.down_proj "
                         f"{tuple(down.shape)} ({expected[1]})")


def _deinterleave(t: Tensor) -> Tensor:
    """[..., 2f] with gate and up alternating (gpt-oss: gate = 0::2, up = 1::2) -> [gate | up]."""
    return torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)


def _interleave(t: Tensor) -> Tensor:
    """[..., 2f] as [gate | up] -> gate and up alternating (`_deinterleave`'s inverse)."""
    gate, up = t.chunk(2, dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


def _expert_bank(experts: nn.Module, gate: Tensor, *, transposed: bool = False,
                 interleaved: bool = False, biased: bool = False) -> dict[str, Tensor]:
    """The experts' weights in moelab's layout: w_in [E, d, 2f] = [gate | up], w_out [E, f, d]
    (and b_in [E, 2f], b_out [E, d] when ``biased``), from the layout this block's class has."""
    if not hasattr(experts, "gate_up_proj"):
        raise ValueError(f"{type(experts).__name__} holds no packed gate_up_proj: from_hf reads "
                         "transformers 5's packed expert layout (upgrade transformers to >= 5)")
    # the layout transformers declares (use_experts_implementation) must be the one read here
    declared = (getattr(experts, "is_transposed", transposed),
                not getattr(experts, "is_concatenated", not interleaved),
                getattr(experts, "has_bias", biased))
    if declared != (transposed, interleaved, biased):
        raise ValueError(f"{type(experts).__name__} declares is_transposed, interleaved, "
                         f"has_bias = {declared}; from_hf reads this block as "
                         f"{(transposed, interleaved, biased)} (transformers changed its layout)")
    gate_up, down = experts.gate_up_proj, experts.down_proj
    _check_shapes(gate, gate_up, down, transposed)
    w_in = gate_up if transposed else gate_up.transpose(1, 2)  # [E, d, 2f]
    w_out = down if transposed else down.transpose(1, 2)  # [E, f, d]
    bank = {"experts.w_in": _deinterleave(w_in) if interleaved else w_in,
            "experts.w_out": w_out}
    if biased:
        b_in = experts.gate_up_proj_bias  # [E, 2f]
        bank["experts.b_in"] = _deinterleave(b_in) if interleaved else b_in
        bank["experts.b_out"] = experts.down_proj_bias  # [E, d]
    return bank


def _shared_mlp(mlp: nn.Module, act_fn) -> dict[str, Tensor]:
    """A shared expert (gate_proj, up_proj [g, d], down_proj [d, g]) as moelab's residual MLP."""
    _require_silu(act_fn, "shared experts")
    return {"mlp.fc_in.weight": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),  # [2g, d]
            "mlp.fc_out.weight": mlp.down_proj.weight}  # [d, g]


def _read_mixtral(block) -> _Block:
    jitter = getattr(block, "jitter_noise", 0.0)
    if jitter:
        raise ValueError(
            f"this Mixtral block has router_jitter_noise={jitter}: in training it multiplies the "
            "hidden states that reach the router *and the experts* by U(1 - ε, 1 + ε), which "
            "moelab's Jitter (router input only) does not represent. Build the block with "
            "router_jitter_noise=0 (what the released models use), or call from_hf on it in "
            "eval only after setting block.jitter_noise = 0")
    _require_silu(block.experts.act_fn, "experts")
    weights = {"router.weight": block.gate.weight, **_expert_bank(block.experts, block.gate.weight)}
    return _Block(dict(k=block.gate.top_k, renormalize=True), weights)


def _read_softmax_top_k(block) -> _Block:
    """Qwen2-MoE's, Qwen3-MoE's and OLMoE's routed experts: softmax, top-k, renormalised iff
    norm_topk_prob."""
    gate = block.gate
    _require_silu(block.experts.act_fn, "experts")
    weights = {"router.weight": gate.weight, **_expert_bank(block.experts, gate.weight)}
    return _Block(dict(k=gate.top_k, renormalize=bool(gate.norm_topk_prob)), weights)


def _read_qwen2_moe(block) -> _Block:
    read = _read_softmax_top_k(block)
    read.options.update(residual=True, residual_gate="sigmoid")
    read.weights.update(_shared_mlp(block.shared_expert, block.shared_expert.act_fn))
    read.weights["coefficient.weight"] = block.shared_expert_gate.weight  # [1, d]
    return read


def _read_deepseek_v3(block) -> _Block:
    gate = block.gate
    _require_silu(block.experts.act_fn, "experts")
    weights = {"router.weight": gate.weight,
               "router.selection_bias": gate.e_score_correction_bias,  # [E], fixed
               **_expert_bank(block.experts, gate.weight)}
    options = dict(k=gate.top_k, score="sigmoid", renormalize=bool(gate.norm_topk_prob),
                   routed_scaling_factor=float(gate.routed_scaling_factor),
                   n_group=gate.num_group, topk_group=gate.topk_group, use_selection_bias=True)
    if block.shared_experts.down_proj.weight.numel():  # n_shared_experts = 0: none
        options.update(residual=True, residual_gate="none")
        weights.update(_shared_mlp(block.shared_experts, block.shared_experts.act_fn))
    return _Block(options, weights)


def _read_gpt_oss(block) -> _Block:
    router, experts = block.router, block.experts
    weights = {"router.weight": router.weight, "router.bias": router.bias,
               **_expert_bank(experts, router.weight, transposed=True, interleaved=True,
                              biased=True)}
    # softmax over the top-k logits = the softmax over all, renormalised over the k
    options = dict(k=router.top_k, renormalize=True, router_bias=True, bias=True,
                   activation="clamped_swiglu", swiglu_alpha=float(experts.alpha),
                   swiglu_limit=float(experts.limit))
    return _Block(options, weights)


def _read_llama4(block) -> _Block:
    router, experts = block.router, block.experts
    _require_silu(experts.act_fn, "experts")
    weights = {"router.weight": router.weight,
               **_expert_bank(experts, router.weight, transposed=True),
               **_shared_mlp(block.shared_expert, block.shared_expert.activation_fn)}
    # sigmoid(top-k logits) scales each chosen expert's input: y = Σ_j E_j(s_j · x) + MLP(x)
    options = dict(k=router.top_k, score="sigmoid", renormalize=False, scale_expert_input=True,
                   residual=True, residual_gate="none")
    return _Block(options, weights)


_READERS = {"mixtral": _read_mixtral, "qwen2_moe": _read_qwen2_moe,
            "qwen3_moe": _read_softmax_top_k, "olmoe": _read_softmax_top_k,
            "deepseek_v3": _read_deepseek_v3, "gpt_oss": _read_gpt_oss, "llama4": _read_llama4}


@torch.no_grad()
def from_hf(block: nn.Module, backend: str = "index") -> MoE:
    """A moelab MoE computing what ``block`` computes (one of `HF_BLOCKS`), on the same device
    and in the same dtype (its router in the HF router's dtype: DeepSeek-V3's is float32)."""
    read = _READERS[block_kind(block)](block)
    w_in, router_weight = read.weights["experts.w_in"], read.weights["router.weight"]
    num_experts, d_model, width = w_in.shape  # [E, d, 2f]
    options = dict(DROPLESS, activation="swiglu", bias=False, backend=backend)
    options.update(read.options)
    if "mlp.fc_out.weight" in read.weights:
        options.update(residual_d_ff=read.weights["mlp.fc_out.weight"].shape[1])  # g
    moe = MoE(d_model, width // 2, num_experts, **options)
    moe = moe.to(device=w_in.device, dtype=w_in.dtype)
    moe.router.to(dtype=router_weight.dtype)
    _copy_into(moe, read.weights)
    return moe


# ----------------------------------------------------------------------- moelab -> HF

@dataclass(frozen=True)
class _Target:
    """What an HF block can hold (`_problems` names every option of a layer outside it)."""

    activation: str = "swiglu"
    score: str = "softmax"
    renormalize: bool | None = None  # None: either (the block's norm_topk_prob)
    residual_gates: tuple = (None,)  # the residual branches it has; None: no residual
    biases: bool = False  # expert and router biases (zeros where the layer has none)
    deepseek_routing: bool = False  # routed scaling, groups, a fixed selection bias
    scale_expert_input: bool = False


TARGETS = {
    "mixtral": _Target(renormalize=True),
    "qwen2_moe": _Target(residual_gates=("sigmoid",)),
    "qwen3_moe": _Target(),
    "olmoe": _Target(),
    "deepseek_v3": _Target(score="sigmoid", residual_gates=(None, "none"),
                           deepseek_routing=True),
    "gpt_oss": _Target(activation="clamped_swiglu", renormalize=True, biases=True),
    "llama4": _Target(score="sigmoid", renormalize=False, residual_gates=("none",),
                      scale_expert_input=True),
}
_RESIDUAL_NAMES = {None: "no residual branch", "sigmoid": "residual_gate='sigmoid'",
                   "none": "residual_gate='none'", "softmax": "residual_gate='softmax'"}


def _renormalizes(moe: MoE) -> bool:
    renormalize = moe.router.config.renormalize
    return moe.router.k > 1 if renormalize is None else renormalize


def _residual_gate(moe: MoE) -> str | None:
    return moe.config.residual_gate if moe.residual else None


def _default_kind(moe: MoE) -> str:
    """The block a layer's options describe (`to_hf` without a kind)."""
    config = moe.config
    if moe.experts.activation == "clamped_swiglu":
        return "gpt_oss"
    if config.scale_expert_input:
        return "llama4"
    if _residual_gate(moe) == "sigmoid":
        return "qwen2_moe"
    if config.router.score == "sigmoid" or _residual_gate(moe) == "none":
        return "deepseek_v3"
    return "mixtral" if _renormalizes(moe) else "qwen3_moe"


def _common_problems(moe: MoE) -> list[str]:
    router = moe.router.config
    problems = []
    if router.drop_tokens:
        problems.append("drop_tokens=True (HF blocks are dropless; build with "
                        "drop_tokens=False)")
    if router.choice != "token":
        problems.append("expert-choice routing")
    if moe.parallel is not None:
        problems.append("expert parallelism (a parallelized layer holds a slice of the experts)")
    if router.bias_update_rate > 0:
        problems.append("an aux-free selection bias that updates itself (bias_update_rate > 0; "
                        "to export its current value to DeepSeek-V3, set moe.router.config = "
                        "moe.router.config.replace(bias_update_rate=0.0, "
                        "use_selection_bias=True))")
    return problems


def _problems(moe: MoE, kind: str) -> list[str]:
    """Every option of ``moe`` that the ``kind`` block cannot hold."""
    target, router, block = TARGETS[kind], moe.router.config, HF_BLOCKS[kind]
    problems = _common_problems(moe)
    if moe.experts.activation != target.activation:
        wanted = "SwiGLU" if target.activation == "swiglu" else "gpt-oss's clamped SwiGLU"
        problems.append(f"activation={moe.experts.activation!r} ({block} uses {wanted})")
    if not target.biases and moe.experts.b_in is not None:
        problems.append(f"expert biases ({block}'s experts have none: build with bias=False)")
    if not target.biases and router.router_bias:
        problems.append(f"a router bias (router_bias=True; {block}'s router has none)")
    if router.score != target.score:
        problems.append(f"score={router.score!r} ({block}'s router scores are "
                        f"{target.score}s)")
    if target.renormalize is not None and _renormalizes(moe) != target.renormalize:
        problems.append(f"{block} {'always' if target.renormalize else 'never'} renormalises "
                        f"the top-k weights: build with renormalize={target.renormalize}")
    if not target.deepseek_routing:
        problems += _deepseek_routing_problems(moe, block)
    gate = _residual_gate(moe)
    if gate not in target.residual_gates:
        held = " or ".join(_RESIDUAL_NAMES[held] for held in target.residual_gates)
        deepspeed = "; DeepSpeed's Residual-MoE has no HF block" if gate == "softmax" else ""
        problems.append(f"{_RESIDUAL_NAMES[gate]} ({block} has {held}{deepspeed})")
    if moe.config.scale_expert_input != target.scale_expert_input:
        problems.append(f"scale_expert_input={moe.config.scale_expert_input} ({block} scales "
                        f"the experts' {'input' if target.scale_expert_input else 'output'})")
    return problems + _size_problems(moe, kind)


def _deepseek_routing_problems(moe: MoE, block: str) -> list[str]:
    router = moe.router.config
    problems = []
    if router.routed_scaling_factor != 1.0:
        problems.append(f"routed_scaling_factor={router.routed_scaling_factor} ({block} has "
                        "none: DeepSeek-V3 does)")
    if router.n_group > 1:
        problems.append(f"group-limited routing (n_group={router.n_group}; {block} has none: "
                        "DeepSeek-V3 does)")
    if router.use_selection_bias:
        problems.append(f"a selection bias (use_selection_bias=True; {block} has none: "
                        "DeepSeek-V3 does)")
    return problems


def _size_problems(moe: MoE, kind: str) -> list[str]:
    """Widths the block ties together: DeepSeek's shared experts are n · f wide and its group
    score sums each group's top 2; Llama 4's shared expert is as wide as an expert."""
    d_ff, problems = moe.experts.d_ff, []
    shared = moe.mlp.fc_out.in_features if moe.residual else 0
    if kind == "deepseek_v3" and shared % d_ff:
        problems.append(f"a residual MLP {shared} wide (DeepSeek-V3's shared experts are "
                        f"n_shared_experts × the experts' width {d_ff})")
    if kind == "deepseek_v3" and moe.num_experts // moe.router.config.n_group < 2:
        problems.append(f"groups of {moe.num_experts // moe.router.config.n_group} expert "
                        "(DeepSeek-V3's group score sums each group's top 2)")
    if kind == "llama4" and moe.residual and shared != d_ff:
        problems.append(f"a residual MLP {shared} wide (Llama 4's shared expert is as wide as "
                        f"an expert, {d_ff})")
    return problems


def _standard_bank(moe: MoE) -> dict[str, Tensor]:
    """moelab's bank as gate_up_proj [E, 2f, d] = [gate; up] and down_proj [E, d, f]."""
    return {"experts.gate_up_proj": moe.experts.w_in.transpose(1, 2),
            "experts.down_proj": moe.experts.w_out.transpose(1, 2)}


def _shared_weights(moe: MoE, prefix: str) -> dict[str, Tensor]:
    gate_proj, up_proj = moe.mlp.fc_in.weight.chunk(2, dim=0)  # [g, d] each
    return {f"{prefix}.gate_proj.weight": gate_proj, f"{prefix}.up_proj.weight": up_proj,
            f"{prefix}.down_proj.weight": moe.mlp.fc_out.weight}


def _sizes(moe: MoE) -> dict:
    return dict(hidden_size=moe.experts.d_model, num_experts_per_tok=moe.router.k)


def _export_mixtral(moe, configs):
    config = configs.MixtralConfig(intermediate_size=moe.experts.d_ff, hidden_act="silu",
                                   num_local_experts=moe.num_experts, router_jitter_noise=0.0,
                                   **_sizes(moe))
    return config, {"gate.weight": moe.router.weight, **_standard_bank(moe)}


def _export_qwen3_moe(moe, configs, name="Qwen3MoeConfig", width="moe_intermediate_size",
                      **extra):
    config = getattr(configs, name)(num_experts=moe.num_experts, hidden_act="silu",
                                    norm_topk_prob=_renormalizes(moe),
                                    **{width: moe.experts.d_ff}, **_sizes(moe), **extra)
    return config, {"gate.weight": moe.router.weight, **_standard_bank(moe)}


def _export_olmoe(moe, configs):
    return _export_qwen3_moe(moe, configs, "OlmoeConfig", "intermediate_size")


def _export_qwen2_moe(moe, configs):
    config, weights = _export_qwen3_moe(
        moe, configs, "Qwen2MoeConfig",
        shared_expert_intermediate_size=moe.mlp.fc_out.in_features)
    weights.update(_shared_weights(moe, "shared_expert"))
    weights["shared_expert_gate.weight"] = moe.coefficient.weight
    return config, weights


def _export_deepseek_v3(moe, configs):
    router = moe.router.config
    shared = moe.mlp.fc_out.in_features if moe.residual else 0
    config = configs.DeepseekV3Config(
        moe_intermediate_size=moe.experts.d_ff, n_routed_experts=moe.num_experts,
        n_shared_experts=shared // moe.experts.d_ff, n_group=router.n_group,
        topk_group=router.topk_group, norm_topk_prob=_renormalizes(moe),
        routed_scaling_factor=router.routed_scaling_factor, hidden_act="silu", **_sizes(moe))
    bias = moe.router.selection_bias if router.use_selection_bias else torch.zeros_like(
        moe.router.selection_bias)
    weights = {"gate.weight": moe.router.weight, "gate.e_score_correction_bias": bias,
               **_standard_bank(moe)}
    if moe.residual:
        weights.update(_shared_weights(moe, "shared_experts"))
    return config, weights


def _export_gpt_oss(moe, configs):
    experts, router = moe.experts, moe.router
    config = configs.GptOssConfig(intermediate_size=experts.d_ff,
                                  num_local_experts=moe.num_experts,
                                  swiglu_alpha=experts.swiglu_alpha,
                                  swiglu_limit=experts.swiglu_limit, **_sizes(moe))
    # a layer without biases is the block with zero biases
    b_in = experts.b_in if experts.b_in is not None else experts.w_in.new_zeros(
        moe.num_experts, 2 * experts.d_ff)
    b_out = experts.b_out if experts.b_out is not None else experts.w_in.new_zeros(
        moe.num_experts, experts.d_model)
    router_bias = router.bias if router.bias is not None else router.weight.new_zeros(
        moe.num_experts)
    return config, {"router.weight": router.weight, "router.bias": router_bias,
                    "experts.gate_up_proj": _interleave(experts.w_in),  # [E, d, 2f]
                    "experts.gate_up_proj_bias": _interleave(b_in),  # [E, 2f]
                    "experts.down_proj": experts.w_out, "experts.down_proj_bias": b_out}


def _export_llama4(moe, configs):
    config = configs.Llama4TextConfig(intermediate_size=moe.experts.d_ff, hidden_act="silu",
                                      num_local_experts=moe.num_experts, **_sizes(moe))
    return config, {"router.weight": moe.router.weight,
                    "experts.gate_up_proj": moe.experts.w_in,  # [E, d, 2f]: [gate | up]
                    "experts.down_proj": moe.experts.w_out,  # [E, f, d]
                    **_shared_weights(moe, "shared_expert")}


_EXPORTERS = {"mixtral": _export_mixtral, "qwen2_moe": _export_qwen2_moe,
              "qwen3_moe": _export_qwen3_moe, "olmoe": _export_olmoe,
              "deepseek_v3": _export_deepseek_v3, "gpt_oss": _export_gpt_oss,
              "llama4": _export_llama4}
_ROUTERS = {"gpt_oss": "router", "llama4": "router"}  # the others call theirs "gate"


@torch.no_grad()
def to_hf(moe: MoE, kind: str | None = None) -> nn.Module:
    """The HF block (one of `HF_BLOCKS`, by kind) that computes what ``moe`` computes in eval.

    kind None: the block the layer's options describe: gpt-oss for clamped SwiGLU, Llama 4 for
    scale_expert_input, Qwen2-MoE for a sigmoid-gated residual, DeepSeek-V3 for sigmoid scores
    or ungated shared experts, else Mixtral when the top-k weights are renormalised and
    Qwen3-MoE when they are not. A ValueError names every option the block cannot hold."""
    kind = _default_kind(moe) if kind is None else kind
    _check_kind(kind)
    problems = _problems(moe, kind)
    if problems:
        raise ValueError(f"this MoE has no {HF_BLOCKS[kind]} equivalent: " + "; ".join(problems))
    config, weights = _EXPORTERS[kind](moe, _transformers())
    config._experts_implementation = "eager"  # a standalone block: the plain loop
    with warnings.catch_warnings():  # DeepSeek-V3 without shared experts: zero-width Linears
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
        block = hf_block_class(kind)(config)
    block = block.to(device=moe.experts.w_in.device, dtype=moe.experts.w_in.dtype)
    getattr(block, _ROUTERS.get(kind, "gate")).to(dtype=moe.router.weight.dtype)
    _copy_into(block, weights)
    return block
