"""route() and Router against per-token references, formulas and invariants."""

from __future__ import annotations

import dataclasses
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_route

from moelab import Router, expert_capacity, route
from moelab import routing as routing_module


def random_logits(seed: int, num_tokens: int, num_experts: int, scale: float = 2.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, num_experts, generator=generator) * scale


routing_cases = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "num_tokens": st.integers(1, 40),
    "num_experts": st.integers(1, 8),
    "k": st.integers(1, 4),
    "capacity_factor": st.sampled_from([0.25, 0.5, 1.0, 1.25, 2.0]),
    "min_capacity": st.integers(0, 5),
    "drop_tokens": st.booleans(),
    "drop_policy": st.sampled_from(["position", "probs"]),
})


def route_case(case):
    k = min(case["k"], case["num_experts"])
    logits = random_logits(case["seed"], case["num_tokens"], case["num_experts"])
    options = dict(k=k, capacity_factor=case["capacity_factor"],
                   min_capacity=case["min_capacity"], drop_tokens=case["drop_tokens"],
                   drop_policy=case["drop_policy"])
    return logits, options, route(logits, training=False, **options)


@settings(max_examples=150, deadline=None)
@given(routing_cases)
def test_route_equals_per_token_reference(case):
    logits, options, routing = route_case(case)
    expert, slot, weight, capacity, counts = reference_route(logits, **options)
    assert routing.capacity == capacity
    assert routing.expert.tolist() == expert
    assert routing.slot.tolist() == slot
    assert routing.counts.tolist() == counts
    torch.testing.assert_close(routing.weight, torch.tensor(weight), rtol=1e-6, atol=1e-7)


@settings(max_examples=150, deadline=None)
@given(routing_cases, st.booleans())
def test_route_invariants(case, training):
    k = min(case["k"], case["num_experts"])
    logits = random_logits(case["seed"], case["num_tokens"], case["num_experts"])
    generator = torch.Generator().manual_seed(case["seed"])
    routing = route(logits, k=k, capacity_factor=case["capacity_factor"],
                    min_capacity=case["min_capacity"], drop_tokens=case["drop_tokens"],
                    drop_policy=case["drop_policy"], training=training, generator=generator)
    num_tokens, num_experts = logits.shape
    kept = routing.kept
    # every token asks for k distinct experts; counts add up to S·k
    assert int(routing.counts.sum()) == num_tokens * k
    assert all(len(set(row)) == k for row in routing.expert.tolist())
    # kept slots fit the capacity, and no two kept routes share (expert, slot)
    if routing.capacity is not None:
        assert int(routing.slot.max()) < routing.capacity
        assert torch.all(routing.load <= routing.capacity)
    else:
        assert bool(kept.all())
    pairs = list(zip(routing.expert[kept].tolist(), routing.slot[kept].tolist(), strict=True))
    assert len(pairs) == len(set(pairs))
    # each expert's buffer fills from row 0 without gaps
    for e in range(num_experts):
        slots = sorted(s for ex, s in pairs if ex == e)
        assert slots == list(range(len(slots)))
    # an expert keeps min(asked, C) routes: dropping only happens when it overflows
    if routing.capacity is not None:
        expected_load = torch.clamp(routing.counts, max=routing.capacity)
        assert routing.load.tolist() == expected_load.tolist()
    # dropped routes carry no weight; renormalised weights of a kept token sum to 1
    assert bool((routing.weight[~kept] == 0).all())
    if k > 1:
        any_kept = kept.any(dim=1)
        sums = routing.weight.sum(dim=1)[any_kept]
        torch.testing.assert_close(sums, torch.ones_like(sums))
    else:
        chosen = routing.probs.gather(1, routing.expert)
        torch.testing.assert_close(routing.weight[kept], chosen[kept])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=60), st.booleans())
