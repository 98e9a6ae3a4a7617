"""Routing: router logits -> the token-to-expert mapping table.

This is the gate of DeepSpeed-MoE (Rajbhandari et al. 2022) and of GShard/Switch before it, written
so that its result is the paper's dense *mapping table* (§5.4: "a dense token-to-expert mapping
table") rather than the one-hot [S, E, C] masks of DeepSpeed's training code. Every later stage
(dispatch, the experts, the combine, the all-to-all, the kernels, the views) reads one `Routing`.

Semantics follow DeepSpeed's ``top1gating`` / ``top2gating`` / ``topkgating`` (deepspeed/moe/
sharded_moe.py) exactly, except where DeepSpeed is wrong or order-unstable; each such place has a
comment starting with "DeepSpeed:" that says what it does and why moelab differs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

NOISE_POLICIES = (None, "Jitter", "RSample")
DROP_POLICIES = ("position", "probs")
CHOICES = ("token", "expert")
JITTER_EPS = 1e-2  # DeepSpeed's multiplicative_jitter epsilon


class _computed_once:
    """A property computed on first use and then kept on the instance: functools.cached_property
    without its lock (Python 3.11's takes an RLock, which torch.compile cannot trace)."""

    def __init__(self, compute):
        self.compute, self.name, self.__doc__ = compute, compute.__name__, compute.__doc__

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.compute(instance)  # shadows this descriptor
        return value


class DeferredField:
    """A dataclass field holding a tensor, or a function that computes it on first read.

    The routing losses use it: serving never reads them, and at a few hundred tokens their ~10
    small ops are a fifth of routing's cost. Any code that reads the field gets the tensor."""

    def __set_name__(self, owner, name):
        self.name, self.stored = name, "_" + name

    def __get__(self, instance, owner=None):
        if instance is None:  # what dataclass asks for a default: there is none
            raise AttributeError(self.name)
        value = instance.__dict__[self.stored]
        if not isinstance(value, Tensor):
            value = instance.__dict__[self.stored] = value()
        return value

    def __set__(self, instance, value):
        instance.__dict__[self.stored] = value


def deferred(compute, *inputs: Tensor):
    """``compute(*inputs)`` now when autograd needs its graph (an input requires grad, or
    torch.compile is tracing), else a function that computes it on first read."""
    if torch.compiler.is_compiling() or any(t.requires_grad for t in inputs):
        return compute(*inputs)
    return functools.partial(compute, *inputs)


@dataclass
class Routing:
    """The token-to-expert mapping table, plus what the losses and views need.

    For token s and its j-th choice: ``expert[s, j]`` is the chosen expert, ``slot[s, j]`` its
    position in that expert's buffer (-1 when the route was dropped) and ``weight[s, j]`` the
    combine weight (0 for dropped routes). ``counts`` are the routes each expert was asked for,
    before any dropping (DeepSpeed's ``exp_counts``).

    With expert-choice routing (``expert_choice=True``) the table has one column per expert
    (``expert[s, j] == j``) and ``slot[s, j] >= 0`` where expert j picked token s.
    """

    expert: Tensor  # [S, k] long: chosen expert per token and choice
    weight: Tensor  # [S, k] float: combine weight, 0 where dropped
    slot: Tensor  # [S, k] long: position inside the expert's buffer, -1 where dropped
    capacity: int | None  # slots per expert; None = dropless
    probs: Tensor  # [S, E] float: router probabilities softmax(logits)
    counts: Tensor  # [E] long: routes asked of each expert, before dropping
    # 0-dim: the load-balancing loss l_aux, and the router z-loss (ST-MoE),
    # mean(logsumexp(logits)^2); either may be given as a function, run on first read
    aux_loss: Tensor = DeferredField()
    z_loss: Tensor = DeferredField()
    expert_choice: bool = False

    @property
    def num_tokens(self) -> int:
        return self.expert.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[1]

    @property
    def k(self) -> int:
        return self.expert.shape[1]

    @property
    def kept(self) -> Tensor:
        """[S, k] bool: routes that reach their expert."""
        return self.slot >= 0

    # load, offsets and row are computed once per Routing, on first use (dispatch, the experts
    # and combine each read them): treat the tensors they return as read-only.

    @_computed_once
    def load(self) -> Tensor:
        """[E] long: routes each expert actually processes (after dropping)."""
        # kept flags counted per expert (no selection whose size depends on the data)
        return count_per_expert(self.expert.reshape(-1).clamp_min(0), self.num_experts,
                                self.kept.reshape(-1))

    @_computed_once
    def offsets(self) -> Tensor:
        """[E + 1] long: where each expert's rows start in the packed (dropless) layout; expert e
        owns rows offsets[e]:offsets[e + 1]."""
        return torch.cat([self.load.new_zeros(1), torch.cumsum(self.load, 0)])

    @_computed_once
    def row(self) -> Tensor:
        """[S, k] long: each route's row in the flattened dispatch buffer, -1 where dropped:
        e·C + slot in the capacity layout, offsets[e] + slot in the packed one."""
        if self.capacity is not None:
            start = self.expert * self.capacity
        else:
            start = self.offsets[self.expert]
        return torch.where(self.kept, start + self.slot, -1)

    @property
    def buffer_rows(self) -> int:
        """Rows per expert in the dispatched buffer: C, or the largest load when dropless."""
        if self.capacity is not None:
            return self.capacity
        return int(self.load.max().item()) if self.num_tokens else 0

    @property
    def drop_fraction(self) -> float:
        """Fraction of requested routes that were dropped (for expert choice: of tokens that no
        expert picked)."""
        if self.expert_choice:
            return float((~self.kept.any(dim=1)).float().mean().item())
        return float((~self.kept).float().mean().item())

    def __repr__(self) -> str:
        capacity = "dropless" if self.capacity is None else f"capacity={self.capacity}"
        kind = ", expert choice" if self.expert_choice else ""
        return (f"Routing(tokens={self.num_tokens}, experts={self.num_experts}, k={self.k}, "
                f"{capacity}{kind}, counts={self.counts.tolist()}, "
                f"dropped={self.drop_fraction:.1%}, aux_loss={float(self.aux_loss):.4f}, "
                f"z_loss={float(self.z_loss):.4f})")

    def detach(self) -> Routing:
        """A copy holding no autograd graph (for views and metric histories)."""
        return Routing(
            expert=self.expert, weight=self.weight.detach(), slot=self.slot,
            capacity=self.capacity, probs=self.probs.detach(), counts=self.counts,
            aux_loss=self.aux_loss.detach(), z_loss=self.z_loss.detach(),
            expert_choice=self.expert_choice,
        )


def expert_capacity(
    num_tokens: int, num_experts: int, capacity_factor: float, k: int = 1, min_capacity: int = 4
) -> int:
    """Slots per expert: C = max(ceil(S / E · cf · k), min_capacity).

    DeepSpeed evaluates ``ceil((S / E) * cf)`` on a float32 tensor (``_capacity``); doing the same
    float32 arithmetic here keeps C identical at the rounding edges (e.g. S/E · cf = 4.0000001).
    """
    scaled = np.float32(num_tokens / num_experts) * np.float32(capacity_factor * k)
    return max(int(math.ceil(scaled)), int(min_capacity))


def _gumbel(shape, *, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard Gumbel(0, 1) noise, -log(-log U)."""
    tiny = torch.finfo(like.dtype).tiny
    uniform = torch.rand(shape, dtype=like.dtype, device=like.device, generator=generator)
    return -torch.log((-torch.log(uniform.clamp(min=tiny))).clamp(min=tiny))


def _check_logits(logits) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a 2-D tensor [tokens, experts]; got {shape}")
    if logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"logits must hold at least one token and one expert; got shape "
                         f"{tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point; got {logits.dtype}")
    # The finiteness check waits for the device; a CUDA graph being captured cannot wait, and
    # torch.compile would break its graph there, so both skip it (the eager warm-up run before a
    # capture or a compile has checked the same path).
    capturing = logits.is_cuda and torch.cuda.is_current_stream_capturing()
    if not (capturing or torch.compiler.is_compiling()) and not bool(torch.isfinite(logits).all()):
        raise ValueError("logits contain NaN or Inf: check the router input and learning rate "
                         "(routing needs finite gate logits)")


def _check_options(num_experts, k, capacity_factor, min_capacity, noisy_gate_policy,
                   drop_policy, choice) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(f"k must be an integer in [1, num_experts={num_experts}]; got {k!r}")
    if not (isinstance(capacity_factor, (int, float)) and math.isfinite(capacity_factor)
            and capacity_factor > 0):
        raise ValueError(f"capacity_factor must be a finite number > 0; got {capacity_factor!r}")
    if isinstance(min_capacity, bool) or not isinstance(min_capacity, int) or min_capacity < 0:
        raise ValueError(f"min_capacity must be an integer >= 0; got {min_capacity!r}")
    if noisy_gate_policy not in NOISE_POLICIES:
        raise ValueError(f"noisy_gate_policy must be one of {NOISE_POLICIES}; "
                         f"got {noisy_gate_policy!r}")
    if noisy_gate_policy == "RSample" and k != 1:
        raise ValueError("noisy_gate_policy='RSample' applies to top-1 routing only (as in "
                         f"DeepSpeed); got k={k}. For k=2 use second_expert_sampling=True.")
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}; got {drop_policy!r}")
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {CHOICES}; got {choice!r}")


def count_per_expert(expert: Tensor, num_experts: int, weight: Tensor | None = None) -> Tensor:
    """[R] expert ids -> [E] long counts (of ``weight``'s 0/1 entries when given). A scatter-add
    into E zeros: unlike ``bincount``, whose output size depends on the largest id, it never waits
    for the device, so routing can run inside a captured CUDA graph."""
    ones = torch.ones_like(expert) if weight is None else weight.long()
    return torch.zeros(num_experts, dtype=torch.long, device=expert.device).scatter_add_(
        0, expert, ones)


#: Up to this many one-hot cells (routes × groups) the rank is a prefix count over the one-hot
#: mask; above it, a stable sort (on 2 CPU cores the one-hot count is ~1.6x faster at 1024 × 9
#: cells and ~4x slower at 8192 × 33).
ONE_HOT_RANK_MAX_CELLS = 1 << 16


def _rank_within_expert(expert: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """[R] -> ([R] rank, [E + 1] counts): the rank of each route among the routes of its expert,
    in the given order, and the routes per expert.

    expert == num_experts marks routes that take no rank (they get ranks in an ignored group,
    counted last). This is the per-expert prefix count, DeepSpeed's ``cumsum(mask) - 1``: over
    the [R, E + 1] one-hot mask when that is small, else with one stable sort (no R·E work).
    """
    groups = num_experts + 1
    if expert.numel() * groups <= ONE_HOT_RANK_MAX_CELLS:
        # mask[r, e] = 1 if route r goes to e (a scatter: unlike F.one_hot, no device wait)
        mask = torch.zeros(expert.numel(), groups, dtype=torch.long, device=expert.device)
        prefix = mask.scatter_(1, expert[:, None], 1).cumsum(0)  # [R, E + 1]
        # rank_r = sum_{r' <= r} mask[r', e_r] - 1; the last prefix row counts every route
        rank = prefix.gather(1, expert[:, None]).squeeze(1) - 1
        return rank, prefix[-1].clone()
    order = torch.argsort(expert, stable=True)  # routes grouped by expert, original order inside
    counts = count_per_expert(expert, groups)  # [E + 1]
    starts = torch.cumsum(counts, 0) - counts  # [E + 1]: first sorted position of each expert
    rank = torch.empty_like(expert)
    rank[order] = torch.arange(expert.numel(), device=expert.device) - starts[expert[order]]
    return rank, counts


def route(
    logits: Tensor,
    *,
    k: int = 1,
    capacity_factor: float = 1.0,
    min_capacity: int = 4,
    drop_tokens: bool = True,
    use_rts: bool = True,
    noisy_gate_policy: str | None = None,
    second_expert_sampling: bool = True,
    drop_policy: str = "position",
    training: bool = True,
    generator: torch.Generator | None = None,
    choice: str = "token",
    selection_bias: Tensor | None = None,
    renormalize: bool | None = None,
) -> Routing:
    """Route S tokens over E experts from gate logits [S, E]; the paper's defaults throughout.

    Args:
        k: experts per token (top-k). k=1 and k=2 follow DeepSpeed's top1gating/top2gating,
            k>2 its topkgating.
        capacity_factor: C = max(ceil(S/E · capacity_factor · k), min_capacity) slots per expert.
        drop_tokens: False = dropless (``capacity=None``): every route is kept. Capacity is then
            never a number that ranks must agree on (DeepSpeed all-reduces a max capacity, and
            ranks that disagree hang its all-to-all: DeepSpeed #6809).
        use_rts: Random Token Selection (Kim et al. 2021, on by default in DeepSpeed): top-1
            routes compete for capacity with a random priority instead of by position.
        noisy_gate_policy: None, "Jitter" (multiplies the *router input* by U(1-ε, 1+ε); the
            Router applies it, ``route`` sees the resulting logits) or "RSample" (Gumbel noise on
            the top-1 choice only; the combine weight stays the clean probability). Training only.
        second_expert_sampling: top-2 picks the second expert from logits + Gumbel noise
            (GShard). Training only; see below.
        drop_policy: which routes keep their slot when an expert is over capacity: "position"
            (earlier tokens first; for top-2, every first choice before any second choice) or
            "probs" (the highest router probabilities first).
        training: noise, RTS and second-expert sampling happen only when True.
        generator: a torch.Generator for every random draw, for reproducible routing.
        choice: "token" (tokens choose experts) or "expert": expert-choice routing (Zhou et al.
            2022, "Mixture-of-Experts with Expert Choice Routing"): every expert takes its top-C
            tokens by router probability, so load is balanced by construction and a token may be
            taken by any number of experts (including none).
        selection_bias: [E] added to the logits *for choosing experts only*; the combine weights
            stay the unbiased probabilities. This is DeepSeek-V3's auxiliary-loss-free load
            balancing (Liu et al. 2024, §2.1.2), whose bias the Router updates from the load.
            DeepSeek-V3 adds it to sigmoid affinities; moelab's router is a softmax, so it is
            added to the logits, which orders each token's experts the same way.
        renormalize: whether a token's kept weights are divided by their sum. None = DeepSpeed's
            choice per k (top-1: no, the raw probability; top-k > 1: yes). Mixtral renormalises;
            Qwen1.5-MoE (norm_topk_prob=False) does not.

    Returns:
        Routing with the mapping table, router probabilities, counts, aux loss and z-loss.
    """
    if noisy_gate_policy == "None":  # DeepSpeed accepts the string "None" too
        noisy_gate_policy = None
    _check_logits(logits)
    num_experts = logits.shape[1]
    _check_options(num_experts, k, capacity_factor, min_capacity, noisy_gate_policy,
                   drop_policy, choice)
    if selection_bias is not None and tuple(selection_bias.shape) != (num_experts,):
        raise ValueError(f"selection_bias must have shape [num_experts]=({num_experts},); "
                         f"got {tuple(selection_bias.shape)}")
    # DeepSpeed routes in float32 whatever the model dtype ("everything is in fp32"); moelab
    # routes in at least float32 (float64 stays float64, for gradcheck and references).
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    num_tokens, num_experts = logits.shape

    # probs = softmax(x · W_g) over experts                                     [S, E]
    probs = torch.softmax(logits, dim=-1)
    top = torch.argmax(probs, dim=-1)  # [S]: each token's most probable expert
    z_loss = deferred(_z_loss, logits, probs, top)

    if choice == "expert":
        return _expert_choice(logits, probs, z_loss, k, capacity_factor, min_capacity)

    choice_scores = logits.detach()
    if selection_bias is not None:
        choice_scores = choice_scores + selection_bias.to(choice_scores)

    # ---- choose k experts per token ------------------------------------------------ [S, k]
    if k == 1:
        if noisy_gate_policy == "RSample" and training:
            # RSample: argmax(logits + Gumbel) picks the expert; the gate value stays clean.
            first = torch.argmax(choice_scores + _gumbel(logits.shape, like=logits,
                                                         generator=generator), dim=-1)
        else:
            # DeepSpeed takes argmax(gates); argmax(logits) is the same choice.
            first = top if selection_bias is None else torch.argmax(choice_scores, dim=-1)
        expert = first[:, None]
    elif k == 2:
        first = top if selection_bias is None else torch.argmax(choice_scores, dim=-1)
        second_scores = choice_scores
        # DeepSpeed: samples the second expert (logits + Gumbel) in eval too, so its eval loss is
        # random (DeepSpeed PR #8620). moelab samples only while training.
        if second_expert_sampling and training:
            second_scores = second_scores + _gumbel(logits.shape, like=logits, generator=generator)
        second_scores = second_scores.scatter(1, first[:, None], float("-inf"))
        second = torch.argmax(second_scores, dim=-1)
        expert = torch.stack([first, second], dim=1)
    else:
        expert = torch.topk(choice_scores, k, dim=-1).indices

    # load-balancing loss, DeepSpeed's formula for each k (computed before dropping)
    aux_loss = deferred(_aux_loss, probs, expert)

    # ---- capacity and dropping ------------------------------------------------------------
    # Route order: the order in which routes take slots. top-2 gives every first choice a slot
    # before any second choice (DeepSpeed: locations2 += sum(mask1)); top-1 and top-k>2 go by
    # token position (DeepSpeed's topkgating cumsums the k-hot mask over tokens).
    route_order = expert.t() if k == 2 else expert  # [k, S] choice-major, or [S, k]
    flat_expert = route_order.reshape(-1)  # [R] with R = S·k, in route order

    # Every branch ranks all R routes once; that pass also gives
    # counts_e = Σ_s mask[s, e], before dropping (DeepSpeed's exp_counts)               [E]
    if not drop_tokens:
        capacity = None
        flat_slot, counts = _rank_within_expert(flat_expert, num_experts)  # every route kept
    else:
        capacity = expert_capacity(num_tokens, num_experts, capacity_factor, k, min_capacity)
        if k == 1 and use_rts and training:
            # RTS: each routed token draws a random priority; per expert the top-C draws keep
            # their slot (DeepSpeed: topk(mask1 * U(0, 1), C, dim=0)).
            # DeepSpeed: applies RTS in eval too, so eval routing is random whenever an expert
            # overflows. moelab uses RTS only while training, keeping eval deterministic.
            priority = torch.rand(flat_expert.shape, device=logits.device, generator=generator)
        elif drop_policy == "probs":
            # DeepSpeed: topkgating's 'probs' ranks *raw logits* scattered into zeros, so tokens
            # with negative logits lose their slots to tokens that never chose the expert.
            # moelab ranks the chosen routes by their router probability.
            chosen_probs = probs.detach().gather(1, expert)  # [S, k]
            priority = (chosen_probs.t() if k == 2 else chosen_probs).reshape(-1)
        else:
            # "position": the route order itself. DeepSpeed: top-1 without RTS keeps by
            # torch.topk order over a 0/1 mask, which is not guaranteed to be position order;
            # moelab keeps the earliest tokens, as the drop policy says.
            priority = None
        if priority is None:
            rank, counts = _rank_within_expert(flat_expert, num_experts)
            # the first C routes of each expert in route order keep their rank as their slot
            flat_slot = torch.where(rank < capacity, rank, -1)
        else:
            # Sort by descending priority (stable, so ties keep route order), then rank by expert.
            by_priority = torch.argsort(priority, descending=True, stable=True)
            rank = torch.empty_like(flat_expert)
            ranked, counts = _rank_within_expert(flat_expert[by_priority], num_experts)
            rank[by_priority] = ranked
            # Slots: kept routes are numbered 0, 1, ... per expert in route order (DeepSpeed's
            # cumsum(mask) - 1 over the kept mask), so every buffer fills from its first row.
            kept = rank < capacity
            ranked_expert = torch.where(kept, flat_expert, num_experts)
            flat_slot = torch.where(kept, _rank_within_expert(ranked_expert, num_experts)[0], -1)
    counts = counts[:num_experts]  # [E]: the last group held no routes here
    slot = flat_slot.view(k, num_tokens).t() if k == 2 else flat_slot.view(num_tokens, k)
    kept_sk = slot >= 0  # [S, k]

    # ---- combine weights ------------------------------------------------------------------
    gate = probs.gather(1, expert) * kept_sk  # [S, k]: the router probability of each kept route
    if not (k > 1 if renormalize is None else renormalize):
        # top-1: the raw softmax probability, not renormalised (Switch / DeepSpeed).
        weight = gate
    else:
        # top-k: renormalised over the kept routes, g_j / max(sum_j g_j, eps) (DeepSpeed).
        denom = gate.sum(dim=1, keepdim=True).clamp(min=torch.finfo(gate.dtype).eps)
        weight = gate / denom

    return Routing(expert=expert, weight=weight, slot=slot, capacity=capacity, probs=probs,
                   counts=counts, aux_loss=aux_loss, z_loss=z_loss)


def _aux_loss(probs: Tensor, expert: Tensor) -> Tensor:
    """DeepSpeed's load-balancing loss for each k, from probs [S, E] and the choices [S, k].

    me_e = mean_s probs[s, e]; ce_e = the fraction of tokens whose counted choice went to e.
    top-1: l_aux = E · Σ_e me_e · ce_e (Switch Transformer eq. 4); top-2 (GShard) counts the first
    choice only and writes it E² · mean_e(me_e · ce_e), the same number; top-k > 2:
    E²/k · mean_e(me_e · ce_e) with ce over all k choices. As ce_e = (1/S) Σ_s [e_s = e], each is
    E times the mean of me over the counted routes, which is what is computed (no counting)."""
    num_experts, k = probs.shape[1], expert.shape[1]
    me = probs.mean(dim=0)  # [E]
    counted = expert[:, 0] if k <= 2 else expert.reshape(-1)  # [S] or [S·k]
    return me.index_select(0, counted).mean() * num_experts


def _z_loss(logits: Tensor, probs: Tensor, top: Tensor) -> Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): L_z = mean_s (logsumexp_e logits[s, e])².

    p = softmax(l) = exp(l - lse), so lse = l_t - log p_t for any expert t; at the token's most
    probable expert (p_t >= 1/E, never underflowing) this is exact to rounding, and it reuses
    the softmax instead of a second exp pass over [S, E] (2-3x faster on the CPU)."""
    top = top[:, None]  # [S, 1]
    lse = logits.gather(1, top) - probs.gather(1, top).log()  # [S, 1]
    return lse.square().mean()


def _expert_choice(logits: Tensor, probs: Tensor, z_loss: Tensor, k: int,
                   capacity_factor: float, min_capacity: int) -> Routing:
    """Expert-choice routing (Zhou et al. 2022): expert e takes the C tokens with the highest
    probs[:, e]; C = min(S, max(ceil(S/E · cf · k), min_capacity)), so k is the average number of
    experts per token. The combine weight is probs[s, e], unnormalised, as in the paper."""
    num_tokens, num_experts = probs.shape
    capacity = min(num_tokens, expert_capacity(num_tokens, num_experts, capacity_factor, k,
                                               min_capacity))
    picked_tokens = torch.topk(probs.detach(), capacity, dim=0).indices  # [C, E]
    picked = torch.zeros_like(probs, dtype=torch.bool)
    picked.scatter_(0, picked_tokens, True)  # [S, E]
    # Slots in token order inside each expert's buffer, like token-choice routing.
    slot = torch.where(picked, torch.cumsum(picked.long(), dim=0) - 1,
                       torch.full_like(picked, -1, dtype=torch.long))
    expert = torch.arange(num_experts, device=probs.device).expand(num_tokens, -1).contiguous()
    counts = torch.full((num_experts,), capacity, dtype=torch.long, device=probs.device)
    return Routing(expert=expert, weight=probs * picked, slot=slot, capacity=capacity,
                   probs=probs, counts=counts, aux_loss=logits.new_zeros(()), z_loss=z_loss,
                   expert_choice=True)


def gate_logits(x: Tensor, weight: Tensor, jitter: bool = False,
                generator: torch.Generator | None = None) -> Tensor:
    """[S, d] · W_g[E, d]ᵀ -> [S, E] logits in at least float32 (fp16/bf16 route in fp32).

    jitter: Switch Transformer's / DeepSpeed's "Jitter", x · U(1 - ε, 1 + ε) with ε = 1e-2.
    """
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if jitter:
        noise = torch.rand(x.shape, device=x.device, generator=generator)
        x = x * (1 - JITTER_EPS + 2 * JITTER_EPS * noise)
    return F.linear(x, weight.to(x.dtype))


class Router(nn.Module):
    """The gate: a bias-free linear map d_model -> num_experts, then `route`.

    Holds the options of `route` (see there) and picks the capacity factor by mode:
    ``capacity_factor`` while training, ``eval_capacity_factor`` in eval (DeepSpeed's pair, both
    1.0 by default). The gate runs in float32 for half-precision inputs, as in DeepSpeed
    (float64 stays float64).

    Auxiliary-loss-free balancing (DeepSeek-V3, Liu et al. 2024, §2.1.2): with
    ``bias_update_rate > 0`` the router keeps a per-expert ``selection_bias`` that only affects
    which experts are chosen; after each training step's routing it moves every expert's bias by
    ``rate · sign(mean load - load)``, so overloaded experts are chosen less. Off by default.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        k: int = 1,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float | None = None,
        min_capacity: int = 4,
        drop_tokens: bool = True,
        use_rts: bool = True,
        noisy_gate_policy: str | None = None,
        second_expert_sampling: bool = True,
        drop_policy: str = "position",
        choice: str = "token",
        bias_update_rate: float = 0.0,
        generator: torch.Generator | None = None,
        renormalize: bool | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("num_experts", num_experts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        if not (math.isfinite(bias_update_rate) and bias_update_rate >= 0):
            raise ValueError(f"bias_update_rate must be a finite number >= 0; "
                             f"got {bias_update_rate!r}")
        self.d_model, self.num_experts = d_model, num_experts
        self.options = dict(k=k, min_capacity=min_capacity, drop_tokens=drop_tokens,
                            use_rts=use_rts, noisy_gate_policy=noisy_gate_policy,
                            second_expert_sampling=second_expert_sampling,
                            drop_policy=drop_policy, choice=choice, renormalize=renormalize)
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = (capacity_factor if eval_capacity_factor is None
                                     else eval_capacity_factor)
        self.bias_update_rate = bias_update_rate
        self.generator = generator
        # Validate every option now, so a bad option fails at construction, not mid-training.
        for cf in (self.capacity_factor, self.eval_capacity_factor):
            _check_options(num_experts, k, cf, min_capacity,
                           None if noisy_gate_policy == "None" else noisy_gate_policy,
                           drop_policy, choice)
        # The gate weight W_g [E, d] (nn.Linear(d, E, bias=False) layout and init).
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.register_buffer("selection_bias", torch.zeros(num_experts),
                             persistent=bias_update_rate > 0)

    @property
    def k(self) -> int:
        return self.options["k"]

    @property
    def drop_tokens(self) -> bool:
        """Capacity dropping on (True) or dropless routing (False); switchable, e.g. for
        serving (`moelab.inference.inference_mode`)."""
        return self.options["drop_tokens"]

    @drop_tokens.setter
    def drop_tokens(self, value: bool) -> None:
        self.options["drop_tokens"] = bool(value)

    def logits(self, x: Tensor) -> Tensor:
        """[S, d] -> [S, E] gate logits in at least float32 (Jitter noise while training)."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"router input's last dim must be d_model={self.d_model}; "
                             f"got shape {tuple(x.shape)}")
        jitter = self.options["noisy_gate_policy"] == "Jitter" and self.training
        return gate_logits(x, self.weight, jitter=jitter, generator=self.generator)

    def fused_eligible(self, logits: Tensor) -> bool:
        """Whether the fused Triton gate (``moelab.kernels.fused_route``) gives this router's
        answer: eval, k <= 2, position-ordered token choice, no selection bias, float32 logits
        that need no gradient. Everything else (training, RTS, noise, probs-ordered dropping,
        expert choice, k > 2) is ``route``'s."""
        options = self.options
        return (not self.training and options["k"] <= 2 and options["choice"] == "token"
                and options["drop_policy"] == "position" and self.bias_update_rate == 0
                and logits.dtype == torch.float32
                and not (logits.requires_grad and torch.is_grad_enabled()))

    def forward(self, x: Tensor, *, fused: bool = False) -> Routing:
        """[S, d] -> Routing. ``fused=True`` (MoE's "triton" backend) routes with the fused
        Triton gate where `fused_eligible` says it gives the same answer, else with `route`."""
        logits = self.logits(x)
        if fused and self.fused_eligible(logits):
            from .kernels.gating import fused_route  # imports Triton

            return fused_route(logits, k=self.k, capacity_factor=self.eval_capacity_factor,
                               min_capacity=self.options["min_capacity"],
                               drop_tokens=self.drop_tokens,
                               renormalize=self.options["renormalize"])
        policy = self.options["noisy_gate_policy"]
        routing = route(
            logits,
            capacity_factor=self.capacity_factor if self.training else self.eval_capacity_factor,
            training=self.training,
            generator=self.generator,
            selection_bias=self.selection_bias if self.bias_update_rate > 0 else None,
            **{**self.options, "noisy_gate_policy": None if policy == "Jitter" else policy},
        )
        if self.bias_update_rate > 0 and self.training:
            self.update_selection_bias(routing.counts)
        return routing

    @torch.no_grad()
    def update_selection_bias(self, counts: Tensor) -> None:
        """DeepSeek-V3: b_e += γ · sign(mean load - load_e)."""
        counts = counts.float()
        self.selection_bias += self.bias_update_rate * torch.sign(counts.mean() - counts)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}"
