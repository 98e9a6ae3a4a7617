"""The gate: RouterConfig (every routing option, once), route() and the Router module.

This is the gate of DeepSpeed-MoE (Rajbhandari et al. 2022) and of GShard/Switch before it,
written so that its result is the paper's mapping table, a `moelab.routing.Routing`. ``route``
is four steps, each a function below with the formula above its lines:

    probs = softmax(logits)                              scores
    expert = choose_experts(...)        [S, k]           top-k, noise, second-expert sampling
    slot, counts, C = assign_slots(...) [S, k]           capacity, drop policy, RTS
    weight = combine_weights(...)       [S, k]           gate values, renormalisation

plus the losses (`moelab.losses`), and expert-choice routing as the alternative to the
token-choice steps. Semantics follow DeepSpeed's ``top1gating`` / ``top2gating`` /
``topkgating`` (deepspeed/moe/sharded_moe.py) exactly, except where DeepSpeed is wrong or
order-unstable; each such place has a comment starting with "DeepSpeed:" that says what it does
and why moelab differs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config, check_int, documented, option, resolve
from .losses import (
    aux_loss,
    global_balance_loss,
    sequence_balance_loss,
    z_loss,
    z_loss_of_logits,
)
from .routing import Routing, deferred, expert_capacity, rank_within_expert

JITTER_EPS = 1e-2  # DeepSpeed's multiplicative_jitter epsilon
SCORES = ("softmax", "sigmoid")
BALANCE_LOSSES = ("deepspeed", "sequence", "global")


@documented
@dataclass(frozen=True)
class RouterConfig(Config):
    """Every routing option, with DeepSpeed-MoE's behaviour as the default.

    Used by `route`, `Router`, `moelab.MoE` (inside `MoEConfig`) and `moelab.model.GPTConfig`
    (inside its ``moe``), and by RoutingView's controls: a new option added here reaches all of
    them. Options beyond the paper name the paper or system they come from.
    """

    k: int = option(1, "experts per token (top-k); k=1 and k=2 follow DeepSpeed's top1gating / "
                       "top2gating, k > 2 its topkgating", low=1, label="k (experts/token)")
    capacity_factor: float = option(
        1.0, "C = max(ceil(S/E · capacity_factor · k), min_capacity) slots per expert while "
             "training; S is the tokens routed together (under expert parallelism, this "
             "rank's: each rank computes its own C, as DeepSpeed does)", above=0,
        label="capacity factor")
    eval_capacity_factor: float | None = option(
        None, "the capacity factor in eval (DeepSpeed's pair); None = capacity_factor",
        kind="float", above=0)
    min_capacity: int = option(4, "the smallest capacity an expert gets (DeepSpeed's default 4)",
                               low=0, label="min capacity")
    drop_tokens: bool = option(
        True, "False = dropless (capacity None): every route is kept. Capacity is then never a "
              "number ranks must agree on (DeepSpeed all-reduces a max capacity, and ranks that "
              "disagree hang its all-to-all: DeepSpeed #6809)", label="drop tokens")
    use_rts: bool = option(
        True, "Random Token Selection (Kim et al. 2021, on by default in DeepSpeed): top-1 "
              "routes compete for capacity with a random priority instead of by position; "
              "training only", label="RTS: random token selection (top-1)")
    noisy_gate_policy: str | None = option(
        None, "None, 'Jitter' (multiplies the router input by U(1-ε, 1+ε): Router applies it, "
              "route(), which sees only logits, cannot) or 'RSample' (Gumbel noise on the top-1 "
              "choice, the gate value stays clean); training only",
        choices=(None, "Jitter", "RSample"), label="noise")
    second_expert_sampling: bool = option(
        True, "top-2 picks the second expert from logits + Gumbel noise (GShard); training only",
        label="sample the 2nd expert (top-2)")
    drop_policy: str = option(
        "position", "which routes keep their slot when an expert overflows: 'position' (earlier "
                    "tokens first; for top-2 every first choice before any second choice) or "
                    "'probs' (the highest router probabilities first)",
        choices=("position", "probs"), label="drop policy")
    choice: str = option(
        "token", "'token' (tokens choose experts) or 'expert': expert-choice routing (Zhou et "
                 "al. 2022): every expert takes its top-C tokens, so load is balanced by "
                 "construction and a token may be taken by any number of experts",
        choices=("token", "expert"), label="who chooses")
    bias_update_rate: float = option(
        0.0, "auxiliary-loss-free balancing (DeepSeek-V3, Liu et al. 2024, §2.1.2): > 0 keeps a "
             "per-expert selection bias, moved by rate · sign(mean load - load) after each "
             "training step's routing; it changes which experts are chosen, not the weights",
        low=0)
    use_selection_bias: bool = option(
        False, "choose experts with the Router's selection_bias even when bias_update_rate = 0: "
               "a fixed bias, never updated (DeepSeek-V3's e_score_correction_bias as loaded "
               "for inference or fine-tuning, `moelab.interop.from_hf`); bias_update_rate > 0 "
               "always uses the bias")
    renormalize: bool | None = option(
        None, "divide a token's kept weights by their sum; None = DeepSpeed's choice per k "
              "(top-1 no, top-k > 1 yes). Mixtral and gpt-oss take a softmax over the k chosen "
              "logits (softmax after top-k), which is the renormalised softmax: True. Qwen3 and "
              "DeepSeek-V3 renormalise (norm_topk_prob=True); OLMoE and Qwen1.5-MoE do not",
        kind="bool")
    score: str = option(
        "softmax", "how logits become expert scores: 'softmax' over the experts (DeepSpeed, "
                   "Mixtral, Qwen, OLMoE, gpt-oss) or 'sigmoid' per expert (DeepSeek-V3, Llama "
                   "4: the weights are the chosen sigmoids, renormalised as renormalize says)",
        choices=SCORES)
    routed_scaling_factor: float = option(
        1.0, "multiplies the routed experts' combine weights after any renormalisation "
             "(DeepSeek-V3: 2.5)", above=0)
    n_group: int = option(
        1, "group-limited (node-limited) top-k (DeepSeek-V2/V3): the experts form n_group "
           "equal groups (on DeepSeek's machines, nodes) and each token chooses only inside its "
           "topk_group best; 1 = no groups", low=1)
    topk_group: int = option(
        1, "with n_group > 1: the groups each token keeps, ranked by the sum of each group's "
           "top-2 scores (DeepSeek-V3)", low=1)
    balance_loss: str = option(
        "deepspeed", "the load-balancing loss Routing.aux_loss holds: 'deepspeed' (the batch's, "
                     "DeepSpeed's formula for each k), 'sequence' (DeepSeek-V3's sequence-wise "
                     "loss, averaged over the sequences) or 'global' (Qwen3's, Megatron's "
                     "global_aux_loss: the load counted over every data-parallel rank)",
        choices=BALANCE_LOSSES)
    router_bias: bool = option(False, "a bias in the gate's linear map (gpt-oss)")

    def __post_init__(self) -> None:
        if self.noisy_gate_policy == "None":  # DeepSpeed accepts the string "None" too
            object.__setattr__(self, "noisy_gate_policy", None)
        super().__post_init__()

    def validate(self) -> None:
        if self.noisy_gate_policy == "RSample" and self.k != 1:
            raise ValueError("noisy_gate_policy='RSample' applies to top-1 routing only (as in "
                             f"DeepSpeed); got k={self.k}. For k=2 use "
                             "second_expert_sampling=True.")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be at most n_group="
                             f"{self.n_group} (the groups a token may keep)")

    def capacity_factor_for(self, training: bool) -> float:
        """The capacity factor of a mode: capacity_factor while training, else the eval one."""
        if training or self.eval_capacity_factor is None:
            return self.capacity_factor
        return self.eval_capacity_factor

    def check_experts(self, num_experts: int) -> None:
        """The options that depend on E: k <= E; n_group | E; k <= topk_group · E / n_group."""
        if self.k > num_experts:
            raise ValueError(f"k must be an integer in [1, num_experts={num_experts}]; "
                             f"got {self.k!r}")
        if num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must divide num_experts={num_experts} "
                             "(equal groups)")
        reachable = self.topk_group * (num_experts // self.n_group)
        if self.k > reachable:
            raise ValueError(f"k={self.k} is more than the {reachable} experts of topk_group="
                             f"{self.topk_group} groups of {num_experts // self.n_group}: raise "
                             "topk_group or lower k")


# ------------------------------------------------------------------------------ checks

def check_logits(logits) -> None:
    """A 2-D floating-point [S, E] tensor with at least one expert, all finite. S may be 0 (an
    expert-parallel rank without tokens still takes part in the exchange)."""
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a 2-D tensor [tokens, experts]; got {shape}")
    if logits.shape[1] < 1:
        raise ValueError(f"logits must hold at least one expert; got shape "
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


def _gumbel(shape, *, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard Gumbel(0, 1) noise, -log(-log U)."""
    tiny = torch.finfo(like.dtype).tiny
    uniform = torch.rand(shape, dtype=like.dtype, device=like.device, generator=generator)
    return -torch.log((-torch.log(uniform.clamp(min=tiny))).clamp(min=tiny))


