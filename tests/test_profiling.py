"""The latency breakdown: components tile the forward; the profiler only observes."""

from __future__ import annotations

import pytest
import torch
from tiny_models import prompts, tiny

from moelab.profiling import COMPONENTS, LatencyProfiler, decode_latency


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
    model = tiny()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with LatencyProfiler(model) as profiler, torch.no_grad():
        model(prompts())
        with pytest.raises(RuntimeError, match="another LatencyProfiler"):
            LatencyProfiler(model).__enter__()
    assert profiler.calls == 1
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_decode_latency_bad_input():
    with pytest.raises(ValueError, match="block_size"):
        decode_latency(tiny(), prompt_length=30, steps=4)
    with pytest.raises(ValueError, match="phase"):
        decode_latency(tiny(), phase="train")
    with pytest.raises(ValueError, match="batch_size"):
        decode_latency(tiny(), batch_size=0)
