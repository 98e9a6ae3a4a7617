"""Specialisation measures against per-token loops and the mutual-information formula."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab import GPT, preset
from moelab.data import multidomain_corpus
from moelab.routing import Routing
from moelab.specialisation import (
                                   SpecialisationProbe,
                                   coactivation,
                                   dead_by_step,
                                   dead_fraction,
                                   domain_counts,
                                   load_percentiles,
                                   measure,
                                   selectivity,
                                   served,
)
from moelab.train import TrainConfig, Trainer


def _routing(expert, slot, num_experts) -> Routing:
    expert, slot = torch.tensor(expert), torch.tensor(slot)
    counts = torch.bincount(expert.reshape(-1), minlength=num_experts)
    num_tokens = expert.shape[0]
    return Routing(expert=expert, weight=torch.ones(expert.shape), slot=slot, capacity=4,
                   probs=torch.full((num_tokens, num_experts), 1 / num_experts), counts=counts,
                   aux_loss=torch.tensor(0.0), z_loss=torch.tensor(0.0))


@st.composite
def routings(draw):
    num_experts = draw(st.integers(2, 6))
    num_tokens = draw(st.integers(1, 12))
    k = draw(st.integers(1, num_experts))
    expert = [draw(st.permutations(range(num_experts)))[:k] for _ in range(num_tokens)]
    slot = [[draw(st.sampled_from([-1, 0, 1])) for _ in range(k)] for _ in range(num_tokens)]
    domains = [draw(st.integers(0, 2)) for _ in range(num_tokens)]
    return _routing(expert, slot, num_experts), torch.tensor(domains)


@settings(max_examples=60, deadline=None)
@given(routings())
def test_coactivation_and_domain_counts_follow_a_token_loop(case):
    routing, domains = case
    E = routing.num_experts
    both = [[0.0] * E for _ in range(E)]
    joint = torch.zeros(3, E, dtype=torch.float64)
    for s in range(routing.num_tokens):
        mine = {int(e) for e, slot in zip(routing.expert[s], routing.slot[s], strict=True)
                if slot >= 0}
        for i in mine:
            joint[domains[s], i] += 1
            for j in mine:
                both[i][j] += 1 / routing.num_tokens
    got = coactivation(routing)
    for i in range(E):
        for j in range(E):
            assert math.isclose(got[i][j], both[i][j], abs_tol=1e-12)
            assert got[i][j] == got[j][i]
    assert torch.equal(domain_counts(routing, domains, 3), joint)


def test_top1_coactivation_is_diagonal_and_sums_to_the_kept_fraction():
    routing = _routing([[0], [1], [1], [2]], [[0], [0], [-1], [0]], 3)
    c = torch.tensor(coactivation(routing))
    assert torch.equal(c, torch.diag(torch.diag(c)))
    assert math.isclose(float(c.trace()), 3 / 4)
    assert served(routing).sum() == 3


def test_dead_fraction_and_percentiles():
    assert dead_fraction([0, 3, 0, 5]) == 0.5
    p = load_percentiles([2, 2, 2, 2])
    assert all(v == 1.0 for v in p.values())
    p = load_percentiles([0, 0, 0, 8])  # mean 2: loads 0, 0, 0, 4 × balanced
    assert (p[0], p[50], p[100]) == (0.0, 0.0, 4.0)
    assert all(v == 0.0 for v in load_percentiles([0, 0]).values())
    history = [{"counts": [[0, 1], [1, 1]]}, {"counts": [[2, 2], [0, 0]]}]
    assert dead_by_step(history) == [[0.5, 0.0], [0.0, 1.0]]


def _entropy(p):
    return -sum(x * math.log(x) for x in p if x > 0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), min_size=3, max_size=3), min_size=2, max_size=4))
def test_selectivity_is_mutual_information_over_domain_entropy(rows):
    """I(D; E) = H(D) + H(E) - H(D, E), computed from the entropies in float64."""
    joint = torch.tensor(rows, dtype=torch.float64)
    total = float(joint.sum())
    if total == 0:
        assert selectivity(joint) == 0.0
        return
    p = (joint / total).tolist()
    h_d = _entropy([sum(r) for r in p])
    h_e = _entropy([sum(r[j] for r in p) for j in range(3)])
    h_de = _entropy([x for r in p for x in r])
    expected = (h_d + h_e - h_de) / h_d if h_d > 1e-12 else 0.0
    got = selectivity(joint)
    assert math.isclose(got, expected, abs_tol=1e-9)
    assert -1e-12 <= got <= 1 + 1e-12


def test_selectivity_bounds():
    assert selectivity(torch.tensor([[5.0, 0.0], [0.0, 3.0]])) == pytest.approx(1.0)
    assert abs(selectivity(torch.tensor([[2.0, 4.0], [1.0, 2.0]]))) < 1e-12  # independent


def test_bad_domain_labels_say_what_is_wrong():
    routing = _routing([[0], [1]], [[0], [0]], 2)
    with pytest.raises(ValueError, match="one label per token"):
        domain_counts(routing, torch.tensor([0, 1, 1]), 2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        domain_counts(routing, torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="domain_names"):
        measure([routing], torch.tensor([0, 1]))


def test_probe_measures_a_fixed_batch_while_a_trainer_runs():
    corpus = multidomain_corpus(20_000, seed=0)
    model = GPT(preset("tiny", experts=4, k=2, drop_tokens=False))
    trainer = Trainer(model, corpus, config=TrainConfig(steps=4, batch_size=4, progress=False))
    probe = SpecialisationProbe(corpus, every=2, batch_size=2).attach(trainer)
    seen = []
    probe.subscribe(seen.append)
    trainer.train()
    assert [entry["step"] for entry in probe.history] == [0, 2, 4]
    assert seen == probe.history[1:]
    for entry in probe.history:
        assert len(entry["layers"]) == len(model.config.moe_layers)
        for layer in entry["layers"]:
            share = torch.tensor(layer["domain_share"])
            assert share.shape == (len(corpus.domain_names), 4)
            torch.testing.assert_close(share.sum(1), torch.ones(len(corpus.domain_names)))
            assert 0 <= layer["selectivity"] <= 1 and 0 <= layer["dead"] <= 1
            assert math.isclose(sum(torch.tensor(layer["coactivation"]).diag().tolist()), 2.0)
    with pytest.raises(ValueError, match="domain labels"):
        SpecialisationProbe(corpus.__class__(corpus.tokens), every=2)
