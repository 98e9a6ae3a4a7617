"""The router's balancing losses: DeepSpeed's load-balancing loss l_aux and ST-MoE's z-loss.

Both are computed from what routing already has (the probabilities, the choices, the most
probable expert), so the router and the fused Triton gate call the same two functions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def aux_loss(probs: Tensor, expert: Tensor) -> Tensor:
    """DeepSpeed's load-balancing loss for each k, from probs [S, E] and the choices [S, k].

    me_e = mean_s probs[s, e]; ce_e = the fraction of tokens whose counted choice went to e.
    top-1: l_aux = E · Σ_e me_e · ce_e (Switch Transformer eq. 4); top-2 (GShard) counts the first
    choice only and writes it E² · mean_e(me_e · ce_e), the same number; top-k > 2:
    E²/k · mean_e(me_e · ce_e) with ce over all k choices. As ce_e = (1/S) Σ_s [e_s = e], each is
    E times the mean of me over the counted routes, which is what is computed (no counting).

    It is 1 when the counted routes and the mean probabilities are both uniform (balanced
    routing), but also whenever the probabilities alone are uniform, whatever the counts: a
    value near 1 does not by itself mean the load is balanced.
    """
    num_experts, k = probs.shape[1], expert.shape[1]
    if probs.shape[0] == 0:  # no tokens (an expert-parallel rank without any): nothing to balance
        return probs.sum()
    me = probs.mean(dim=0)  # [E]
    counted = expert[:, 0] if k <= 2 else expert.reshape(-1)  # [S] or [S·k]
    return me.index_select(0, counted).mean() * num_experts


def z_loss(logits: Tensor, probs: Tensor, top: Tensor) -> Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): L_z = mean_s (logsumexp_e logits[s, e])².

    p = softmax(l) = exp(l - lse), so lse = l_t - log p_t for any expert t; at the token's most
    probable expert ``top`` [S] (p_t >= 1/E, never underflowing) this is exact to rounding, and
    it reuses the softmax instead of a second exp pass over [S, E] (2-3x faster on the CPU)."""
    if logits.shape[0] == 0:  # no tokens: 0, with the graph intact
        return logits.sum()
    top = top[:, None]  # [S, 1]
    lse = logits.gather(1, top) - probs.gather(1, top).log()  # [S, 1]
    return lse.square().mean()


def z_loss_of_logits(logits: Tensor) -> Tensor:
    """The z-loss from the logits alone, mean_s (logsumexp_e logits[s, e])² (for sigmoid scores,
    which give no softmax to reuse)."""
    if logits.shape[0] == 0:
        return logits.sum()
    return torch.logsumexp(logits, dim=-1).square().mean()


def sequence_balance_loss(dist: Tensor, expert: Tensor, sequence_length: int | None) -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss (Liu et al. 2024, eqs. 17-20), per sequence of T
    tokens and averaged over the sequences:

        f_i = E / (k·T) · Σ_t 1(expert i among token t's k),  P_i = (1/T) Σ_t s'_{i,t},
        L = Σ_i f_i · P_i

    with s' the scores normalised over the experts (``dist`` [S, E]); ``sequence_length`` None:
    the S tokens are one sequence. Balanced routing gives 1, as DeepSpeed's l_aux does."""
    num_tokens, num_experts = dist.shape
    if num_tokens == 0:
        return dist.sum()
    k, length = expert.shape[1], sequence_length or num_tokens
    if num_tokens % length:
        raise ValueError(f"sequence_length={length} must divide the {num_tokens} tokens routed")
    chosen = torch.zeros_like(dist).scatter_(1, expert, 1.0)  # [S, E]
    f = chosen.view(-1, length, num_experts).sum(1) * (num_experts / (k * length))  # [B, E]
    p = dist.view(-1, length, num_experts).mean(1)  # [B, E]
    return (f * p).sum(1).mean()


def global_balance_loss(dist: Tensor, counts: Tensor) -> Tensor:
    """The global-batch balance loss (Qwen3; Megatron's global_aux_loss): E · Σ_i f_i · P_i with
    f_i the fraction of all routes that went to expert i, counted over every data-parallel rank
    (``counts`` [E], already summed), and P_i this rank's mean score of expert i. In one process
    it is the Switch loss over all k choices; balanced routing gives 1."""
    num_experts = dist.shape[1]
    if dist.shape[0] == 0:
        return dist.sum()
    f = counts.to(dist.dtype) / counts.sum().clamp(min=1)  # [E]
    return num_experts * (f * dist.mean(0)).sum()
