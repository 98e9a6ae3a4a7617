"""Fused gating: softmax over experts, top-k and capacity slots -> the dense mapping table.

DeepSpeed-MoE §5.4 fuses the gate into one kernel that writes a token-to-expert mapping table
(no one-hot masks) and parallelises the per-expert cumsum with a Blelloch scan. Here the same work
runs as three small launches, the classic reduce-then-scan over token blocks:

1. ``_gate_block_kernel``, one program per block of BLOCK_S tokens: softmax over the E experts,
   top-1 (argmax of the probabilities) and for k = 2 the second choice (argmax of the logits with
   the first masked), then per choice j the block's per-expert histogram and each route's rank
   *inside the block* (an inclusive ``tl.cumsum`` over a [BLOCK_S, E] one-hot held in registers,
   never in memory). Writes probs, expert, the raw gate value, the local rank and the histogram.
2. ``_scan_kernel``, one program per chunk of experts: an exclusive prefix sum of the block
   histograms across blocks, in route order (choice 0 over all blocks, then choice 1: every first
   choice takes a slot before any second choice, as in DeepSpeed's top2gating), turning each
   histogram entry into the block's starting slot; the running total gives the counts.
3. ``_slot_kernel``, one program per token block: slot = block start + local rank; routes at or
   past the capacity are dropped (slot -1, weight 0); top-2 weights are renormalised over the kept
   routes, top-1 keeps the raw probability.

The result equals ``moelab.route(logits, k=k, training=False, drop_policy="position", ...)``:
the same experts, slots, drops and counts, and probabilities/weights equal to float32 rounding
(the exponentials of two softmax implementations differ in the last bit now and then). RTS,
noise, expert-choice and k > 2 stay with ``moelab.route``; this gate is the inference path and has
no backward (``moelab.route`` is the training gate).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.config import resolve
from moelab.losses import aux_loss, z_loss
from moelab.router import RouterConfig, check_logits
from moelab.routing import Routing, deferred, expert_capacity

from ._runtime import check_launch, next_power_of_2, tl, triton

__all__ = ["fused_route"]

#: block histograms each step of the scan kernel's loop reads (per expert); tests lower it to
#: exercise the carry across steps.
SCAN_BLOCK = 64


@triton.jit
def _gate_block_kernel(
    logits_ptr, probs_ptr, expert_ptr, gate_ptr, rank_ptr, hist_ptr,
    num_tokens, num_experts, num_blocks, stride_logits,
    K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
):
    block = tl.program_id(0)
    token = block * BLOCK_S + tl.arange(0, BLOCK_S)  # [BLOCK_S]
    expert = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    token_ok = token < num_tokens
    expert_ok = expert < num_experts
    both = token_ok[:, None] & expert_ok[None, :]
    logits = tl.load(logits_ptr + token[:, None].to(tl.int64) * stride_logits + expert[None, :],
                     mask=both, other=float("-inf")).to(tl.float32)
    # Rows past the last token are all -inf; give them finite values so nothing turns into NaN.
    logits = tl.where(token_ok[:, None], logits, tl.where(expert_ok[None, :], 0.0, float("-inf")))

    # probs = softmax(logits) over experts                                       [BLOCK_S, E]
    row_max = tl.max(logits, axis=1)
    numer = tl.exp(logits - row_max[:, None])
    probs = numer / tl.sum(numer, axis=1)[:, None]
    tl.store(probs_ptr + token[:, None].to(tl.int64) * num_experts + expert[None, :], probs,
             mask=both)

    first = tl.argmax(probs, axis=1)  # ties go to the lower expert, like torch.argmax
    for j in tl.static_range(K):
        if j == 0:
            choice = first
        else:
            # second choice: argmax of the logits with the first choice masked out
            choice = tl.argmax(tl.where(expert[None, :] == first[:, None], float("-inf"), logits),
                               axis=1)
        onehot = ((expert[None, :] == choice[:, None]) & token_ok[:, None]).to(tl.int32)
        gate = tl.sum(tl.where(onehot > 0, probs, 0.0), axis=1)  # probs[s, choice]
        # rank of the route among this block's routes to the same expert (0-based)
        rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1
        route = token * K + j
        tl.store(expert_ptr + route, choice.to(tl.int64), mask=token_ok)
        tl.store(gate_ptr + route, gate, mask=token_ok)
        tl.store(rank_ptr + route, rank.to(tl.int64), mask=token_ok)
        # histogram[j, block, e]: routes of choice j in this block that asked for expert e
        tl.store(hist_ptr + (j * num_blocks + block) * num_experts + expert,
                 tl.sum(onehot, axis=0), mask=expert_ok)


@triton.jit
def _scan_kernel(hist_ptr, counts_ptr, num_experts, num_blocks,
                 K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
    """Exclusive prefix sum over blocks, in place: hist[j, b, e] -> first slot of (j, b) in e."""
    expert = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    expert_ok = expert < num_experts
    carry = tl.zeros([BLOCK_E], dtype=tl.int32)  # routes already queued for each expert
    for j in tl.static_range(K):
        queued_before = carry
        for start in range(0, num_blocks, BLOCK_B):
            block = start + tl.arange(0, BLOCK_B)
            mask = (block[:, None] < num_blocks) & expert_ok[None, :]
            ptrs = hist_ptr + (j * num_blocks + block[:, None]) * num_experts + expert[None, :]
            hist = tl.load(ptrs, mask=mask, other=0)  # [BLOCK_B, BLOCK_E]
            inclusive = tl.cumsum(hist, axis=0)
            tl.store(ptrs, inclusive - hist + carry[None, :], mask=mask)
            carry += tl.sum(hist, axis=0)
        tl.store(counts_ptr + j * num_experts + expert, (carry - queued_before).to(tl.int64),
                 mask=expert_ok)


@triton.jit
def _slot_kernel(expert_ptr, weight_ptr, slot_ptr, start_ptr, num_tokens, num_experts,
                 num_blocks, capacity, eps, K: tl.constexpr, DROPLESS: tl.constexpr,
                 RENORMALIZE: tl.constexpr, BLOCK_S: tl.constexpr):
    block = tl.program_id(0)
    token = block * BLOCK_S + tl.arange(0, BLOCK_S)
    token_ok = token < num_tokens
    total = tl.zeros([BLOCK_S], dtype=tl.float32)
    for j in tl.static_range(K):
        route = token * K + j
        expert = tl.load(expert_ptr + route, mask=token_ok, other=0)
        rank = tl.load(slot_ptr + route, mask=token_ok, other=0)  # local rank, from pass 1
        start = tl.load(start_ptr + (j * num_blocks + block) * num_experts + expert,
                        mask=token_ok, other=0)
        slot = rank + start
        if DROPLESS:
            kept = slot >= 0
        else:
            kept = slot < capacity
        gate = tl.where(kept, tl.load(weight_ptr + route, mask=token_ok, other=0.0), 0.0)
        tl.store(slot_ptr + route, tl.where(kept, slot, -1), mask=token_ok)
        tl.store(weight_ptr + route, gate, mask=token_ok)
        total += gate
    if RENORMALIZE:
        # top-k: g_j / max(sum of kept g, eps), DeepSpeed's renormalisation
        denom = tl.maximum(total, eps)
        for j in tl.static_range(K):
            route = token * K + j
            gate = tl.load(weight_ptr + route, mask=token_ok, other=0.0)
            tl.store(weight_ptr + route, gate / denom, mask=token_ok)


def fused_route(logits: Tensor, config: RouterConfig | None = None, *,
                block_tokens: int | None = None, **options) -> Routing:
    """Route S tokens over E experts with the fused gating kernels (inference: no RTS, no noise).

    Same arguments and result as ``moelab.route(logits, config, training=False, **options)``
    for k in {1, 2}, token choice and the "position" drop policy (renormalize None: top-1 keeps
    the raw probability, top-2 divides the kept weights by their sum); the capacity factor is
    the config's eval one. ``block_tokens`` (a power of 2) is the number of tokens each program
    of the block kernels handles. aux_loss and z_loss are computed with torch from the
    probabilities the kernel wrote.
    """
    config = resolve(RouterConfig, config, options)
    check_logits(logits)
    num_tokens, num_experts = logits.shape
    config.check_experts(num_experts)
    k = config.k
    if config.choice != "token" or config.drop_policy != "position":
        raise ValueError(f"fused_route is token-choice routing with the 'position' drop policy; "
                         f"got choice={config.choice!r}, drop_policy={config.drop_policy!r}: "
                         "use moelab.route")
    if k not in (1, 2):
        raise ValueError(f"fused_route handles k = 1 and k = 2 (DeepSpeed's top1/top2 gating); "
                         f"got k={k}: use moelab.route for k > 2")
    if logits.dtype == torch.float64:
        raise ValueError("fused_route computes in float32; got float64 logits (use moelab.route)")
    if logits.requires_grad and torch.is_grad_enabled():
        raise ValueError("fused_route is the inference gate and has no backward; use "
                         "moelab.route for training, or call it under torch.no_grad()")
    if block_tokens is None:
        block_tokens = 16 if logits.device.type == "cpu" else 64
    if block_tokens < 1 or block_tokens & (block_tokens - 1):
        raise ValueError(f"block_tokens must be a power of 2; got {block_tokens}")
    check_launch(_gate_block_kernel, logits)

    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    device = logits.device
    block_e = max(2, next_power_of_2(num_experts))
    num_blocks = triton.cdiv(num_tokens, block_tokens)
    probs = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=device)
    expert = torch.empty(num_tokens, k, dtype=torch.long, device=device)
    weight = torch.empty(num_tokens, k, dtype=torch.float32, device=device)
    slot = torch.empty(num_tokens, k, dtype=torch.long, device=device)
    # hist[j, b, e] (int32): block histograms; the scan turns them into starting slots in place.
    hist = torch.empty(k, num_blocks, num_experts, dtype=torch.int32, device=device)
    counts_per_choice = torch.empty(k, num_experts, dtype=torch.long, device=device)

    _gate_block_kernel[(num_blocks,)](
        logits, probs, expert, weight, slot, hist, num_tokens, num_experts, num_blocks,
        logits.stride(0), K=k, BLOCK_S=block_tokens, BLOCK_E=block_e)
    scan_e = min(block_e, 64)
    _scan_kernel[(triton.cdiv(num_experts, scan_e),)](
        hist, counts_per_choice, num_experts, num_blocks, K=k,
        BLOCK_B=min(SCAN_BLOCK, max(2, next_power_of_2(num_blocks))), BLOCK_E=scan_e)
    capacity = (expert_capacity(num_tokens, num_experts, config.capacity_factor_for(False), k,
                                config.min_capacity) if config.drop_tokens else None)
    _slot_kernel[(num_blocks,)](
        expert, weight, slot, hist, num_tokens, num_experts, num_blocks,
        capacity if capacity is not None else 0, torch.finfo(torch.float32).eps,
        K=k, DROPLESS=capacity is None,
        RENORMALIZE=k > 1 if config.renormalize is None else config.renormalize,
        BLOCK_S=block_tokens)

    # Losses from what the kernel wrote (DeepSpeed's formulas, as in moelab.route).
    # (computed on first read: the fused gate serves, and serving never reads them)
    z = deferred(z_loss, logits.float(), probs, expert[:, 0])  # first choice = argmax
    aux = deferred(aux_loss, probs, expert)
    return Routing(expert=expert, weight=weight, slot=slot, capacity=capacity, probs=probs,
                   counts=counts_per_choice.sum(dim=0), aux_loss=aux, z_loss=z)
