"""A small GPT whose FFNs are dense, MoE, Residual-MoE or Pyramid-Residual MoE, from one config.

The paper's models (§3-§4) are GPT-3-style decoders (Megatron-DeepSpeed) with an MoE layer on
every other FFN (``moe_every=2``: layers 2, 4, ..., 24 of 24). PR-MoE (§4.1) = Pyramid (more
experts in the last MoE layers, "32/64") + Residual (a dense MLP beside one top-1 expert).

``GPT(config)(idx, targets) -> GPTOutput`` with the LM loss, the MoE losses (already weighted by
the config's coefficients inside ``loss``) and every layer's Routing (None for dense layers).
"""

from __future__ import annotations

import functools
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .config import Config, check_int, documented, option
from .experts import expert_banks
from .layer import MLP, MoE, MoEConfig
from .routing import DeferredField, Routing


@documented
@dataclass(frozen=True)
class GPTConfig(Config):
    """One typed config for dense, MoE, PR-MoE and MoS models.

    ``experts`` is the expert schedule over the MoE layers: 0 (a dense model), an int (that many
    experts in every MoE layer), "a/b" (the paper's Pyramid: the last two MoE layers get b, the
    rest a) or a tuple with one count per MoE layer. ``moe`` holds every MoE-layer option (its
    router's included); `GPTConfig.create` and `replace` take them by name as well:
    ``GPTConfig.create(experts=8, k=2, residual=True)``.

    Loss coefficients: ``aux_loss_coef=0.01`` is what the paper's training scripts use
    (Megatron-DeepSpeed's own default, 0.1, is 10x that); ``z_loss_coef=0.0`` because the paper has
    no z-loss (ST-MoE recommends 1e-3 when it is wanted).
    """

    vocab_size: int = option(256, "tokens in the vocabulary", low=1)
    block_size: int = option(128, "the longest sequence (learned positions)", low=1)
    n_layer: int = option(4, "transformer blocks", low=1)
    n_head: int = option(4, "attention heads (must divide d_model)", low=1)
    d_model: int = option(128, "model width", low=1)
    d_ff: int | None = option(None, "FFN hidden width; None = 4 · d_model", kind="int", low=1)
    experts: int | str | tuple[int, ...] = option(
        0, "experts per MoE layer: 0 (dense), an int, 'a/b' (Pyramid) or one count per MoE "
           "layer", kind="any")
    moe_every: int = option(2, "layer i (1-based) is MoE iff i % moe_every == 0", low=1)
    first_dense: int = option(0, "the first layers that stay dense whatever moe_every says "
                                 "(DeepSeek-V3: 3, first_k_dense_replace)", low=0)
    tie_embeddings: bool = option(True, "the LM head is the token embedding (GPT-2, Megatron); "
                                        "False: its own matrix (DeepSeek-V3, Qwen3)")
    moe: MoEConfig = option(MoEConfig(), "every MoE layer's options (see MoEConfig)",
                            kind="config")
    aux_loss_coef: float = option(0.01, "weight of Σ l_aux in the loss", low=0)
    z_loss_coef: float = option(0.0, "weight of Σ z-loss in the loss", low=0)
    dropout: float = option(0.0, "dropout probability", low=0, below=1)
    name: str = option("custom", "a label (not compared)", kind="any", compare=False)

    def validate(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        _ = self.expert_schedule  # validates the schedule

    @property
    def ffn_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """0-based indices of the MoE layers: layer i (1-based) is MoE iff i % moe_every == 0
        (Megatron-DeepSpeed's rule) and i > first_dense, and none for a dense model."""
        if self.experts in (0, "0", ()):
            return ()
        return tuple(i for i in range(self.first_dense, self.n_layer)
                     if (i + 1) % self.moe_every == 0)

    @property
    def expert_schedule(self) -> tuple[int, ...]:
        """Experts in each MoE layer, in layer order."""
        n_moe = len(self.moe_layers)
        spec = self.experts
        if spec in (0, "0", ()):
            return ()
        if n_moe == 0:
            raise ValueError(f"experts={spec!r} but no layer is MoE: n_layer={self.n_layer} "
                             f"has no multiple of moe_every={self.moe_every}")
        if isinstance(spec, int) and not isinstance(spec, bool):
            schedule = (spec,) * n_moe
        elif isinstance(spec, str):
            try:
                counts = [int(part) for part in spec.split("/")]
            except ValueError:
                raise ValueError(f"experts string must look like '32' or '32/64'; "
                                 f"got {spec!r}") from None
            if len(counts) == 1:
                schedule = (counts[0],) * n_moe
            elif len(counts) == 2:
                # Pyramid (§4.1, Fig. 3): the last two MoE layers get the larger count.
                n_big = min(2, n_moe)
                schedule = (counts[0],) * (n_moe - n_big) + (counts[1],) * n_big
            else:
                raise ValueError(f"experts string takes one or two counts ('32' or '32/64'); "
                                 f"got {spec!r}")
        else:
            schedule = tuple(spec)
            if len(schedule) != n_moe:
                raise ValueError(
                    f"experts schedule has {len(schedule)} entries but the model has {n_moe} "
                    f"MoE layers (n_layer={self.n_layer}, moe_every={self.moe_every}); give one "
                    f"count per MoE layer, an int, or 'a/b'")
        k = self.moe.router.k
        for count in schedule:
            check_int("every expert count", count)
            if count < k:
                raise ValueError(f"k={k} is larger than a layer's expert count {count}")
        return schedule


def _paper(name: str, n_layer: int, d_model: int, n_head: int, **moe) -> GPTConfig:
    """A paper-scale config: GPT-2 vocabulary, 2K context (Megatron-DeepSpeed scripts)."""
    return GPTConfig.create(name=name, vocab_size=50257, block_size=2048, n_layer=n_layer,
                            d_model=d_model, n_head=n_head, **moe)


PRESETS: dict[str, GPTConfig] = {
    cfg.name: cfg for cfg in [
        GPTConfig(name="tiny", block_size=64, n_layer=4, n_head=4, d_model=64, experts=4),
        GPTConfig(name="small", block_size=128, n_layer=6, n_head=6, d_model=192, experts=8),
        # §3: the 5x study; MoE-128 on every other layer, top-1
        _paper("paper_350m", 24, 1024, 16),
        _paper("paper_350m_moe128", 24, 1024, 16, experts=128),
        _paper("paper_1_3b", 24, 2048, 16),
        _paper("paper_1_3b_moe128", 24, 2048, 16, experts=128),
        _paper("paper_6_7b", 32, 4096, 32),
        # §4.1: PR-MoE (residual + pyramid)
        _paper("paper_350m_pr_moe_32_64", 24, 1024, 16, experts="32/64", residual=True),
        _paper("paper_1_3b_pr_moe_64_128", 24, 2048, 16, experts="64/128", residual=True),
        # §4.2: Mixture-of-Students, 21 layers (10 MoE layers)
        _paper("paper_350m_mos_l21", 21, 1024, 16, experts=(32,) * 8 + (64,) * 2,
               residual=True),
        _paper("paper_1_3b_mos_l21", 21, 2048, 16, experts=(64,) * 8 + (128,) * 2,
               residual=True),
        # §5.5 Table 6: the serving models. 8B+MoE-128 uses 40 layers (the blog's figure; 30
        # layers would not give 349B) and 24B+MoE-128 30 layers (the tutorial's 1046.9B).
        _paper("serve_2_4b_moe128", 16, 3584, 28, experts=128),
        _paper("serve_8b_moe128", 40, 4096, 32, experts=128),
        _paper("serve_24b_moe128", 30, 8192, 64, experts=128),
        _paper("serve_47b_moe128", 58, 8192, 64, experts=128),
        # MoE after DeepSpeed (moelab.modern): the published configs, in moelab's GPT. moelab's
        # attention is plain multi-head with learned positions, so the presets keep a 4K context
        # (these models use RoPE: no position table) and count 4·d² per attention layer where
        # DeepSeek-V3 has MLA (~9% fewer) and Qwen3 grouped-query attention (~12% more): under
        # 2% of either total (moelab.modern.PUBLISHED_SIZES compares).
        GPTConfig.create(
            name="deepseek_v3", vocab_size=129280, block_size=4096, n_layer=61, d_model=7168,
            n_head=128, d_ff=18432, experts=256, moe_every=1, first_dense=3,
            tie_embeddings=False, activation="swiglu", bias=False, expert_d_ff=2048,
            residual=True, residual_gate="none", residual_d_ff=2048, k=8, score="sigmoid",
            renormalize=True, routed_scaling_factor=2.5, n_group=8, topk_group=4,
            drop_tokens=False, bias_update_rate=0.001),
        GPTConfig.create(
            name="qwen3_30b_a3b", vocab_size=151936, block_size=4096, n_layer=48, d_model=2048,
            n_head=32, d_ff=6144, experts=128, moe_every=1, tie_embeddings=False,
            activation="swiglu", bias=False, expert_d_ff=768, k=8, renormalize=True,
            drop_tokens=False, balance_loss="global"),
    ]
}


def preset(name: str, **overrides) -> GPTConfig:
    """A named config, optionally with options replaced (any GPTConfig, MoEConfig or
    RouterConfig option by name): ``preset("tiny", experts="4/8", k=2)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


class KVCache:
    """Keys and values of every layer for a batch, allocated once for ``max_length`` positions.

    ``k`` and ``v`` are [n_layer, B, n_head, max_length, head_dim]; cache slots [0, length) hold
    the tokens seen so far. `GPT.forward(idx, cache=cache)` writes the new tokens' keys and values
    at slots [length, length + T), attends over [0, length + T) and advances ``length``; nothing
    is reallocated during a generation.

    ``left_pad`` ([B] ints, optional): sequence b starts with ``left_pad[b]`` pad tokens (prompts
    of different lengths, padded on the left). Its real tokens then sit at positions 0, 1, ...
    from slot ``left_pad[b]`` on, and no query ever attends to its pad slots.

    A static decode step (CUDA graphs) passes ``cache_position`` to `GPT.forward` instead: the
    slots to write come from that tensor, attention runs over all ``max_length`` slots with a
    mask, and ``length`` (a Python int) is neither read nor advanced.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_length: int, *,
                 device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32,
                 left_pad: Tensor | list[int] | None = None) -> None:
        if not 1 <= max_length <= config.block_size:
            raise ValueError(f"max_length must be in [1, block_size={config.block_size}]; "
                             f"got {max_length}")
        head_dim = config.d_model // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_length, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.left_pad = None
        if left_pad is not None:
            pads = [int(p) for p in left_pad]
            if len(pads) != batch_size or not all(0 <= p < max_length for p in pads):
                raise ValueError(f"left_pad must give one pad count in [0, max_length="
                                 f"{max_length}) per sequence ({batch_size}); got {pads}")
            self.left_pad = torch.tensor(pads, dtype=torch.long, device=self.k.device)  # [B]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    def layer(self, index: int, position: Tensor | None = None) -> LayerKV:
        return LayerKV(self.k[index], self.v[index], self.length, self.left_pad, position)