# ------------------------------------------------------------------------------- route

def route(logits: Tensor, config: RouterConfig | None = None, *, training: bool = True,
          generator: torch.Generator | None = None, selection_bias: Tensor | None = None,
          sequence_length: int | None = None,
          reduce_counts: Callable[[Tensor], Tensor] | None = None, **options) -> Routing:
    """Route S tokens over E experts from gate logits [S, E].

    config: a RouterConfig; ``options`` are RouterConfig fields by name, applied on top
        (``route(logits, k=2)``). The defaults are DeepSpeed-MoE's.
    training: noise, RTS and second-expert sampling happen only when True, and the capacity
        factor is ``capacity_factor`` (else ``eval_capacity_factor``).
    generator: a torch.Generator for every random draw, for reproducible routing.
    selection_bias: [E] added to the scores *for choosing experts only*; the combine weights
        stay the unbiased ones. This is DeepSeek-V3's auxiliary-loss-free load balancing (Liu et
        al. 2024, §2.1.2), whose bias the Router updates from the load. DeepSeek-V3 adds it to
        its sigmoid affinities (score="sigmoid" does the same); with the softmax score it is
        added to the logits, which orders each token's experts as the softmax does.
    sequence_length: tokens per sequence, for balance_loss="sequence" (None: all S are one).
    reduce_counts: [E] -> [E] summed over the data-parallel ranks, for balance_loss="global"
        (None: this process's batch is the global one). The Router passes its reduce_load.

    Returns the Routing: mapping table, router scores, counts, aux loss and z-loss.
    """
    config = resolve(RouterConfig, config, options)
    check_logits(logits)
    num_tokens, num_experts = logits.shape
    config.check_experts(num_experts)
    if selection_bias is not None and tuple(selection_bias.shape) != (num_experts,):
        raise ValueError(f"selection_bias must have shape [num_experts]=({num_experts},); "
                         f"got {tuple(selection_bias.shape)}")
    # DeepSpeed routes in float32 whatever the model dtype ("everything is in fp32"); moelab
    # routes in at least float32 (float64 stays float64, for gradcheck and references).
    logits = at_least_float32(logits)

    # scores: probs = softmax(x · W_g) over experts, or s = sigmoid(x · W_g) per expert  [S, E]
    if config.score == "softmax":
        probs = torch.softmax(logits, dim=-1)
        top = torch.argmax(probs, dim=-1)  # [S]: each token's most probable expert
        z = deferred(z_loss, logits, probs, top)
    else:
        probs = torch.sigmoid(logits)
        top = torch.argmax(logits, dim=-1)
        z = deferred(z_loss_of_logits, logits)
    capacity_factor = config.capacity_factor_for(training)
    if config.choice == "expert":
        return expert_choice(probs, z, config.k, capacity_factor, config.min_capacity)

    expert = choose_experts(logits, probs, top, config, training=training,
                            generator=generator, selection_bias=selection_bias)  # [S, k]
    if config.drop_tokens:
        capacity = expert_capacity(num_tokens, num_experts, capacity_factor, config.k,
                                   config.min_capacity)
    else:
        capacity = None
    slot, counts = assign_slots(expert, probs, capacity, config, training=training,
                                generator=generator)
    weight = combine_weights(probs, expert, slot, config.renormalize, dropless=capacity is None)
    if config.routed_scaling_factor != 1.0:
        weight = weight * config.routed_scaling_factor  # DeepSeek-V3: g · 2.5
    # the balancing loss, from the choices before any dropping
    aux = balance_loss(config, probs, expert, counts, sequence_length, reduce_counts)
    return Routing(expert=expert, weight=weight, slot=slot, capacity=capacity, probs=probs,
                   counts=counts, aux_loss=aux, z_loss=z)