def test_rank_within_expert_both_ways_equal_a_running_count(experts, one_hot):
    # the one-hot prefix count (small R·E) and the stable sort (large) against a Python loop;
    # id num_experts (= 5 here) is the ignored group that routes without a slot go to
    expert = torch.tensor(experts)
    seen = [0] * 6
    expected_rank = []
    for e in experts:
        expected_rank.append(seen[e])
        seen[e] += 1
    with mock.patch.object(routing_module, "ONE_HOT_RANK_MAX_CELLS", 10**9 if one_hot else 0):
        rank, counts = routing_module._rank_within_expert(expert, 5)
    assert rank.tolist() == expected_rank
    assert counts.tolist() == seen


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("drop_policy", ["position", "probs"])
def test_route_by_sort_equals_reference(k, drop_policy):
    # the hypothesis cases are small enough to rank by one-hot counts; this is the sort path
    logits = random_logits(k, 37, 6)
    options = dict(k=k, capacity_factor=1.0, min_capacity=2, drop_tokens=True,
                   drop_policy=drop_policy)
    with mock.patch.object(routing_module, "ONE_HOT_RANK_MAX_CELLS", 0):
        routing = route(logits, training=False, **options)
    expert, slot, weight, capacity, counts = reference_route(logits, **options)
    assert (routing.expert.tolist(), routing.slot.tolist()) == (expert, slot)
    assert routing.counts.tolist() == counts
    torch.testing.assert_close(routing.weight, torch.tensor(weight), rtol=1e-6, atol=1e-7)


def test_capacity_formula_and_float32_rounding():
    assert expert_capacity(64, 8, 1.0) == 8
    assert expert_capacity(64, 8, 1.0, k=2) == 16
    assert expert_capacity(10, 8, 1.0, min_capacity=4) == 4
    assert expert_capacity(100, 8, 1.25) == 16  # ceil(15.625)
    # DeepSpeed computes ceil((S/E) * cf) on float32 tensors; find cases where float64 and
    # float32 disagree and check moelab follows float32.
    disagreements = 0
    for num_tokens in range(1, 200):
        for num_experts in (3, 6, 7, 12):
            for cf in (0.1, 0.3, 0.7, 1.1, 1.2, 1.3):
                ds = torch.ceil(torch.tensor(num_tokens / num_experts)
                                * torch.tensor(cf)).to(torch.int64).item()
                ours = expert_capacity(num_tokens, num_experts, cf, min_capacity=0)
                assert ours == ds, (num_tokens, num_experts, cf)
                disagreements += ds != math.ceil(num_tokens / num_experts * cf)
    assert disagreements > 0  # the float32 rounding really matters somewhere


def test_top1_without_rts_keeps_earliest_tokens():
    # 10 tokens all want expert 0; capacity 4: tokens 0..3 keep, in slots 0..3.
    logits = torch.zeros(10, 3)
    logits[:, 0] = 5.0
    routing = route(logits, k=1, min_capacity=4, use_rts=False)
    assert routing.capacity == 4
    assert routing.slot[:, 0].tolist() == [0, 1, 2, 3] + [-1] * 6
    assert routing.counts.tolist() == [10, 0, 0]


def test_top2_first_choices_take_slots_before_second_choices():
    # Token 0's second choice and token 1's first choice both want expert 1 (capacity 1).
    # Position order alone would give the slot to token 0; DeepSpeed's top-2 gives it to the
    # first choice, token 1.
    logits = torch.tensor([[3.0, 2.0, 0.0], [0.0, 3.0, 2.0]])
    routing = route(logits, k=2, capacity_factor=0.5, min_capacity=1, training=False)
    assert routing.capacity == 1
    assert routing.expert.tolist() == [[0, 1], [1, 2]]
    assert routing.slot.tolist() == [[0, -1], [0, 0]]
    # token 0 lost its second route: its first weight renormalises to 1
    assert routing.weight[0].tolist() == [1.0, 0.0]


def test_topk_above_two_queues_by_token_position():
    # DeepSpeed's topkgating cumsums the k-hot mask over tokens: token 0's third choice beats
    # token 1's first choice for the same expert.
    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0], [-5.0, -5.0, 3.0, 0.0]])
    routing = route(logits, k=3, capacity_factor=1 / 6, min_capacity=1, training=False)
    assert routing.capacity == 1
    assert routing.expert[1, 0].item() == 2 and routing.expert[0, 2].item() == 2
    assert routing.slot[0, 2].item() == 0 and routing.slot[1, 0].item() == -1


def test_probs_drop_policy_keeps_most_confident_tokens():
    logits = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [4.0, 0.0]])
    routing = route(logits, k=1, min_capacity=2, capacity_factor=0.5, drop_policy="probs",
                    use_rts=False)
    # tokens 3 and 1 are the most confident; their slots follow token order (1 then 3)
    assert routing.slot[:, 0].tolist() == [-1, 0, -1, 1]