@dataclass
class LayerKV:
    """One layer's view of a KVCache: buffers [B, H, max_length, e] and where new tokens go.

    ``position`` None: the new T tokens go to slots start .. start + T - 1 (a Python int, eager).
    ``position`` a [T] long tensor: they go to those slots (index_copy_), and attention covers
    every slot under a mask computed from the tensor: the static, graph-capturable decode step.
    """

    k: Tensor
    v: Tensor
    start: int
    left_pad: Tensor | None = None  # [B] long: pad slots at the start of each sequence
    position: Tensor | None = None  # [T] long: cache slots of the new tokens (static step)


def attention_mask(query_slots: Tensor, num_keys: int, left_pad: Tensor | None) -> Tensor:
    """[B or 1, 1, T, K] bool, True where the query at ``query_slots[t]`` may see key slot j.

    Causal (j <= the query's slot) and, with left padding, never across the pad boundary: real
    tokens see only real keys, and a pad query sees only pads (so its softmax is never empty).
    """
    keys = torch.arange(num_keys, device=query_slots.device)  # [K]
    visible = keys[None, :] <= query_slots[:, None]  # [T, K]
    if left_pad is None:
        return visible[None, None]  # [1, 1, T, K]
    pad = left_pad[:, None, None]  # [B, 1, 1]
    real_key = keys[None, None, :] >= pad  # [B, 1, K]
    real_query = query_slots[None, :, None] >= pad  # [B, T, 1]
    return (visible[None] & (real_key == real_query))[:, None]  # [B, 1, T, K]


