"""route() and Router against per-token references, formulas and invariants."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import random_logits, reference_modern_choice, reference_route

from moelab import Router, expert_capacity, route
from moelab import routing as routing_module

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


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_a_fixed_selection_bias_chooses_and_is_never_updated(score):
    """use_selection_bias (a loaded DeepSeek-V3 e_score_correction_bias): the buffer moves the
    choice in training and eval, the weights stay unbiased, and nothing updates it."""
    torch.manual_seed(0)
    router = Router(8, 4, k=1, score=score, drop_tokens=False, use_selection_bias=True)
    with torch.no_grad():
        router.selection_bias.copy_(torch.tensor([0.0, 0.0, 100.0, 0.0]))
    x = torch.randn(20, 8)
    scores = router.logits(x).sigmoid() if score == "sigmoid" else router.logits(x).softmax(-1)
    for training in (True, False):
        routing = router.train(training)(x)
        assert routing.expert[:, 0].tolist() == [2] * 20
        torch.testing.assert_close(routing.weight[:, 0], scores[:, 2])
    assert router.selection_bias.tolist() == [0.0, 0.0, 100.0, 0.0]
    assert "selection_bias" in router.state_dict()  # it is the model's, so it is saved
    plain = Router(8, 4, k=1, drop_tokens=False)  # the default: the buffer is neither used...
    with torch.no_grad():
        plain.selection_bias.copy_(torch.tensor([0.0, 0.0, 100.0, 0.0]))
    unbiased = plain.logits(x).argmax(-1)
    assert torch.equal(plain(x).expert[:, 0], unbiased) and (unbiased != 2).any()
    assert "selection_bias" not in plain.state_dict()  # ... nor saved
    assert not router.eval().fused_eligible(router.logits(x))


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


@pytest.mark.parametrize("k", [3, 4])
def test_probs_drop_policy_keeps_the_routes_deepspeed_keeps(k, monkeypatch):
    """DeepSpeed's topkgating (k > 2, 'probs' policy) against route(): the same kept routes,
    including routes whose chosen logit is negative (an older DeepSpeed ranked raw logits and
    dropped those first)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    sharded_moe = pytest.importorskip("deepspeed.moe.sharded_moe",
                                      reason="DeepSpeed is in the 'peers' extra")
    negative_kept = 0
    for seed in range(10):
        logits = random_logits(seed, 30, 6)
        *_, dispatch_mask, _ = sharded_moe.topkgating(logits, k, 0.5, 1, drop_tokens=True,
                                                      drop_policy="probs")
        routing = route(logits, k=k, capacity_factor=0.5, min_capacity=1, drop_policy="probs",
                        training=False)
        kept = torch.zeros(30, 6, dtype=torch.bool)
        kept[torch.arange(30)[:, None].expand(-1, k)[routing.kept], routing.expert[routing.kept]] \
            = True
        assert torch.equal(dispatch_mask.any(-1), kept)
        negative_kept += int((kept & (logits < 0)).sum())
    assert negative_kept > 0


# ------------------------------------------------------------ routing as today's models do it

modern_cases = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "num_tokens": st.integers(1, 24),
    "groups": st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2), (4, 3)]),  # (n_group, topk_group)
    "per_group": st.integers(1, 4),
    "k": st.integers(1, 4),
    "score": st.sampled_from(["softmax", "sigmoid"]),
    "scale": st.sampled_from([1.0, 2.5]),
    "renormalize": st.sampled_from([None, True, False]),
    "biased": st.booleans(),
})


