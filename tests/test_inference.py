"""generate() with a KV cache against recomputation, the inference path, the latency breakdown."""

from __future__ import annotations

import pytest
import torch

from moelab.inference import (
    COMPONENTS,
    Generation,
    LatencyProfiler,
    decode_latency,
    generate,
    inference_mode,
)
from moelab.layer import MoE
from moelab.model import GPT, GPTConfig, KVCache

VOCAB = 64


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    options = dict(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, d_model=16, experts=4)
    options.update(overrides)
    model = GPT(GPTConfig(**options))
    # GPT-2 init leaves a tiny model's next-token distribution nearly flat; widen it so that
    # greedy choices are well separated.
    with torch.no_grad():
        model.wte.weight.mul_(20)
    return model


def prompts(batch: int = 2, length: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


MODELS = {
    "top1": dict(),
    "top2_residual": dict(k=2, residual=True, experts="2/4", n_layer=4),
    "dense": dict(experts=0),
    "swiglu": dict(activation="swiglu", k=2),
}


@pytest.mark.parametrize("name", MODELS)
def test_cached_generation_equals_recomputation(name):
    model = tiny(**MODELS[name])
    prompt = prompts()
    cached = generate(model, prompt, 12, greedy=True, return_logits=True)
    recomputed = generate(model, prompt, 12, greedy=True, use_cache=False, return_logits=True)
    assert torch.equal(cached.tokens, recomputed.tokens)
    torch.testing.assert_close(cached.logits, recomputed.logits, atol=1e-5, rtol=0)
    assert torch.equal(cached.tokens[:, :5], prompt)


def test_cached_logits_equal_one_forward_over_the_generated_sequence():
    model = tiny(k=2, residual=True)
    out = generate(model, prompts(3, 4), 10, greedy=True, return_logits=True)
    with inference_mode(model), torch.no_grad():
        full = model(out.tokens[:, :-1]).logits  # [B, T + N - 1, V]
    torch.testing.assert_close(out.logits, full[:, 3:], atol=1e-5, rtol=0)


def test_sampling_with_a_seeded_generator_is_reproducible_and_matches_recomputation():
    model = tiny()
    prompt = prompts(2, 3)
    runs = [generate(model, prompt, 10, temperature=0.8, top_k=8, use_cache=cache,
                     generator=torch.Generator().manual_seed(7)) for cache in (True, True, False)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert torch.equal(runs[0].tokens, runs[2].tokens)


def test_top_k_one_is_greedy():
    model = tiny()
    greedy = generate(model, prompts(), 8, greedy=True)
    top1 = generate(model, prompts(), 8, top_k=1, temperature=2.0,
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy.tokens, top1.tokens)


def test_capacity_dropping_makes_cached_decode_differ_from_recomputation():
    # Capacity depends on how many tokens are routed together: ceil(S/E · cf) slots per expert.
    # A decode step routes B = 2 tokens (every route fits); recomputing routes B·T tokens, and
    # routes over capacity are dropped (their MoE output is 0).
    model = tiny(eval_capacity_factor=0.25, min_capacity=0)
    prompt = prompts(2, 12)
    kwargs = dict(greedy=True, return_logits=True, dropless=False)
    cached = generate(model, prompt, 6, **kwargs)
    recomputed = generate(model, prompt, 6, use_cache=False, **kwargs)
    assert (cached.logits - recomputed.logits).abs().max() > 1e-3
    # ... and dropless (the default) makes them agree again
    cached = generate(model, prompt, 6, greedy=True, return_logits=True)
    recomputed = generate(model, prompt, 6, greedy=True, return_logits=True, use_cache=False)
    torch.testing.assert_close(cached.logits, recomputed.logits, atol=1e-5, rtol=0)


def test_decode_feeds_one_token_per_step_into_a_cache_allocated_once(monkeypatch):
    model = tiny()
    shapes = []
    model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    allocations = []
    original = KVCache.__init__

    def counting_init(self, *args, **kwargs):
        allocations.append(args)
        original(self, *args, **kwargs)

    monkeypatch.setattr(KVCache, "__init__", counting_init)
    out = generate(model, prompts(2, 5), 6, greedy=True)
    assert shapes == [(2, 5)] + [(2, 1)] * 5  # prefill, then one token per step
    assert len(allocations) == 1
    assert isinstance(out, Generation) and out.tokens.shape == (2, 11)
    assert out.prefill_s > 0 and out.decode_s > 0 and out.decode_steps == 5
    assert out.decode_tokens_per_s > 0 and out.new_tokens.shape == (2, 6)


def test_chunked_prefill_with_a_cache_matches_one_forward():
    # A later chunk of several tokens needs the causal mask shifted by the cache length.
    model = tiny(k=2).eval()
    tokens = prompts(2, 9)
    cache = KVCache(model.config, 2, 9)
    with torch.no_grad(), inference_mode(model):
        first = model(tokens[:, :4], cache=cache).logits
        second = model(tokens[:, 4:], cache=cache).logits
        full = model(tokens).logits
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-5, rtol=0)
    assert cache.length == 9


def test_inference_mode_sets_and_restores_the_layers():
    model = tiny(backend="einsum")
    model.train()
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    with inference_mode(model):
        assert not model.training
        assert all(m.backend == "index" and not m.router.options["drop_tokens"] for m in layers)
    assert model.training
    assert all(m.backend == "einsum" and m.router.options["drop_tokens"] for m in layers)
    with inference_mode(model, dropless=False, backend=None):
        assert all(m.backend == "einsum" and m.router.options["drop_tokens"] for m in layers)


def test_prompt_forms_and_zero_new_tokens():
    model = tiny()
    as_list = generate(model, [3, 4, 5], 4, greedy=True)
    as_tensor = generate(model, torch.tensor([[3, 4, 5]]), 4, greedy=True)
    as_lists = generate(model, [[3, 4, 5], [3, 4, 5]], 4, greedy=True)
    assert torch.equal(as_list.tokens, as_tensor.tokens)
    assert torch.equal(as_lists.tokens[0], as_tensor.tokens[0])
    nothing = generate(model, [3, 4, 5], 0)
    assert nothing.tokens.tolist() == [[3, 4, 5]] and nothing.decode_steps == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=[[1, 2, 3], [1, 2]], max_new_tokens=2), "pad the prompts"),
    (dict(prompt=list(range(33)), max_new_tokens=1), "block_size=32"),
    (dict(prompt=list(range(30)), max_new_tokens=3), "block_size=32"),
    (dict(prompt=[1, 2], max_new_tokens=2, temperature=0.0), "greedy=True"),
    (dict(prompt=[1, 2], max_new_tokens=2, temperature=-1.0), "greedy=True"),
    (dict(prompt=[1, 2], max_new_tokens=2, top_k=0), "top_k"),
    (dict(prompt=[1, 2], max_new_tokens=-1), "max_new_tokens"),
    (dict(prompt=[], max_new_tokens=2), "prompt"),
    (dict(prompt=torch.rand(2, 3), max_new_tokens=2), "integer token ids"),
    (dict(prompt=[1, VOCAB], max_new_tokens=2), "vocab_size"),
    (dict(prompt=[1, 2], max_new_tokens=2, backend="cuda"), "backend"),
])
def test_bad_input_says_what_to_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny(), **kwargs)


