"""generate() with a KV cache against recomputation, the inference path, ragged prompts."""

from __future__ import annotations

import pytest
import torch
from tiny_models import MODELS, RAGGED, VOCAB, prompts, tiny

from moelab.generation import PAD_ID, Generation, generate, inference_mode
from moelab.layer import MoE
from moelab.model import GPT, KVCache


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
        assert all(m.backend == "index" and not m.router.config.drop_tokens for m in layers)
    assert model.training
    assert all(m.backend == "einsum" and m.router.config.drop_tokens for m in layers)
    with inference_mode(model, dropless=False, backend=None):
        assert all(m.backend == "einsum" and m.router.config.drop_tokens for m in layers)


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
    (dict(prompt=[[1, 2, 3], [1, 2]], max_new_tokens=2, dropless=False), "dropless=True"),
    (dict(prompt=[[1, 2, 3], []], max_new_tokens=2), "non-empty"),
    (dict(prompt=[1, 2], max_new_tokens=2, cuda_graph=True), "needs a CUDA device"),
    (dict(prompt=[1, 2], max_new_tokens=2, cuda_graph=1), "cuda_graph must be True or False"),
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


# ------------------------------------------------------------- prompts of different lengths



def reference_logits(model: GPT, prompt: list[int], new_tokens: torch.Tensor) -> torch.Tensor:
    """[N, V]: one plain forward (no cache, no padding) over the prompt and the new tokens."""
    sequence = torch.cat([torch.tensor(prompt), new_tokens[:-1].cpu()])[None]  # [1, T + N - 1]
    with inference_mode(model), torch.no_grad():
        return model(sequence).logits[0, len(prompt) - 1:]  # [N, V]


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("name", MODELS)
def test_ragged_prompts_generate_what_each_prompt_generates_alone(name, use_cache):
    model = tiny(**MODELS[name])
    out = generate(model, RAGGED, 8, greedy=True, return_logits=True, use_cache=use_cache)
    assert out.prompt_length == 7 and out.prompt_lengths == [7, 2, 4]
    for b, prompt in enumerate(RAGGED):
        alone = generate(model, prompt, 8, greedy=True, return_logits=True, use_cache=use_cache)
        assert torch.equal(out.new_tokens[b], alone.new_tokens[0])
        torch.testing.assert_close(out.logits[b], alone.logits[0], atol=1e-5, rtol=0)
        # ... and the independent reference: a forward over the sequence, no cache, no pads
        torch.testing.assert_close(out.logits[b], reference_logits(model, prompt,
                                                                   out.new_tokens[b]),
                                   atol=1e-5, rtol=0)


def test_ragged_generation_reports_lengths_and_strips_pads():
    model = tiny()
    out = generate(model, [torch.tensor([3, 4, 5]), torch.tensor([6])], 2, greedy=True)
    assert out.prompt_lengths == [3, 1] and out.left_pad == [0, 2]
    assert out.tokens[1, :2].tolist() == [PAD_ID, PAD_ID]
    first, second = out.sequences()
    assert first[:3].tolist() == [3, 4, 5] and second[:1].tolist() == [6]
    assert first.shape == (5,) and second.shape == (3,)
    assert out.new_tokens.shape == (2, 2)
    equal = generate(model, [[1, 2], [3, 4]], 2, greedy=True)
    assert equal.prompt_lengths == [2, 2] and equal.left_pad == [0, 0]


def test_ragged_prompts_are_refused_where_pads_would_compete_for_experts():
    model = tiny()
    with pytest.raises(ValueError, match="dropless=True"):
        generate(model, RAGGED, 2, dropless=False)
    generate(model, [[1, 2], [3, 4]], 2, dropless=False)  # equal lengths: no pads, allowed
    router = model.blocks[1].ffn.router
    router.config = router.config.replace(choice="expert")
    with pytest.raises(ValueError, match="expert-choice"):
        generate(model, RAGGED, 2)


def test_left_pad_forward_and_chunked_prefill_match_unpadded_sequences():
    model = tiny(k=2, residual=True).eval()
    pad = torch.tensor([0, 3])
    tokens = prompts(2, 9)
    tokens[1, :3] = PAD_ID
    with torch.no_grad(), inference_mode(model):
        padded = model(tokens, left_pad=pad).logits  # [2, 9, V]
        cache = KVCache(model.config, 2, 9, left_pad=[0, 3])
        chunked = torch.cat([model(tokens[:, :5], cache=cache).logits,
                             model(tokens[:, 5:], cache=cache).logits], 1)  # later chunk: T=4
        alone = [model(tokens[0:1]).logits[0], model(tokens[1:2, 3:]).logits[0]]
    for logits in (padded, chunked):
        torch.testing.assert_close(logits[0], alone[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[1, 3:], alone[1], atol=1e-5, rtol=0)
        assert torch.isfinite(logits).all()  # pad queries see pads only: no empty softmax


def test_left_pad_bad_input():
    model = tiny()
    with pytest.raises(ValueError, match="left_pad must give one pad count"):
        KVCache(model.config, 2, 8, left_pad=[0, 8])
    with pytest.raises(ValueError, match="KVCache carries"):
        model(prompts(), cache=KVCache(model.config, 2, 8), left_pad=torch.zeros(2).long())
    with pytest.raises(ValueError, match="left_pad must have shape"):
        model(prompts(), left_pad=torch.zeros(3).long())