@settings(max_examples=150, deadline=None)
@given(modern_cases)
def test_modern_routing_options_equal_a_per_token_reference(case):
    """Sigmoid or softmax scores, group-limited top-k, a selection bias, renormalisation and
    the routed scaling factor against a reference written token by token from the papers."""
    n_group, topk_group = case["groups"]
    num_experts = n_group * case["per_group"]
    k = min(case["k"], topk_group * case["per_group"])
    logits = random_logits(case["seed"], case["num_tokens"], num_experts)
    bias = (torch.randn(num_experts, generator=torch.Generator().manual_seed(case["seed"]))
            * 0.3) if case["biased"] else None
    options = dict(k=k, score=case["score"], n_group=n_group, topk_group=topk_group,
                   routed_scaling_factor=case["scale"], renormalize=case["renormalize"])
    routing = route(logits, drop_tokens=False, training=False, selection_bias=bias, **options)
    chosen, weights = reference_modern_choice(
        logits, k=k, score=case["score"], n_group=n_group, topk_group=topk_group,
        scale=case["scale"], renormalize=case["renormalize"], bias=bias)
    for s in range(case["num_tokens"]):
        assert set(routing.expert[s].tolist()) == chosen[s], s
        for j in range(k):
            e = int(routing.expert[s, j])
            assert float(routing.weight[s, j]) == pytest.approx(weights[s][e], rel=1e-5,
                                                               abs=1e-7)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([(4, 1), (4, 2), (8, 3)]),
       st.integers(1, 3))
def test_group_limited_top_k_never_chooses_outside_the_kept_groups(seed, groups, k):
    n_group, topk_group = groups
    num_experts, per_group = n_group * 4, 4
    logits = random_logits(seed, 20, num_experts)
    routing = route(logits, k=k, n_group=n_group, topk_group=topk_group, score="sigmoid",
                    drop_tokens=False, training=False)
    scores = torch.sigmoid(logits).view(20, n_group, per_group)
    group_score = scores.topk(2, dim=-1).values.sum(-1)  # [S, G]
    kept = group_score.topk(topk_group, dim=-1).indices  # [S, topk_group]
    for s in range(20):
        groups_used = {int(e) // per_group for e in routing.expert[s]}
        assert groups_used <= set(kept[s].tolist())
        assert len(groups_used) <= topk_group


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_sigmoid_weights_sum_to_the_scaling_factor_after_renormalising(scale):
    routing = route(random_logits(3, 30, 8), k=3, score="sigmoid", renormalize=True,
                    routed_scaling_factor=scale, drop_tokens=False, training=False)
    torch.testing.assert_close(routing.weight.sum(1), torch.full((30,), scale))
    assert bool((routing.probs > 0).all() & (routing.probs < 1).all())  # sigmoid scores


def test_softmax_after_top_k_is_the_renormalised_softmax():
    """Mixtral / gpt-oss take a softmax over the k chosen logits; route's renormalize=True
    gives the same weights (softmax(l)_i / Σ_topk softmax(l)_j = exp(l_i) / Σ_topk exp(l_j))."""
    logits = random_logits(4, 16, 8)
    routing = route(logits, k=2, renormalize=True, drop_tokens=False, training=False)
    top_logits = logits.gather(1, routing.expert)
    torch.testing.assert_close(routing.weight, torch.softmax(top_logits, dim=-1))


@pytest.mark.parametrize("options,match", [
    (dict(n_group=3), r"n_group=3 must divide num_experts=8"),
    (dict(n_group=2, topk_group=3), r"topk_group=3 must be at most n_group=2"),
    (dict(n_group=4, topk_group=1, k=3), r"k=3 is more than the 2 experts of topk_group=1"),
    (dict(routed_scaling_factor=-1.0), r"routed_scaling_factor must be a finite number > 0"),
    (dict(score="tanh"), r"score must be one of \('softmax', 'sigmoid'\)"),
    (dict(balance_loss="switch"), r"balance_loss must be one of"),
])
def test_modern_options_refuse_bad_values_naming_the_field(options, match):
    with pytest.raises(ValueError, match=match):
        route(random_logits(0, 6, 8), **options)
    with pytest.raises(ValueError, match=match):
        Router(4, 8, **options)


def test_a_router_with_a_bias_adds_it_to_the_logits():
    torch.manual_seed(0)
    router = Router(8, 4, router_bias=True)
    x = torch.randn(5, 8)
    torch.testing.assert_close(router.logits(x), x @ router.weight.T + router.bias)
    assert Router(8, 4).bias is None
