"""The router's balancing losses: DeepSpeed's load-balancing loss l_aux and ST-MoE's z-loss.

Both are computed from what routing already has (the probabilities, the choices, the most
probable expert), so the router and the fused Triton gate call the same two functions.
"""

from __future__ import annotations

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
