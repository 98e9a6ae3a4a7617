"""Slow, obvious references the tests compare moelab against: per-token Python loops."""

from __future__ import annotations

import math

import torch


def random_logits(seed: int, num_tokens: int, num_experts: int, scale: float = 2.0):
    """Gate logits [S, E] ~ N(0, scale²), reproducible per seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, num_experts, generator=generator) * scale


def reference_route(logits: torch.Tensor, *, k: int, capacity_factor: float, min_capacity: int,
                    drop_tokens: bool, drop_policy: str):
    """Deterministic token-choice routing (eval: no noise, no RTS, no sampling), one token and one
    route at a time. Returns (expert, slot, weight, capacity, counts) as Python lists."""
    probs = torch.softmax(logits.float(), dim=-1).tolist()
    num_tokens, num_experts = logits.shape
    choices = []
    for s in range(num_tokens):
        ranked = sorted(range(num_experts), key=lambda e: (-probs[s][e], e))
        choices.append(ranked[:k])
    counts = [0] * num_experts
    for s in range(num_tokens):
        for e in choices[s]:
            counts[e] += 1

    # The order in which routes queue for slots: top-2 queues all first choices before any
    # second choice; top-1 and top-k>2 queue token by token.
    if k == 2:
        queue = [(s, j) for j in range(k) for s in range(num_tokens)]
    else:
        queue = [(s, j) for s in range(num_tokens) for j in range(k)]
    if drop_tokens:
        capacity = max(math.ceil(num_tokens / num_experts * capacity_factor * k), min_capacity)
    else:
        capacity = None
    if drop_policy == "probs":
        priority = sorted(queue, key=lambda r: -probs[r[0]][choices[r[0]][r[1]]])  # stable
    else:
        priority = list(queue)
    kept = set()
    taken = [0] * num_experts
    for s, j in priority:
        e = choices[s][j]
        if capacity is None or taken[e] < capacity:
            taken[e] += 1
            kept.add((s, j))
    slot = [[-1] * k for _ in range(num_tokens)]
    next_slot = [0] * num_experts
    for s, j in queue:
        if (s, j) in kept:
            e = choices[s][j]
            slot[s][j] = next_slot[e]
            next_slot[e] += 1
    weight = []
    for s in range(num_tokens):
        gates = [probs[s][choices[s][j]] if slot[s][j] >= 0 else 0.0 for j in range(k)]
        if k > 1:
            total = max(sum(gates), torch.finfo(torch.float32).eps)
            gates = [g / total for g in gates]
        weight.append(gates)
    return choices, slot, weight, capacity, counts


def reference_moe_forward(layer, x: torch.Tensor, routing) -> torch.Tensor:
    """y_s = sum over kept routes j of weight[s, j] · FFN_{expert[s, j]}(x_s), token by token,
    with each expert's FFN written out from its weights (plus the residual mix if any)."""
    experts = layer.experts
    tokens = x.reshape(-1, x.shape[-1])
    rows = []
    for s in range(tokens.shape[0]):
        y = torch.zeros_like(tokens[s])
        for j in range(routing.k):
            if routing.slot[s, j] < 0:
                continue
            e = int(routing.expert[s, j])
            h = tokens[s] @ experts.w_in[e]
            if experts.b_in is not None:
                h = h + experts.b_in[e]
            if experts.activation == "swiglu":
                gate, up = h.chunk(2)
                h = torch.nn.functional.silu(gate) * up
            elif experts.activation == "relu":
                h = torch.relu(h)
            else:
                h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
            out = h @ experts.w_out[e]
            if experts.b_out is not None:
                out = out + experts.b_out[e]
            y = y + routing.weight[s, j].to(out.dtype) * out
        if layer.residual:
            coef = torch.softmax(layer.coefficient(tokens[s]), dim=-1)
            y = coef[0] * y + coef[1] * layer.mlp(tokens[s])
        rows.append(y)
    return torch.stack(rows).view(x.shape)


def reference_modern_choice(logits: torch.Tensor, *, k: int, score: str = "softmax",
                            n_group: int = 1, topk_group: int = 1, scale: float = 1.0,
                            renormalize: bool | None = None, bias=None):
    """Dropless token-choice routing as today's models do it, one token at a time, written from
    the papers: scores (softmax over experts, or a sigmoid per expert); choice scores = the
    sigmoid scores (or, for the softmax, the logits) + bias, for choosing only; group-limited
    top-k (a group's score: the sum of its top-2 choice scores; keep topk_group groups), the k
    best experts inside the kept groups, weights = the unbiased scores of the chosen,
    renormalised when asked (None: for k > 1), times scale.
    Returns ([S] sets of chosen experts, [S] dicts expert -> weight)."""
    num_tokens, num_experts = logits.shape
    per_group = num_experts // n_group
    chosen_sets, weights = [], []
    for s in range(num_tokens):
        row = logits[s].double().tolist()
        if score == "softmax":
            top = max(row)
            exps = [math.exp(v - top) for v in row]
            scores = [v / sum(exps) for v in exps]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in row]
        ranked_by = row if score == "softmax" else scores
        biased = [v + (float(bias[e]) if bias is not None else 0.0) for e, v in
                  enumerate(ranked_by)]
        allowed = set(range(num_experts))
        if n_group > 1:
            group_scores = []
            for g in range(n_group):
                members = sorted(biased[g * per_group:(g + 1) * per_group], reverse=True)
                group_scores.append(sum(members[:min(2, per_group)]))
            kept = sorted(range(n_group), key=lambda g: (-group_scores[g], g))[:topk_group]
            allowed = {e for g in kept for e in range(g * per_group, (g + 1) * per_group)}
        ranked = sorted(allowed, key=lambda e: (-biased[e], e))[:k]
        gates = {e: scores[e] for e in ranked}
        if (k > 1 if renormalize is None else renormalize):
            total = sum(gates.values())
            gates = {e: g / total for e, g in gates.items()}
        chosen_sets.append(set(ranked))
        weights.append({e: g * scale for e, g in gates.items()})
    return chosen_sets, weights
