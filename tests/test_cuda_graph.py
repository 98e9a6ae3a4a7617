"""The static decode step (what a CUDA graph holds) and CUDA-graph decode (on a GPU)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import MODELS, RAGGED, prompts, tiny

from moelab.cuda_graph import (
    DecodeGraph,
    StaticDecodeStep,
    no_drop_capacity_factor,
    static_routing,
)
from moelab.generation import generate, inference_mode
from moelab.layer import MoE
from moelab.model import GPT, KVCache
from moelab.routing import expert_capacity

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU; none here")


@pytest.mark.parametrize("experts, k", [(4, 1), (4, 2), (3, 2), (8, 3), (5, 5)])
def test_no_drop_capacity_holds_every_route(experts, k):
    for tokens in range(1, 70):
        factor = no_drop_capacity_factor(tokens, experts, k, min_capacity=0)
        assert expert_capacity(tokens, experts, factor, k, 0) >= tokens


def test_static_routing_sets_and_restores_the_routers():
    model = tiny(eval_capacity_factor=0.25, min_capacity=0)
    routers = [m.router for m in model.modules() if isinstance(m, MoE)]
    with inference_mode(model), static_routing(model, 3):
        assert all(r.config.drop_tokens and r.config.eval_capacity_factor == 4.0 for r in routers)
        with torch.no_grad():
            routing = model(prompts(3, 1)).routings[1]
        assert routing.capacity == 3 and bool(routing.kept.all())
    assert all(r.config.drop_tokens and r.config.eval_capacity_factor == 0.25 for r in routers)
    with inference_mode(model, dropless=False), static_routing(model, 3, dropless=False):
        assert all(r.config.drop_tokens and r.config.eval_capacity_factor == 0.25 for r in routers)


def static_decode(model: GPT, prompt, max_new_tokens: int, dropless: bool = True,
                  compile_step: bool = False) -> torch.Tensor:
    """[B, N - 1, V]: the logits of decode steps 1.. run through a StaticDecodeStep (eagerly, or
    under torch.compile(fullgraph=True)), fed the tokens generate() chose."""
    out = generate(model, prompt, max_new_tokens, greedy=True, dropless=dropless)
    length, pads = out.prompt_length, out.left_pad
    cache = KVCache(model.config, len(pads), length + max_new_tokens - 1,
                    left_pad=pads if any(pads) else None)
    steps = []
    with torch.no_grad(), inference_mode(model, dropless=dropless):
        model(out.tokens[:, :length], cache=cache)  # prefill, eagerly
        step = StaticDecodeStep(model, cache)
        run = step
        if compile_step:
            torch._dynamo.reset()
            run = torch.compile(step, fullgraph=True, backend="eager", dynamic=False)
        with static_routing(model, len(pads), dropless=dropless):
            for slot in range(length, length + max_new_tokens - 1):
                step.load(out.tokens[:, slot:slot + 1], slot)
                steps.append(run().clone())
    assert cache.length == length  # the static step never reads or moves the Python length
    return torch.stack(steps, 1)


@pytest.mark.parametrize("name", MODELS)
def test_static_decode_step_equals_cached_decode(name):
    model = tiny(**MODELS[name])
    expected = generate(model, RAGGED, 6, greedy=True, return_logits=True).logits[:, 1:]
    torch.testing.assert_close(static_decode(model, RAGGED, 6), expected, atol=1e-5, rtol=0)


def test_static_decode_step_keeps_a_dropping_capacity_with_dropless_false():
    model = tiny(eval_capacity_factor=0.25, min_capacity=0)  # C = 1 for 3 tokens: drops
    prompt = prompts(3, 4)
    expected = generate(model, prompt, 6, greedy=True, return_logits=True,
                        dropless=False).logits[:, 1:]
    dropless = generate(model, prompt, 6, greedy=True, return_logits=True).logits[:, 1:]
    assert (expected - dropless).abs().max() > 1e-3
    torch.testing.assert_close(static_decode(model, prompt, 6, dropless=False), expected,
                               atol=1e-5, rtol=0)


@pytest.fixture
def capacity_arithmetic_traceable(monkeypatch):
    """expert_capacity is NumPy float32 arithmetic on Python ints (DeepSpeed's rounding) and a
    math.ceil of it: plain host arithmetic inside a CUDA graph capture, but dynamo traces the
    NumPy part as tensors and breaks the graph at the ceil. Mark its result constant so that the
    proxy below checks everything else."""
    from moelab import router

    monkeypatch.setattr(router, "expert_capacity",
                        torch._dynamo.assume_constant_result(router.expert_capacity))


# The CPU proxy for "capturable in a CUDA graph": dynamo with fullgraph=True refuses every graph
# break: .item(), .tolist(), bool(tensor), nonzero, boolean-mask indexing, data-dependent shapes
# (torch._dynamo.config.capture_scalar_outputs / capture_dynamic_output_shape_ops stay False).

@pytest.mark.parametrize("name", ["top1", "top2_residual", "dense"])
def test_static_decode_step_compiles_to_one_graph(name, capacity_arithmetic_traceable):
    assert not torch._dynamo.config.capture_scalar_outputs
    assert not torch._dynamo.config.capture_dynamic_output_shape_ops
    model = tiny(**MODELS[name])
    expected = generate(model, RAGGED, 4, greedy=True, return_logits=True).logits[:, 1:]
    compiled = static_decode(model, RAGGED, 4, compile_step=True)
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=0)


# --------------------------------------------- CUDA graphs (run on a GPU: pytest -k cuda)

def test_cuda_graph_needs_a_cuda_device_and_the_cache():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        generate(tiny(), RAGGED, 3, cuda_graph=True)
    if CUDA:
        model = tiny().cuda()
        with pytest.raises(ValueError, match="use_cache=True"):
            generate(model, RAGGED, 3, cuda_graph=True, use_cache=False)
        with pytest.raises(ValueError, match="backend='index'"):
            generate(model, RAGGED, 3, cuda_graph=True, backend="einsum")


@needs_cuda
@pytest.mark.parametrize("name", ["top1", "top2_residual", "swiglu", "dense"])
def test_cuda_graph_decode_equals_eager_cached_decode(name):
    model = tiny(**MODELS[name]).cuda()
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    graph = generate(model, RAGGED, 10, greedy=True, return_logits=True, cuda_graph=True)
    # prefill, two warm-up steps, the capture; then every step is a replay (no Python forward)
    assert len(calls) == 4
    eager = generate(model, RAGGED, 10, greedy=True, return_logits=True)
    assert torch.equal(graph.tokens, eager.tokens)
    torch.testing.assert_close(graph.logits, eager.logits, atol=1e-4, rtol=0)
    assert graph.capture_s > 0 and graph.decode_s > 0 and graph.prompt_lengths == [7, 2, 4]
    routers = [(m.router.eval_capacity_factor, m.router.drop_tokens)
               for m in model.modules() if isinstance(m, MoE)]
    assert routers == [(1.0, True)] * len(routers)  # restored after the capture


@needs_cuda
def test_cuda_graph_decode_keeps_the_capacity_with_dropless_false():
    model = tiny(eval_capacity_factor=0.25, min_capacity=0).cuda()  # decode drops routes
    prompt = prompts(3, 4).cuda()
    kwargs = dict(greedy=True, return_logits=True, dropless=False)
    graph = generate(model, prompt, 8, cuda_graph=True, **kwargs)
    eager = generate(model, prompt, 8, **kwargs)
    assert torch.equal(graph.tokens, eager.tokens)
    torch.testing.assert_close(graph.logits, eager.logits, atol=1e-4, rtol=0)


@needs_cuda
def test_cuda_graph_sampling_matches_eager_with_the_same_generator():
    model = tiny(k=2).cuda()
    runs = [generate(model, RAGGED, 8, temperature=0.8, top_k=8, cuda_graph=graph,
                     generator=torch.Generator(device="cuda").manual_seed(3))
            for graph in (True, False)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)


@needs_cuda
def test_cuda_decode_graph_replays_the_step_on_new_inputs():
    model = tiny(k=2, residual=True).cuda().eval()
    out = generate(model, RAGGED, 5, greedy=True, return_logits=True)
    cache = KVCache(model.config, 3, 7 + 5 - 1, device="cuda", left_pad=out.left_pad)
    with torch.no_grad(), inference_mode(model):
        model(out.tokens[:, :7], cache=cache)
        step = StaticDecodeStep(model, cache)
        step.load(out.tokens[:, 7:8], 7)
        with static_routing(model, 3):
            graph = DecodeGraph(step)
        for s in range(1, 5):
            logits = graph(out.tokens[:, 6 + s:7 + s], 6 + s)
            torch.testing.assert_close(logits, out.logits[:, s], atol=1e-4, rtol=0)