def test_rts_random_priority_in_training_only():
    logits = torch.zeros(12, 2)
    logits[:, 0] = 4.0
    kept_sets = set()
    for seed in range(20):
        routing = route(logits, k=1, capacity_factor=0.25, min_capacity=3,
                        generator=torch.Generator().manual_seed(seed))
        kept = tuple(routing.kept[:, 0].nonzero().flatten().tolist())
        assert len(kept) == 3
        # slots follow token order among the kept tokens (DeepSpeed's cumsum after dropping)
        assert routing.slot[list(kept), 0].tolist() == [0, 1, 2]
        kept_sets.add(kept)
    assert len(kept_sets) > 10  # random, not position
    # eval: deterministic and position-ordered (DeepSpeed also randomises eval; moelab does not)
    for _ in range(3):
        routing = route(logits, k=1, capacity_factor=0.25, min_capacity=3, training=False)
        assert routing.kept[:, 0].nonzero().flatten().tolist() == [0, 1, 2]


def test_rts_keeps_each_overflowing_token_with_equal_probability():
    logits = torch.zeros(8, 2)
    logits[:, 0] = 4.0
    generator = torch.Generator().manual_seed(0)
    kept = torch.zeros(8)
    trials = 2000
    for _ in range(trials):
        kept += route(logits, k=1, capacity_factor=0.25, min_capacity=2,
                      generator=generator).kept[:, 0].float()
    # each of the 8 tokens keeps a slot with probability C / count = 2 / 8
    torch.testing.assert_close(kept / trials, torch.full((8,), 0.25), atol=0.04, rtol=0)


def test_second_expert_sampling_follows_gumbel_max_in_training_only():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    generator = torch.Generator().manual_seed(0)
    trials = 4000
    seconds = torch.zeros(4)
    for _ in range(trials):
        routing = route(logits.expand(1, -1), k=2, generator=generator)
        assert routing.expert[0, 0].item() == 0
        seconds[routing.expert[0, 1]] += 1
    # Gumbel-max: P(second = e) = softmax(logits without the first choice)_e
    expected = torch.softmax(logits[0, 1:], dim=0)
    torch.testing.assert_close(seconds[1:] / trials, expected, atol=0.03, rtol=0)
    # eval: no sampling, the second-best expert every time
    for _ in range(5):
        assert route(logits, k=2, training=False).expert.tolist() == [[0, 1]]


def test_rsample_samples_choice_but_keeps_clean_gate():
    logits = torch.tensor([[1.0, 0.5, 0.0]])
    generator = torch.Generator().manual_seed(1)
    trials = 4000
    chosen = torch.zeros(3)
    for _ in range(trials):
        routing = route(logits, k=1, noisy_gate_policy="RSample", generator=generator,
                        drop_tokens=False)
        e = routing.expert[0, 0]
        chosen[e] += 1
        assert routing.weight[0, 0].item() == pytest.approx(routing.probs[0, e].item())
    torch.testing.assert_close(chosen / trials, torch.softmax(logits[0], 0), atol=0.03, rtol=0)
    assert route(logits, k=1, noisy_gate_policy="RSample", training=False).expert.item() == 0


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


def test_dropless_routes_every_token():
    logits = random_logits(1, 50, 4)
    logits[:, 2] += 5  # expert 2 is wanted by (nearly) everyone
    routing = route(logits, k=2, drop_tokens=False)
    assert routing.capacity is None
    assert bool(routing.kept.all())
    assert routing.load.tolist() == routing.counts.tolist()
    assert routing.drop_fraction == 0.0


def test_expert_choice_routing_matches_reference():
    logits = random_logits(2, 12, 3)
    routing = route(logits, k=1, choice="expert")
    probs = torch.softmax(logits, -1)
    capacity = expert_capacity(12, 3, 1.0, 1, 4)
    assert routing.expert_choice and routing.capacity == capacity
    assert routing.load.tolist() == [capacity] * 3
    for e in range(3):
        top = sorted(range(12), key=lambda s: -probs[s, e].item())[:capacity]
        picked = routing.kept[:, e].nonzero().flatten().tolist()
        assert picked == sorted(top)
        assert routing.slot[picked, e].tolist() == list(range(capacity))
        torch.testing.assert_close(routing.weight[picked, e], probs[picked, e])
    assert routing.aux_loss.item() == 0.0


def test_selection_bias_moves_choice_not_weights():
    logits = random_logits(4, 20, 4)
    bias = torch.tensor([0.0, 0.0, 0.0, 100.0])
    routing = route(logits, k=1, selection_bias=bias, drop_tokens=False)
    assert routing.expert[:, 0].tolist() == [3] * 20
    torch.testing.assert_close(routing.weight[:, 0], torch.softmax(logits, -1)[:, 3])