def token_positions(slots: Tensor, left_pad: Tensor | None) -> Tensor:
    """The learned-position index of each token: its cache slot minus its sequence's left pad,
    so every sequence's first real token is at position 0 (pads get 0; nothing sees them).

    [T] slots -> [T] without padding, [B, T] with ``left_pad`` [B]."""
    if left_pad is None:
        return slots  # [T]
    return (slots[None, :] - left_pad[:, None]).clamp_min(0)  # [B, T]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout

    def forward(self, x: Tensor, cache: LayerKV | None = None,
                left_pad: Tensor | None = None) -> Tensor:
        """``left_pad`` [B]: pad slots per sequence, for a forward without a cache (a cache
        carries its own)."""
        q, k, v = rearrange(self.qkv(x), "b t (three h e) -> three b h t e", three=3,
                            h=self.n_head)
        dropout = self.dropout if self.training else 0.0
        if cache is not None and cache.position is not None:
            y = self._attend_static(q, k, v, cache)
        elif cache is not None and cache.start > 0:
            y = self._attend_cached(q, k, v, cache, dropout)
        else:
            if cache is not None:  # prefill: keep this chunk's keys and values
                cache.k[:, :, :k.shape[2]] = k
                cache.v[:, :, :v.shape[2]] = v
                left_pad = cache.left_pad
            mask = None
            if left_pad is not None:
                mask = attention_mask(torch.arange(q.shape[2], device=x.device), q.shape[2],
                                      left_pad)  # [B, 1, T, T]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               dropout_p=dropout)
        return self.proj(rearrange(y, "b h t e -> b t (h e)"))

    @staticmethod
    def _attend_cached(q: Tensor, k: Tensor, v: Tensor, cache: LayerKV,
                       dropout: float) -> Tensor:
        """Decode (or a later chunk): the new T tokens sit at slots start..start+T-1 and attend
        to every cached slot up to their own (and none of their sequence's pads)."""
        start, length = cache.start, q.shape[2]
        end = start + length
        cache.k[:, :, start:end] = k
        cache.v[:, :, start:end] = v
        keys, values = cache.k[:, :, :end], cache.v[:, :, :end]  # [B, H, end, e]
        mask = None
        if length > 1 or cache.left_pad is not None:  # query i (slot start + i) sees 0..start + i
            mask = attention_mask(torch.arange(start, end, device=q.device), end,
                                  cache.left_pad)  # [B or 1, 1, T, end]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                              dropout_p=dropout)

    @staticmethod
    def _attend_static(q: Tensor, k: Tensor, v: Tensor, cache: LayerKV) -> Tensor:
        """The graph-capturable step: write at the slots in ``cache.position`` (a tensor) and
        attend over the whole preallocated cache; no Python int depends on the step."""
        cache.k.index_copy_(2, cache.position, k)  # [B, H, L, e] <- [B, H, T, e] at slots
        cache.v.index_copy_(2, cache.position, v)
        mask = attention_mask(cache.position, cache.k.shape[2], cache.left_pad)  # [B|1,1,T,L]
        return F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=mask)  # [B,H,T,e]