def balance_loss(config: RouterConfig, probs: Tensor, expert: Tensor, counts: Tensor,
                 sequence_length: int | None, reduce_counts):
    """Routing.aux_loss for config.balance_loss (a function run on first read where allowed):
    the losses take the scores as a distribution over experts (sigmoid scores normalised)."""
    dist = probs if config.score == "softmax" else probs / probs.sum(-1, keepdim=True).clamp(
        min=torch.finfo(probs.dtype).tiny)
    if config.balance_loss == "sequence":
        return deferred(sequence_balance_loss, dist, expert, sequence_length)
    if config.balance_loss == "global":
        # a collective when reduce_counts is set: computed now on every rank, never deferred
        total = counts if reduce_counts is None else reduce_counts(counts)
        return global_balance_loss(dist, total)
    return deferred(aux_loss, dist, expert)  # DeepSpeed's formula for each k


def choose_experts(logits: Tensor, probs: Tensor, top: Tensor, config: RouterConfig, *,
                   training: bool, generator: torch.Generator | None = None,
                   selection_bias: Tensor | None = None) -> Tensor:
    """[S, E] logits -> [S, k] chosen experts (``probs`` [S, E]: the scores, ``top`` [S]: the
    argmax, both already computed)."""
    k = config.k
    # what ranks a token's experts: the logits for the softmax score (the same order as its
    # probabilities), the sigmoid scores themselves otherwise; + the aux-free bias
    scores = logits if config.score == "softmax" else probs
    scores = scores.detach() if scores.requires_grad else scores
    if selection_bias is not None:
        scores = scores + selection_bias.to(scores)
    if config.n_group > 1:
        scores = limit_to_groups(scores, config)
    plain = selection_bias is None and config.n_group == 1
    first = top if plain else torch.argmax(scores, dim=-1)  # [S]
    if k == 1:
        if config.noisy_gate_policy == "RSample" and training:
            # RSample: argmax(logits + Gumbel) picks the expert; the gate value stays clean.
            first = torch.argmax(scores + _gumbel(logits.shape, like=logits,
                                                  generator=generator), dim=-1)
        # DeepSpeed takes argmax(gates); argmax(logits) is the same choice.
        return first[:, None]
    if k == 2:
        # DeepSpeed: samples the second expert (logits + Gumbel) in eval too, so its eval loss
        # is random (DeepSpeed PR #8620). moelab samples only while training.
        if config.second_expert_sampling and training:
            scores = scores + _gumbel(logits.shape, like=logits, generator=generator)
        second = torch.argmax(scores.scatter(1, first[:, None], float("-inf")), dim=-1)
        return torch.stack([first, second], dim=1)
    return torch.topk(scores, k, dim=-1).indices