def test_aux_free_bias_balances_load():
    torch.manual_seed(0)
    router = Router(16, 4, k=1, bias_update_rate=0.05, drop_tokens=False)
    with torch.no_grad():
        router.weight[0] += 0.5  # expert 0 is favoured by a positive input direction
    x = torch.randn(256, 16).abs()
    spread = []
    for _ in range(60):
        routing = router(x)
        spread.append(routing.counts.float().std().item() / routing.counts.float().mean().item())
    assert spread[-1] < 0.5 * spread[0]
    assert router.selection_bias[0] < 0  # the overloaded expert was pushed down
    router.eval()
    before = router.selection_bias.clone()
    router(x)
    assert torch.equal(router.selection_bias, before)  # no updates in eval


def test_router_jitter_only_in_training():
    torch.manual_seed(0)
    router = Router(8, 4, noisy_gate_policy="Jitter", generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 8)
    clean = torch.nn.functional.linear(x, router.weight)
    noisy = router.logits(x)
    assert not torch.allclose(noisy, clean)
    # the noise is multiplicative on the input, within 1 ± 1e-2
    ratio_bound = (x.abs() @ router.weight.abs().t()) * 1e-2
    assert bool(((noisy - clean).abs() <= ratio_bound + 1e-6).all())
    router.eval()
    torch.testing.assert_close(router.logits(x), clean)


def test_router_uses_eval_capacity_factor_in_eval():
    router = Router(8, 4, capacity_factor=2.0, eval_capacity_factor=0.5, min_capacity=0)
    x = torch.randn(32, 8)
    assert router(x).capacity == 16
    router.eval()
    assert router(x).capacity == 4


def test_router_routes_in_float32():
    router = Router(8, 4).to(torch.float16)
    routing = router(torch.randn(6, 8, dtype=torch.float16))
    assert routing.probs.dtype == torch.float32


@pytest.mark.parametrize("drop_tokens", [True, False])
def test_routing_layout_tensors_are_computed_once_and_match_their_definitions(drop_tokens):
    # load, offsets and row are kept on the Routing after first use (dispatch, the experts and
    # combine all read them); a Routing made by dataclasses.replace computes its own.
    routing = route(random_logits(5, 30, 4), k=2, capacity_factor=0.5, training=False,
                    drop_tokens=drop_tokens)
    assert routing.load is routing.load and routing.row is routing.row
    kept = [(int(e), int(slot)) for e, slot in zip(routing.expert.flatten(),
                                                   routing.slot.flatten(), strict=True)
            if slot >= 0]
    assert len(kept) < 60 if drop_tokens else len(kept) == 60
    load = [sum(1 for e, _ in kept if e == x) for x in range(4)]
    assert routing.load.tolist() == load
    assert routing.offsets.tolist() == [sum(load[:e]) for e in range(5)]
    for s in range(30):
        for j in range(2):
            e, slot = int(routing.expert[s, j]), int(routing.slot[s, j])
            start = e * routing.capacity if drop_tokens else sum(load[:e])
            assert int(routing.row[s, j]) == (start + slot if slot >= 0 else -1)
    dropped = dataclasses.replace(routing, slot=torch.full_like(routing.slot, -1))
    assert dropped.load.tolist() == [0, 0, 0, 0] and bool((dropped.row == -1).all())


def test_losses_are_computed_on_first_read_when_no_gradient_needs_them():
    logits = random_logits(6, 24, 5)
    with torch.no_grad():
        lazy = route(logits, k=2, training=False)
    assert callable(lazy.__dict__["_aux_loss"]) and callable(lazy.__dict__["_z_loss"])
    eager = route(logits.clone().requires_grad_(), k=2, training=False)
    assert isinstance(eager.__dict__["_aux_loss"], torch.Tensor)
    assert eager.aux_loss.grad_fn is not None and eager.z_loss.grad_fn is not None
    torch.testing.assert_close(lazy.aux_loss, eager.aux_loss.detach())
    torch.testing.assert_close(lazy.z_loss, eager.z_loss.detach())
    assert lazy.aux_loss is lazy.aux_loss  # computed once, then kept
    copy = dataclasses.replace(lazy, weight=lazy.weight * 2)  # reads the losses, keeps them
    assert copy.aux_loss is lazy.aux_loss and "aux_loss=" in repr(copy)
