"""The peers the layer benchmarks measure moelab against, built on moelab's own weights.

Every peer layer holds views of a moelab layer's parameters (no copies: at d=1024, E=64 one
expert bank is 2 GB), so the two compute with the same numbers and the same routing:

- DeepSpeed's ``deepspeed.moe.layer.MoE`` (its per-expert ``nn.Linear`` weights are transposed
  views of moelab's [E, d, f] bank; its gate's weight is moelab's router weight), GELU experts
  with biases, the paper's layer. Needs a process group: `deepspeed_group` makes a 1-rank gloo
  one. Installed with ``DS_BUILD_OPS=0 pip install deepspeed`` (no compiling, no GPU);
- HF transformers' ``MixtralSparseMoeBlock`` (SwiGLU, no biases, dropless top-k, softmax after
  top-k), beside moelab with ``activation="swiglu", bias=False``;
- HF transformers' ``SwitchTransformersSparseMLP`` (top-1 with a fixed capacity, ReLU, no
  biases), beside moelab with ``activation="relu", bias=False``.

A peer that is not installed is None, with a note; the benchmarks then skip it.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
from torch import Tensor, nn

from moelab import MoE

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is imported

try:
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersSparseMLP,
    )
except ImportError:
    transformers = None
try:
    import deepspeed
    from deepspeed.moe.layer import MoE as DeepSpeedMoE
except ImportError:
    deepspeed = None

INIT_STD = 0.02


def versions() -> str:
    return (f"transformers {transformers.__version__ if transformers else 'not installed'}, "
            f"DeepSpeed {deepspeed.__version__ if deepspeed else 'not installed'}")


def missing() -> list[str]:
    notes = []
    if transformers is None:
        notes.append("Mixtral and Switch skipped: transformers is not installed")
    if deepspeed is None:
        notes.append("DeepSpeed skipped: not installed (DS_BUILD_OPS=0 pip install deepspeed)")
    return notes


def moelab_layer(d: int, f: int, E: int, k: int, *, activation: str = "gelu",
                 bias: bool = True, drop_tokens: bool = True, seed: int = 0,
                 train: bool = False) -> MoE:
    """A moelab layer for the benchmarks: the paper's defaults (capacity factor 1.0, min capacity
    4), no routing noise or sampling (the peers have none in eval), weights ~ N(0, 0.02)."""
    torch.manual_seed(seed)
    moe = MoE(d, f, E, k=k, activation=activation, bias=bias, drop_tokens=drop_tokens,
              use_rts=False, second_expert_sampling=False)
    with torch.no_grad():
        for param in moe.parameters():
            param.normal_(0.0, INIT_STD)
    return moe.train(train)


def _view_parameter(module: nn.Module, name: str, tensor: Tensor) -> None:
    """Make ``module.<name>`` a parameter that is ``tensor`` (a view of moelab's storage)."""
    setattr(module, name, tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor))


# ------------------------------------------------------------------------------ DeepSpeed

_GROUP_READY = False


def deepspeed_group() -> None:
    """A 1-rank gloo process group for DeepSpeed's MoE layer (made once per process)."""
    global _GROUP_READY
    if _GROUP_READY:
        return
    with socket.socket() as s:  # a free port for the 1-rank store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=300))
    _GROUP_READY = True


def deepspeed_like(moe: MoE, *, drop_tokens: bool | None = None) -> nn.Module | None:
    """DeepSpeed's MoE layer computing what ``moe`` computes (GELU experts with biases), its
    weights views of moe's; call it on [1, T, d]; it returns (output, l_aux, exp_counts).
    ``drop_tokens=False``: DeepSpeed's no-drop mode (capacity = the largest expert load)."""
    if deepspeed is None:
        return None
    deepspeed_group()
    ex, config = moe.experts, moe.config.router
    template = nn.Sequential(nn.Linear(moe.d_model, moe.d_ff), nn.GELU(),
                             nn.Linear(moe.d_ff, moe.d_model))
    layer = DeepSpeedMoE(
        hidden_size=moe.d_model, expert=template, num_experts=moe.num_experts, ep_size=1,
        k=config.k, capacity_factor=config.capacity_factor,
        eval_capacity_factor=config.capacity_factor_for(False),
        min_capacity=config.min_capacity,
        drop_tokens=config.drop_tokens if drop_tokens is None else drop_tokens,
        use_rts=False, noisy_gate_policy=None, top2_2nd_expert_sampling=False)
    layer.set_deepspeed_parallelism()
    inner = layer.deepspeed_moe
    _view_parameter(inner.gate.wg, "weight", moe.router.weight)
    for e, expert in enumerate(inner.experts.deepspeed_experts):
        _view_parameter(expert[0], "weight", ex.w_in[e].t())  # [f, d]
        _view_parameter(expert[0], "bias", ex.b_in[e])
        _view_parameter(expert[2], "weight", ex.w_out[e].t())  # [d, f]
        _view_parameter(expert[2], "bias", ex.b_out[e])
    return layer.train(moe.training)


# ---------------------------------------------------------------------------- transformers

def mixtral_like(moe: MoE) -> nn.Module | None:
    """HF Mixtral's block on ``moe``'s weights (moe: SwiGLU, no biases, dropless); [1, T, d]."""
    if transformers is None:
        return None
    config = transformers.MixtralConfig(
        hidden_size=moe.d_model, intermediate_size=moe.d_ff, num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.router.k, router_jitter_noise=0.0)
    config._experts_implementation = "eager"  # the block's own forward (as a bare block gets)
    with torch.device("meta"):  # no init: every weight is moelab's
        block = MixtralSparseMoeBlock(config)
    _view_parameter(block.gate, "weight", moe.router.weight)
    # Mixtral: gate_up_proj [E, 2f, d] = [gate; up], down_proj [E, d, f]; y = x W^T.
    _view_parameter(block.experts, "gate_up_proj", moe.experts.w_in.transpose(1, 2))
    _view_parameter(block.experts, "down_proj", moe.experts.w_out.transpose(1, 2))
    return block.train(moe.training)


def switch_like(moe: MoE, capacity: int) -> nn.Module | None:
    """HF Switch Transformers' sparse MLP on ``moe``'s weights (moe: top-1, ReLU, no biases),
    with ``capacity`` slots per expert; call it on [1, T, d]."""
    if transformers is None:
        return None
    config = transformers.SwitchTransformersConfig(
        d_model=moe.d_model, d_ff=moe.d_ff, num_experts=moe.num_experts,
        expert_capacity=capacity, router_bias=False, router_jitter_noise=0.0,
        dense_act_fn="relu", dropout_rate=0.0)
    with torch.device("meta"):
        block = SwitchTransformersSparseMLP(config)
    _view_parameter(block.router.classifier, "weight", moe.router.weight)
    for e in range(moe.num_experts):
        expert = block.experts[f"expert_{e}"]
        _view_parameter(expert.wi, "weight", moe.experts.w_in[e].t())
        _view_parameter(expert.wo, "weight", moe.experts.w_out[e].t())
    return block.train(moe.training)


def first(output):
    """A peer's output tensor (DeepSpeed returns (output, l_aux, counts))."""
    return output[0] if isinstance(output, tuple) else output
