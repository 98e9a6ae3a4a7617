"""Do the experts specialise? Measures of a run's routings, as plain data.

What users of Megatron-LM, torchtitan and NeMo ask their trackers for, computed from moelab
Routings (one per MoE layer of a forward pass) or from a Trainer's per-step ``counts``:

- **dead experts**: the fraction of a layer's experts that got no route at all;
- **load percentiles**: the distribution of per-expert load in multiples of the balanced load
  (1.0 = every expert gets S·k / E routes; 0 = dead; 3.0 = three times its share);
- **co-activation** C [E, E]: C[i, j] = the fraction of tokens served by both expert i and
  expert j (the diagonal: the fraction served by i); with top-1 routing it is diagonal;
- **domain selectivity**: on a corpus whose tokens carry domain labels
  (`moelab.data.multidomain_corpus`), ``domain_share`` [D, E] (where each domain's routes go) and
  ``selectivity`` = I(domain; expert) / H(domain) over the routes: 0 when every expert sees the
  domains in the corpus's proportions, 1 when the expert a route goes to tells its domain.

"Serves" means a kept route (dropped routes served nobody), for token-choice and expert-choice
routing alike. Everything returned is Python floats and lists, ready for a view or a table.
`SpecialisationProbe` measures a fixed labelled batch every few steps of a Trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .config import check_int
from .routing import Routing

PERCENTILES = (0, 5, 25, 50, 75, 95, 100)


def served(routing: Routing) -> Tensor:
    """[S, E] bool: token s is served by expert e (a kept route from s to e)."""
    mask = torch.zeros(routing.num_tokens, routing.num_experts, dtype=torch.bool,
                       device=routing.expert.device)
    tokens = torch.arange(routing.num_tokens, device=mask.device)[:, None].expand_as(
        routing.expert)  # [S, k]
    kept = routing.kept  # [S, k]
    mask[tokens[kept], routing.expert[kept]] = True
    return mask


def dead_fraction(counts) -> float:
    """The fraction of experts with no route, from one layer's per-expert counts [E]."""
    counts = torch.as_tensor(counts)
    return float((counts == 0).double().mean())


def dead_by_step(history: list[dict]) -> list[list[float]]:
    """[L][N]: each MoE layer's dead-expert fraction at every step of a Trainer history (from the
    records' ``counts``: the routes asked of each expert in that step's batch)."""
    if not history:
        return []
    return [[dead_fraction(record["counts"][layer]) for record in history]
            for layer in range(len(history[0]["counts"]))]