def limit_to_groups(scores: Tensor, config: RouterConfig) -> Tensor:
    """Group-limited routing (DeepSeek-V2/V3): -inf outside each token's topk_group best groups.

    The E experts form n_group equal groups; a group's score is the sum of its top-2 choice
    scores (DeepSeek-V3: its sigmoid affinities plus the aux-free bias; with the softmax score,
    the logits plus the bias); each token keeps its topk_group best groups and chooses its k
    experts inside them."""
    num_tokens, num_experts = scores.shape
    per_group = num_experts // config.n_group
    # group_score[s, g] = Σ of the top-min(2, E/G) choice scores of group g              [S, G]
    grouped = scores.view(num_tokens, config.n_group, per_group)
    group_score = grouped.topk(min(2, per_group), dim=-1).values.sum(-1)
    kept = torch.zeros_like(group_score, dtype=torch.bool)
    kept.scatter_(1, group_score.topk(config.topk_group, dim=-1).indices, True)  # [S, G]
    mask = kept[:, :, None].expand(-1, -1, per_group).reshape(num_tokens, num_experts)
    return scores.masked_fill(~mask, float("-inf"))


def assign_slots(expert: Tensor, probs: Tensor, capacity: int | None, config: RouterConfig, *,
                 training: bool, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor]:
    """Each route's slot in its expert's buffer ([S, k], -1 where dropped) and the routes each
    expert was asked for ([E], before dropping: DeepSpeed's exp_counts)."""
    num_tokens, k = expert.shape
    num_experts = probs.shape[1]
    # Route order: the order in which routes take slots. top-2 gives every first choice a slot
    # before any second choice (DeepSpeed: locations2 += sum(mask1)); top-1 and top-k>2 go by
    # token position (DeepSpeed's topkgating cumsums the k-hot mask over tokens).
    route_order = expert.t() if k == 2 else expert  # [k, S] choice-major, or [S, k]
    flat_expert = route_order.reshape(-1)  # [R] with R = S·k, in route order

    # Every branch ranks all R routes once; that pass also gives
    # counts_e = Σ_s mask[s, e], before dropping                                          [E]
    priority = None
    if capacity is not None and k == 1 and config.use_rts and training:
        # RTS: each routed token draws a random priority; per expert the top-C draws keep
        # their slot (DeepSpeed: topk(mask1 * U(0, 1), C, dim=0)).
        # DeepSpeed: applies RTS in eval too, so eval routing is random whenever an expert
        # overflows. moelab uses RTS only while training, keeping eval deterministic.
        priority = torch.rand(flat_expert.shape, device=expert.device, generator=generator)
    elif capacity is not None and config.drop_policy == "probs":
        # Per expert, the chosen routes with the highest router probability keep their slots.
        # DeepSpeed 0.19.8's topkgating ranks the same numbers (its top-k softmax gates
        # scattered into zeros, so an unchosen route never outranks a chosen one; checked
        # against its outputs). An earlier DeepSpeed (the 2025-02 snapshot) ranked raw logits.
        chosen_probs = probs.detach().gather(1, expert)  # [S, k]
        priority = (chosen_probs.t() if k == 2 else chosen_probs).reshape(-1)
    # "position" (priority None): the route order itself. DeepSpeed: top-1 without RTS keeps by
    # torch.topk order over a 0/1 mask, which is not guaranteed to be position order; moelab
    # keeps the earliest tokens, as the drop policy says.

    if priority is None:
        rank, counts = rank_within_expert(flat_expert, num_experts)
        # the first C routes of each expert in route order keep their rank as their slot
        flat_slot = rank if capacity is None else torch.where(rank < capacity, rank, -1)
        if k == 1:
            return flat_slot[:, None], counts[:num_experts]
    else:
        # Sort by descending priority (stable, so ties keep route order), then rank by expert.
        by_priority = torch.argsort(priority, descending=True, stable=True)
        rank = torch.empty_like(flat_expert)
        ranked, counts = rank_within_expert(flat_expert[by_priority], num_experts)
        rank[by_priority] = ranked
        # Slots: kept routes are numbered 0, 1, ... per expert in route order (DeepSpeed's
        # cumsum(mask) - 1 over the kept mask), so every buffer fills from its first row.
        kept = rank < capacity
        ranked_expert = torch.where(kept, flat_expert, num_experts)
        flat_slot = torch.where(kept, rank_within_expert(ranked_expert, num_experts)[0], -1)
    slot = flat_slot.view(k, num_tokens).t() if k == 2 else flat_slot.view(num_tokens, k)
    return slot, counts[:num_experts]  # the last group held no routes here