class Block(nn.Module):
    """Pre-LayerNorm transformer block; the FFN is an MLP or an MoE layer."""

    def __init__(self, config: GPTConfig, num_experts: int = 0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        if num_experts:
            self.ffn = MoE(config.d_model, config.ffn_dim, num_experts, config.moe)
        else:
            moe = config.moe
            self.ffn = MLP(config.d_model, config.ffn_dim, activation=moe.activation,
                           bias=moe.bias, swiglu_alpha=moe.swiglu_alpha,
                           swiglu_limit=moe.swiglu_limit)
        self.dropout = nn.Dropout(config.dropout)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    def forward(self, x: Tensor, cache: LayerKV | None = None,
                left_pad: Tensor | None = None) -> tuple[Tensor, Routing | None]:
        x = x + self.dropout(self.attn(self.ln_1(x), cache, left_pad))
        if self.is_moe:
            y, routing = self.ffn(self.ln_2(x))
        else:
            y, routing = self.ffn(self.ln_2(x)), None
        return x + self.dropout(y), routing


@dataclass
class GPTOutput:
    logits: Tensor  # [B, T, V]
    loss: Tensor | None  # lm_loss + aux_loss_coef · Σ aux + z_loss_coef · Σ z  (None w/o targets)
    lm_loss: Tensor | None  # cross-entropy against the targets
    # Σ over MoE layers of l_aux and of the z-loss (unweighted); without targets or autograd,
    # summed on first read (generate never reads them)
    aux_loss: Tensor = DeferredField()
    z_loss: Tensor = DeferredField()
    routings: list[Routing | None]  # one per layer, None for dense layers


def _sum_losses(routings: list[Routing], name: str, zero: Tensor) -> Tensor:
    """Σ over the MoE layers' routings of one loss (``aux_loss`` or ``z_loss``)."""
    return sum((getattr(r, name) for r in routings), zero)


class GPT(nn.Module):
    """A GPT decoder: token + position embeddings, n_layer blocks, final LayerNorm, LM head (tied
    to the token embedding unless ``tie_embeddings=False``)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        experts_by_layer = dict(zip(config.moe_layers, config.expert_schedule, strict=True))
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.block_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, experts_by_layer.get(i, 0))
                                    for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # tied, as in GPT-2 / Megatron
        if not any(p.is_meta for p in self.parameters()):
            self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # GPT-2 / Megatron init: N(0, 0.02), output projections scaled by 1/sqrt(2·n_layer),
        # every bias 0 (Linear's and the experts' b_in / b_out; a default-initialised bias gives
        # each expert a fixed offset that tilts the router towards a few experts from step 0).
        std = 0.02
        for name, param in self.named_parameters():
            if "ln_" in name:
                continue
            if name.endswith("bias") or ".b_" in name:
                param.zero_()
                continue
            if name.endswith(("proj.weight", "fc_out.weight", "w_out")):
                param.normal_(0, std / math.sqrt(2 * self.config.n_layer))
            elif name.endswith(("w_in", "weight")) and param.dim() >= 2:
                param.normal_(0, std)

    @classmethod
    def from_preset(cls, name: str, device: str | torch.device | None = None, **overrides):
        """Build a preset; ``device="meta"`` builds the paper-scale ones without memory."""
        with torch.device(device) if device is not None else nullcontext():
            return cls(preset(name, **overrides))

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                cache: KVCache | None = None, *, left_pad: Tensor | None = None,
                cache_position: Tensor | None = None) -> GPTOutput:
        """Logits (and losses) for ``idx`` [B, T].

        cache: a KVCache (see `moelab.inference.generate`); idx then holds only the new tokens,
            at cache slots cache.length, cache.length + 1, ..., and the cache advances.
        left_pad: [B] long, without a cache: sequence b starts with left_pad[b] pad tokens, which
            are masked out of attention; its real tokens take positions 0, 1, ... (a cache
            carries its own ``left_pad``).
        cache_position: [T] long, with a cache: the static decode step of a CUDA graph. The new
            tokens go to these cache slots, attention covers the whole cache under a mask built
            from this tensor, and ``cache.length`` is neither read nor advanced: every step
            runs the same kernels on the same buffers, with no Python int that depends on it.
        """
        batch, length = idx.shape
        slots = self._slots(idx, cache, cache_position)  # [T]
        if cache is not None:
            if left_pad is not None:
                raise ValueError("left_pad is for a forward without a cache; a KVCache carries "
                                 "its own: KVCache(..., left_pad=...)")
            left_pad = cache.left_pad
        elif left_pad is not None and tuple(left_pad.shape) != (batch,):
            raise ValueError(f"left_pad must have shape [B]=({batch},); "
                             f"got {tuple(left_pad.shape)}")
        positions = token_positions(slots, left_pad)  # [T] or [B, T]
        x = self.drop(self.wte(idx) + self.wpe(positions))  # [B, T, d]
        routings = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache.layer(i, cache_position)
            x, routing = block(x, layer_cache, None if cache is not None else left_pad)
            routings.append(routing)
        if cache is not None and cache_position is None:
            cache.length += length
        logits = self.lm_head(self.ln_f(x))  # [B, T, V]
        moe = [r for r in routings if r is not None]
        zero = logits.new_zeros(())
        if targets is None and not (torch.is_grad_enabled() or torch.compiler.is_compiling()):
            # nothing has read them yet (generate never does)
            aux_loss = functools.partial(_sum_losses, moe, "aux_loss", zero)
            z_loss = functools.partial(_sum_losses, moe, "z_loss", zero)
        else:
            aux_loss, z_loss = _sum_losses(moe, "aux_loss", zero), _sum_losses(moe, "z_loss", zero)
        lm_loss = loss = None
        if targets is not None:
            lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            # Megatron-DeepSpeed: loss = lm + moe_loss_coeff · Σ_layers l_aux (+ z-loss here)
            loss = lm_loss + self.config.aux_loss_coef * aux_loss \
                + self.config.z_loss_coef * z_loss
        return GPTOutput(logits=logits, loss=loss, lm_loss=lm_loss, aux_loss=aux_loss,
                         z_loss=z_loss, routings=routings)

    def _slots(self, idx: Tensor, cache: KVCache | None,
               cache_position: Tensor | None) -> Tensor:
        """[T] long: the cache slots (positions, without padding) of idx's tokens; checks that
        they fit the model and the cache."""
        batch, length = idx.shape
        if cache_position is not None:
            if cache is None:
                raise ValueError("cache_position is the static decode step's write position "
                                 "in a KV cache; pass cache= too")
            if tuple(cache_position.shape) != (length,) or cache_position.dtype != torch.long:
                raise ValueError(f"cache_position must be a long tensor of shape [T]="
                                 f"({length},); got {cache_position.dtype} "
                                 f"{tuple(cache_position.shape)}")
            if batch != cache.batch_size:
                raise ValueError(f"the KV cache holds {cache.batch_size} sequences; "
                                 f"got {batch}")
            return cache_position  # [T]
        start = 0 if cache is None else cache.length
        if start + length > self.config.block_size:
            raise ValueError(f"sequence length {start + length} exceeds block_size="
                             f"{self.config.block_size}; crop the input or raise block_size")
        if cache is not None and (start + length > cache.max_length
                                  or batch != cache.batch_size):
            raise ValueError(f"the KV cache holds {cache.batch_size} sequences of up to "
                             f"{cache.max_length} positions; got {batch} sequences reaching "
                             f"position {start + length}")
        return torch.arange(start, start + length, device=idx.device)  # [T]

    def expert_parameters(self) -> list[nn.Parameter]:
        """Parameters of the Experts banks: found by module type, not by name."""
        return [p for _, bank in expert_banks(self) for p in bank.parameters()]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