def load_percentiles(counts, percentiles=PERCENTILES) -> dict[int, float]:
    """Percentiles of per-expert load as multiples of the balanced load: counts / mean(counts)
    (all 0 when the layer saw no route)."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    mean = counts.mean()
    relative = counts / mean if mean > 0 else torch.zeros_like(counts)
    values = torch.quantile(relative, torch.tensor(percentiles, dtype=torch.float64) / 100)
    return {p: float(v) for p, v in zip(percentiles, values, strict=True)}


def coactivation(routing: Routing) -> list[list[float]]:
    """C [E, E]: C[i, j] = fraction of tokens that experts i and j both serve."""
    mask = served(routing).double()  # [S, E]
    # C = Mᵀ M / S                                                                       [E, E]
    return (mask.T @ mask / max(routing.num_tokens, 1)).tolist()


def domain_counts(routing: Routing, domains: Tensor, num_domains: int) -> Tensor:
    """J [D, E]: kept routes from tokens of domain d to expert e (float64)."""
    if domains.numel() != routing.num_tokens:
        raise ValueError(f"domains has {domains.numel()} labels for {routing.num_tokens} tokens; "
                         "give one label per token (Corpus.batch_with_domains)")
    labels = domains.reshape(-1).to(routing.expert.device)
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < num_domains:
        raise ValueError(f"domain labels must lie in [0, {num_domains}); got "
                         f"{int(labels.min())}..{int(labels.max())}")
    one_hot = torch.nn.functional.one_hot(labels, num_domains).double()  # [S, D]
    # J = onehot(domain)ᵀ · M                                                            [D, E]
    return one_hot.T @ served(routing).double()


def selectivity(joint: Tensor) -> float:
    """I(domain; expert) / H(domain) from route counts J [D, E]: 0 when experts ignore the
    domain, 1 when each expert serves one domain only (0 with fewer than two domains)."""
    joint = joint.double()
    p = joint / joint.sum().clamp_min(1e-300)  # P(d, e)
    p_domain, p_expert = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    # I = Σ P(d, e) · log(P(d, e) / (P(d) · P(e)))
    ratio = torch.where(p > 0, p / (p_domain * p_expert).clamp_min(1e-300), 1.0)
    information = float((p * ratio.log()).sum())
    # H(D) = -Σ P(d) · log P(d)
    entropy = float(-(p_domain * torch.where(p_domain > 0, p_domain.log(), 0.0)).sum())
    return information / entropy if entropy > 1e-12 else 0.0


def measure(routings: list[Routing | None], domains: Tensor | None = None,
            domain_names: tuple[str, ...] = ()) -> list[dict]:
    """One dict per MoE layer of a forward pass (dense layers' ``None`` skipped): ``dead``,
    ``percentiles``, ``coactivation`` and, with per-token ``domains`` labels [B, T] and their
    names, ``domain_share`` [D, E] (each row sums to 1) and ``selectivity``."""
    layers = []
    for routing in (r for r in routings if r is not None):
        counts = routing.load  # kept routes per expert
        row = {"experts": routing.num_experts, "dead": dead_fraction(counts),
               "percentiles": load_percentiles(counts), "coactivation": coactivation(routing)}
        if domains is not None:
            if not domain_names:
                raise ValueError("domains given without domain_names; pass the corpus's "
                                 "domain_names")
            joint = domain_counts(routing, domains, len(domain_names))
            row["domain_share"] = (joint / joint.sum(1, keepdim=True).clamp_min(1)).tolist()
            row["selectivity"] = selectivity(joint)
        layers.append(row)
    return layers


@torch.no_grad()
def probe(model, corpus, batch_size: int = 8, seed: int = 0) -> list[dict]:
    """`measure` on one fixed labelled batch of ``corpus`` run through ``model`` in eval mode
    (the same batch for the same seed, so probes at different steps compare)."""
    generator = torch.Generator().manual_seed(seed)
    x, _, domains = corpus.batch_with_domains(batch_size, model.config.block_size, generator)
    was_training = model.training
    model.eval()
    try:
        routings = model(x).routings
    finally:
        model.train(was_training)
    return measure(routings, domains, corpus.domain_names)


@dataclass
class SpecialisationProbe:
    """Measures a Trainer's model on a fixed labelled batch every ``every`` steps (and at step
    0 when attached): ``probe.history`` is a list of ``{"step", "layers": measure(...)}``.

    ``SpecialisationProbe(corpus, every=10).attach(trainer)``; views subscribe to it.
    """

    corpus: object  # a moelab.data.Corpus with domain labels
    every: int = 10
    batch_size: int = 8
    seed: int = 0
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_int("every", self.every)
        check_int("batch_size", self.batch_size)
        if getattr(self.corpus, "domains", None) is None:
            raise ValueError("SpecialisationProbe needs a corpus with domain labels: "
                             "moelab.data.multidomain_corpus()")
        self.model = None
        self._subscribers, self._end_callbacks = [], []

    @property
    def domain_names(self) -> tuple[str, ...]:
        return tuple(self.corpus.domain_names)

    def attach(self, trainer) -> SpecialisationProbe:
        """Measure ``trainer``'s model now (unless already measured) and every ``every`` steps."""
        self.model = trainer.model
        trainer.subscribe(self.on_step, on_end=self._on_end)
        if not self.history:
            self.record(trainer.step_count)
        return self

    def subscribe(self, fn, on_end=None) -> None:
        """Call ``fn(entry)`` after every measurement and ``on_end()`` when training returns."""
        self._subscribers.append(fn)
        if on_end is not None:
            self._end_callbacks.append(on_end)

    def _on_end(self) -> None:
        for on_end in self._end_callbacks:
            on_end()

    def on_step(self, record: dict) -> None:
        if record["step"] % self.every == 0:
            self.record(record["step"])

    def record(self, step: int) -> dict:
        entry = {"step": step, "layers": probe(self.model, self.corpus, self.batch_size,
                                               self.seed)}
        self.history.append(entry)
        for fn in self._subscribers:
            fn(entry)
        return entry