def combine_weights(probs: Tensor, expert: Tensor, slot: Tensor, renormalize: bool | None,
                    dropless: bool = False) -> Tensor:
    """[S, k] combine weights: each kept route's router probability, renormalised over the
    token's kept routes when ``renormalize`` (None: for k > 1, as DeepSpeed does). ``dropless``:
    every route is kept (no mask to apply)."""
    # g_j = probs[s, e_j] for kept routes, 0 for dropped ones                         [S, k]
    gate = probs.gather(1, expert)
    if not dropless:
        gate = gate * (slot >= 0)
    if not (expert.shape[1] > 1 if renormalize is None else renormalize):
        return gate  # top-1: the raw softmax probability (Switch / DeepSpeed)
    # top-k: w_j = g_j / max(Σ_j g_j, eps) (DeepSpeed)
    denom = gate.sum(dim=1, keepdim=True).clamp(min=torch.finfo(gate.dtype).eps)
    return gate / denom


def expert_choice(probs: Tensor, z: Tensor, k: int, capacity_factor: float,
                  min_capacity: int) -> Routing:
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
                   probs=probs, counts=counts, aux_loss=probs.new_zeros(()), z_loss=z,
                   expert_choice=True)


# ------------------------------------------------------------------------------ Router

def gate_logits(x: Tensor, weight: Tensor, jitter: bool = False,
                generator: torch.Generator | None = None, bias: Tensor | None = None) -> Tensor:
    """[S, d] · W_g[E, d]ᵀ (+ b [E]) -> [S, E] logits in at least float32 (fp16/bf16 route in
    fp32).

    jitter: Switch Transformer's / DeepSpeed's "Jitter", x · U(1 - ε, 1 + ε) with ε = 1e-2.
    """
    x = at_least_float32(x)
    if jitter:
        noise = torch.rand(x.shape, device=x.device, generator=generator)
        x = x * (1 - JITTER_EPS + 2 * JITTER_EPS * noise)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return F.linear(x, weight if weight.dtype == x.dtype else weight.to(x.dtype), bias)