def test_greedy_ignores_temperature():
    out = generate(tiny(), [1, 2], 3, greedy=True, temperature=0.0)
    assert out.tokens.shape == (1, 5)


# ------------------------------------------------------------------- latency breakdown

@pytest.mark.parametrize("backend, use_cache, phase", [
    ("index", True, "decode"), ("einsum", True, "decode"), ("index", False, "decode"),
    ("index", True, "prefill"),
])
def test_breakdown_components_sum_to_the_measured_time(backend, use_cache, phase):
    model = tiny(k=2, residual=True, n_layer=4, d_model=32)
    breakdown = decode_latency(model, batch_size=4, prompt_length=8, steps=4, warmup=1,
                               backend=backend, use_cache=use_cache, phase=phase)
    assert abs(breakdown.total_s - breakdown.measured_s) <= 0.1 * breakdown.measured_s
    assert set(breakdown.totals) == set(COMPONENTS)
    assert all(s >= 0 for values in breakdown.per_layer.values() for s in values)
    moe = breakdown.moe_layers
    assert moe == [1, 3]
    for layer in range(4):
        parts = {c: v[layer] for c, v in breakdown.per_layer.items()}
        assert parts["attention"] > 0
        assert parts["dense_ffn"] > 0  # a dense MLP, or the residual MLP beside the experts
        if layer in moe:
            assert parts["gate"] > 0 and parts["experts"] > 0 and parts["combine"] > 0
        else:
            assert parts["gate"] == parts["experts"] == parts["combine"] == 0
    assert breakdown.totals["exchange"] == 0  # one process: no all-to-all
    assert breakdown.backend == backend and breakdown.steps == 4
    assert breakdown.tokens_per_s > 0 and breakdown.moe_s > 0
    rows = breakdown.rows()
    assert abs(sum(r["seconds"] for r in rows) - breakdown.total_s) < 1e-12


def test_profiler_leaves_the_model_as_it_was():
    from moelab import layer as layer_module

    model = tiny()
    dispatch, combine = layer_module.dispatch, layer_module.combine
    with LatencyProfiler(model) as profiler, torch.no_grad():
        model(prompts())
        with pytest.raises(RuntimeError, match="another LatencyProfiler"):
            LatencyProfiler(model).__enter__()
    assert profiler.calls == 1
    assert layer_module.dispatch is dispatch and layer_module.combine is combine
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_decode_latency_bad_input():
    with pytest.raises(ValueError, match="block_size"):
        decode_latency(tiny(), prompt_length=30, steps=4)
    with pytest.raises(ValueError, match="phase"):
        decode_latency(tiny(), phase="train")
    with pytest.raises(ValueError, match="batch_size"):
        decode_latency(tiny(), batch_size=0)
