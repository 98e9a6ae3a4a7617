"""The balancing losses: l_aux by hand for each k, its minimum and gradient; the z-loss."""

from __future__ import annotations

import math

import pytest
import torch
from reference import random_logits

from moelab import route


def test_aux_loss_hand_computed():
    # top-1, E=2: every token to expert 0 with probs (0.9, 0.1): me = (0.9, 0.1), ce = (1, 0)
    logit = math.log(9.0)
    skewed = torch.tensor([[logit, 0.0]] * 4)
    assert route(skewed, k=1).aux_loss.item() == pytest.approx(2 * 0.9, rel=1e-6)
    # balanced: two tokens each way with mirrored probs: me = ce = (0.5, 0.5) -> l_aux = 1
    balanced = torch.tensor([[logit, 0.0], [logit, 0.0], [0.0, logit], [0.0, logit]])
    assert route(balanced, k=1).aux_loss.item() == pytest.approx(1.0, rel=1e-6)
    # top-2 uses the first choice only: E² · mean(me · ce) = 4 · mean((0.9, 0.1) · (1, 0))
    assert route(skewed, k=2, training=False).aux_loss.item() == pytest.approx(1.8, rel=1e-6)
    # top-3 over E=4: ce counts all k choices, l_aux = E²/k · mean(me · ce)
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 2))
    me = torch.tensor([0.4, 0.3, 0.2, 0.1])
    ce = torch.tensor([1.0, 1.0, 1.0, 0.0])
    expected = (me * ce).mean() * 16 / 3
    assert route(logits, k=3).aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_aux_loss_is_minimal_when_balanced():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(64, 8, generator=generator) * 0.01
    uniform_choice = base.clone()
    uniform_choice[torch.arange(64), torch.arange(64) % 8] += 1.0  # 8 tokens per expert
    skew = base.clone()
    skew[:, 0] += 1.0
    balanced_loss = route(uniform_choice, k=1).aux_loss.item()
    assert balanced_loss == pytest.approx(1.0, abs=1e-3)
    assert route(skew, k=1).aux_loss.item() > 1.5 * balanced_loss


def test_aux_loss_gradient_flows_to_logits_only_through_probs():
    logits = random_logits(0, 16, 4).requires_grad_()
    routing = route(logits, k=2, training=False)
    routing.aux_loss.backward()
    probs = torch.softmax(logits.detach(), -1).requires_grad_()
    ce = torch.bincount(routing.expert[:, 0], minlength=4).float() / 16
    (probs.mean(0) * ce).mean().mul(16).backward()
    expected = torch.autograd.grad(torch.softmax(logits, -1), logits, probs.grad)[0]
    torch.testing.assert_close(logits.grad, expected)


def test_z_loss_formula():
    logits = random_logits(3, 10, 5)
    expected = (torch.logsumexp(logits.double(), -1) ** 2).mean()
    assert route(logits).z_loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("scale", [1.0, 30.0, 1000.0])
def test_z_loss_and_its_gradient_equal_logsumexp(scale):
    # route() takes logsumexp as l_top - log p_top from the softmax it already has; with large
    # logit gaps the other probabilities underflow to 0, the top one never does.
    logits = (random_logits(4, 12, 6) * scale).double().requires_grad_()
    reference = logits.detach().clone().requires_grad_()
    z_loss = route(logits, k=2, training=False).z_loss
    expected = torch.logsumexp(reference, -1).square().mean()
    torch.testing.assert_close(z_loss, expected)
    torch.testing.assert_close(torch.autograd.grad(z_loss, logits)[0],
                               torch.autograd.grad(expected, reference)[0])


def test_sequence_wise_balance_loss_by_hand_and_at_balance():
    """DeepSeek-V3's L = Σ_i f_i P_i per sequence, f_i = E/(kT) · (times i was chosen), P_i the
    mean normalised score, averaged over the sequences."""
    from moelab.losses import sequence_balance_loss

    dist = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]])
    expert = torch.tensor([[0], [0], [1], [0]])
    # one sequence of 4: f = 2/4 · (3, 1) = (1.5, 0.5); P = (0.5, 0.5) -> 1.0
    assert float(sequence_balance_loss(dist, expert, None)) == pytest.approx(1.0)
    # two sequences of 2: seq 1: f = (2, 0), P = (0.65, 0.35) -> 1.3; seq 2: f = (1, 1),
    # P = (0.35, 0.65) -> 1.0; mean 1.15
    assert float(sequence_balance_loss(dist, expert, 2)) == pytest.approx(1.15)
    with pytest.raises(ValueError, match="sequence_length=3 must divide the 4 tokens"):
        sequence_balance_loss(dist, expert, 3)


def test_route_takes_the_balance_loss_it_is_configured_with():
    logits = random_logits(5, 12, 4)
    probs = torch.softmax(logits, -1)
    sequence = route(logits, k=2, balance_loss="sequence", sequence_length=6, training=False)
    chosen = torch.zeros(12, 4).scatter_(1, sequence.expert, 1.0).view(2, 6, 4)
    expected = ((chosen.sum(1) * 4 / (2 * 6)) * probs.view(2, 6, 4).mean(1)).sum(1).mean()
    torch.testing.assert_close(sequence.aux_loss, expected)
    # global: the counts of every data-parallel rank (here: this batch's, doubled by a fake
    # reduction, which leaves the fractions alone) against this rank's mean scores
    doubled = route(logits, k=2, balance_loss="global", training=False,
                    reduce_counts=lambda counts: 2 * counts)
    f = doubled.counts.float() / doubled.counts.sum()
    torch.testing.assert_close(doubled.aux_loss, 4 * (f * probs.mean(0)).sum())
    other_rank = torch.tensor([0, 0, 0, 24])  # another rank sent every route to expert 3
    shifted = route(logits, k=2, balance_loss="global", training=False,
                    reduce_counts=lambda counts: counts + other_rank)
    assert float(shifted.aux_loss) != pytest.approx(float(doubled.aux_loss))


def test_sigmoid_scores_balance_on_their_normalised_form():
    logits = random_logits(6, 10, 4)
    routing = route(logits, k=1, score="sigmoid", training=False)
    scores = torch.sigmoid(logits)
    dist = scores / scores.sum(-1, keepdim=True)
    ce = torch.bincount(routing.expert[:, 0], minlength=4).float() / 10
    torch.testing.assert_close(routing.aux_loss, 4 * (dist.mean(0) * ce).sum())
    # its z-loss is logsumexp's, from the logits
    torch.testing.assert_close(routing.z_loss, torch.logsumexp(logits, -1).square().mean())