def at_least_float32(t: Tensor) -> Tensor:
    """t in float32, or float64 if it is float64 (no op for either: a decode step is tens of
    small ops, and each costs microseconds)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def uses_selection_bias(config: RouterConfig) -> bool:
    """Whether a Router chooses experts with its selection_bias: the aux-free bias it updates
    (bias_update_rate > 0) or a fixed one (use_selection_bias)."""
    return config.bias_update_rate > 0 or config.use_selection_bias


#: A fused gate: ``gate(logits, config) -> Routing`` for an eval router that `fused_eligible`
#: accepts (the layer installs moelab.kernels' when its backend is "triton").
FusedGate = Callable[[Tensor, RouterConfig], Routing]


class Router(nn.Module):
    """The gate: a bias-free linear map d_model -> num_experts, then `route`.

    ``Router(d_model, num_experts, config)`` or with options by name (``Router(64, 8, k=2)``).
    ``config`` (a RouterConfig) may be replaced at any time, e.g. ``router.config =
    router.config.replace(drop_tokens=False)`` for serving. The capacity factor follows the
    mode (``capacity_factor`` while training, ``eval_capacity_factor`` in eval). The gate runs in
    float32 for half-precision inputs, as in DeepSpeed (float64 stays float64).

    With ``bias_update_rate > 0`` (DeepSeek-V3's auxiliary-loss-free balancing) the router keeps
    a per-expert ``selection_bias`` buffer and updates it after each training step's routing,
    from the load of the whole batch: ``reduce_load`` (set by `moelab.parallel.parallelize`)
    sums the counts over the data-parallel ranks that share this router first, so every rank
    (and a checkpoint) holds the one-process value. With ``use_selection_bias=True`` and rate 0
    it chooses experts with the buffer as it is and never updates it (a loaded DeepSeek-V3
    e_score_correction_bias).
    ``fused_gate``: set by an MoE layer whose backend is "triton" (the router itself never
    imports Triton); used in eval where `fused_eligible` says it gives route's answer.
    """

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, *,
                 generator: torch.Generator | None = None, **options) -> None:
        super().__init__()
        self.d_model = check_int("d_model", d_model)
        self.num_experts = check_int("num_experts", num_experts)
        self.config = resolve(RouterConfig, config, options)
        self.generator = generator
        self.fused_gate: FusedGate | None = None
        self.reduce_load: Callable[[Tensor], Tensor] | None = None  # [E] -> [E], summed
        # The gate weight W_g [E, d] (nn.Linear(d, E) layout and init); a bias with router_bias.
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = None
        if self.config.router_bias:
            bound = 1 / math.sqrt(d_model)
            self.bias = nn.Parameter(torch.empty(num_experts).uniform_(-bound, bound))
        self.register_buffer("selection_bias", torch.zeros(num_experts),
                             persistent=uses_selection_bias(self.config))

    @property
    def config(self) -> RouterConfig:
        return self._config

    @config.setter
    def config(self, config: RouterConfig) -> None:
        if not isinstance(config, RouterConfig):
            raise ValueError(f"config must be a RouterConfig; got {type(config).__name__}")
        config.check_experts(self.num_experts)
        self._config = config

    @property
    def k(self) -> int:
        return self.config.k

    def logits(self, x: Tensor) -> Tensor:
        """[S, d] -> [S, E] gate logits in at least float32 (Jitter noise while training)."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"router input's last dim must be d_model={self.d_model}; "
                             f"got shape {tuple(x.shape)}")
        jitter = self.config.noisy_gate_policy == "Jitter" and self.training
        return gate_logits(x, self.weight, jitter=jitter, generator=self.generator,
                           bias=self.bias)

    def fused_eligible(self, logits: Tensor) -> bool:
        """Whether a fused gate (``moelab.kernels.fused_route``) gives this router's answer:
        eval, k <= 2, position-ordered token choice, no selection bias, float32 logits that need
        no gradient. Everything else (training, RTS, noise, probs-ordered dropping, expert
        choice, k > 2) is ``route``'s."""
        config = self.config
        return (not self.training and config.k <= 2 and config.choice == "token"
                and config.drop_policy == "position" and not uses_selection_bias(config)
                and config.score == "softmax" and config.n_group == 1
                and config.routed_scaling_factor == 1.0 and config.balance_loss == "deepspeed"
                and logits.dtype == torch.float32
                and not (logits.requires_grad and torch.is_grad_enabled()))

    def forward(self, x: Tensor, sequence_length: int | None = None) -> Routing:
        """[S, d] -> Routing (``sequence_length``: tokens per sequence, for the sequence-wise
        balance loss)."""
        logits = self.logits(x)
        if self.fused_gate is not None and self.fused_eligible(logits):
            return self.fused_gate(logits, self.config)
        config = self.config  # (Jitter was applied to the input above; route ignores it)
        aux_free = config.bias_update_rate > 0
        biased = uses_selection_bias(config)
        routing = route(logits, config, training=self.training, generator=self.generator,
                        selection_bias=self.selection_bias if biased else None,
                        sequence_length=sequence_length, reduce_counts=self.reduce_load)
        if aux_free and self.training:
            counts = routing.counts if self.reduce_load is None else self.reduce_load(
                routing.counts)
            self.update_selection_bias(counts)
        return routing

    @torch.no_grad()
    def update_selection_bias(self, counts: Tensor) -> None:
        """DeepSeek-V3: b_e += γ · sign(mean load - load_e)."""
        counts = counts.float()
        self.selection_bias += self.config.bias_update_rate * torch.sign(counts.mean() - counts)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}"
