"""The Experts bank against per-expert computations, in every layout and path."""

from __future__ import annotations

import itertools

import pytest
import torch

from moelab import Experts
from moelab.experts import PAD_SLACK, SEGMENT_MACS


def test_experts_run_each_expert_on_its_rows():
    torch.manual_seed(0)
    experts = Experts(3, 4, 8, activation="swiglu").double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    out = experts(x)
    for e in range(3):
        h = x[e] @ experts.w_in[e] + experts.b_in[e]
        gate, up = h.chunk(2, dim=-1)
        expected = (torch.nn.functional.silu(gate) * up) @ experts.w_out[e] + experts.b_out[e]
        torch.testing.assert_close(out[e], expected)


@pytest.mark.parametrize("group_bytes", [1, 200, 1 << 30], ids=["1 expert", "2 experts", "all"])
@pytest.mark.parametrize("activation,bias", [("gelu", True), ("relu", False), ("swiglu", True)])
def test_experts_inference_path_runs_each_expert_on_its_rows(activation, bias, group_bytes,
                                                            monkeypatch):
    """Without autograd the bank runs experts in groups with the activation in place: the same
    numbers as a per-expert loop, whatever the group size, and its input is left untouched."""
    import moelab.experts

    monkeypatch.setattr(moelab.experts, "HIDDEN_GROUP_BYTES", group_bytes)
    torch.manual_seed(1)
    experts = Experts(5, 4, 3, activation=activation, bias=bias).double()
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    x_before = x.clone()
    with torch.no_grad():
        out = experts(x)
    act = {"gelu": torch.nn.functional.gelu, "relu": torch.relu,
           "swiglu": lambda h: torch.nn.functional.silu(h[:, :3]) * h[:, 3:]}[activation]
    for e in range(5):
        h = x[e] @ experts.w_in[e] + (experts.b_in[e] if bias else 0)
        expected = act(h) @ experts.w_out[e] + (experts.b_out[e] if bias else 0)
        torch.testing.assert_close(out[e], expected.detach())
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("load", [[2, 0, 5, 1], [0, 0, 4, 0], [0, 3, 0, 1], [0, 0, 0, 0]],
                         ids=["padded batch", "one expert", "two experts", "no rows"])
@pytest.mark.parametrize("grad", [False, True])
def test_experts_forward_packed_runs_each_segment_with_its_expert(load, grad):
    """Both packed paths (padded batch when most experts have rows, a loop over the experts that
    have rows otherwise) against a per-expert computation, outputs and weight gradients."""
    torch.manual_seed(0)
    experts = Experts(4, 4, 8, activation="swiglu").double()
    load = torch.tensor(load)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), load.cumsum(0)])
    x = torch.randn(int(load.sum()), 4, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        out = experts.forward_packed(x, offsets)
    assert out.shape == x.shape
    expected = []
    for e in range(4):
        h = x[offsets[e]:offsets[e + 1]] @ experts.w_in[e] + experts.b_in[e]
        gate, up = h.chunk(2, dim=-1)
        expected.append((torch.nn.functional.silu(gate) * up) @ experts.w_out[e]
                        + experts.b_out[e])
    expected = torch.cat(expected)
    torch.testing.assert_close(out, expected.detach())
    if grad:  # also with no rows: zero gradients, not None (expert-parallel ranks need them)
        got = torch.autograd.grad(out.square().sum(), [experts.w_in, experts.b_out])
        want = torch.autograd.grad(expected.square().sum(), [experts.w_in, experts.b_out])
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)


def test_experts_start_independent():
    # DeepSpeed deep-copies one expert, so all experts start identical; moelab's do not.
    experts = Experts(4, 8, 16)
    for a, b in itertools.combinations(range(4), 2):
        assert not torch.allclose(experts.w_in[a], experts.w_in[b])
        assert not torch.allclose(experts.w_out[a], experts.w_out[b])


def reference_ffn(experts, rows, e):
    """Expert e on rows [n, d], written out."""
    h = rows @ experts.w_in[e] + (experts.b_in[e] if experts.b_in is not None else 0)
    if experts.activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
    else:
        h = {"gelu": torch.nn.functional.gelu, "relu": torch.relu}[experts.activation](h)
    return h @ experts.w_out[e] + (experts.b_out[e] if experts.b_out is not None else 0)


LOADS = {"zeros and one big": [0, 7, 0, 1, 0, 0], "all on one": [0, 0, 9, 0, 0, 0],
         "every expert": [2, 1, 3, 1, 2, 4], "no rows": [0, 0, 0, 0, 0, 0]}


@pytest.mark.parametrize("load", LOADS.values(), ids=LOADS.keys())
@pytest.mark.parametrize("path", ["segments", "grouped_mm", "padded"])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("activation,bias", [("gelu", True), ("swiglu", False)])
def test_every_packed_path_equals_the_per_expert_loop(load, path, grad, activation, bias,
                                                      monkeypatch):
    """Each path of the packed (dropless) layout, forced, against the loop: outputs and the
    gradients of the input and of every weight, in float32 (grouped_mm has no float64)."""
    torch.manual_seed(0)
    experts = Experts(6, 4, 8, activation=activation, bias=bias)  # rows 16 and 32 bytes wide
    monkeypatch.setattr(Experts, "path", lambda self, *args: path)
    load_t = torch.tensor(load)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), load_t.cumsum(0)])
    x = torch.randn(int(load_t.sum()), 4, requires_grad=grad)
    if path == "segments" and not any(load):
        pytest.skip("the segments path runs only when some expert has rows")
    with torch.set_grad_enabled(grad):
        out = experts(x, offsets)
        expected = torch.cat([reference_ffn(experts, x[offsets[e]:offsets[e + 1]], e)
                              for e in range(6)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    if grad:
        params = [x, *experts.parameters()]
        # the gradient of a sum is an expanded tensor: grouped_mm's backward needs it contiguous
        got = torch.autograd.grad(out.sum() + out.square().sum(), params, allow_unused=True)
        want = torch.autograd.grad(expected.sum() + expected.square().sum(), params,
                                   allow_unused=True)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g if g is not None else torch.zeros_like(w), w,
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("load", [[0, 3, 0, 0, 1, 0], [4, 4, 4, 4, 4, 4], [0] * 6],
                         ids=["two experts", "all full", "none"])
@pytest.mark.parametrize("grad", [False, True])
def test_the_capacity_layout_runs_only_experts_with_rows_and_gives_the_same_numbers(load, grad):
    """[E, C, d] with load: experts without rows do no work (their rows come back 0), the
    others' rows equal the whole-bank path; weight gradients equal too (0 for idle experts)."""
    torch.manual_seed(1)
    experts = Experts(6, 4, 5)
    x = torch.zeros(6, 4, 4)
    for e, rows in enumerate(load):
        x[e, :rows] = torch.randn(rows, 4)
    x.requires_grad_(grad)
    load_t = torch.tensor(load)
    # tiny GEMMs: every idle expert is skipped (and with no rows at all the bank runs, so
    # that every weight still gets its zero gradient)
    assert experts.path("capacity", load, torch.float32) == (
        "segments" if 0 < sum(1 for r in load if r) < 6 else "bank")
    with torch.set_grad_enabled(grad):
        sparse = experts(x, load=load_t)
        whole = experts(x)
    used = torch.arange(4)[None, :] < load_t[:, None]  # [E, C]
    torch.testing.assert_close(sparse[used], whole[used], rtol=1e-5, atol=1e-6)
    if experts.path("capacity", load, torch.float32) == "segments":
        assert bool((sparse[~used] == 0).all())
    if grad:
        probe = torch.randn(6, 4, 4) * used[..., None]  # combine reads only the used rows
        got = torch.autograd.grad((sparse * probe).sum(), [x, *experts.parameters()])
        want = torch.autograd.grad((whole * probe).sum(), [x, *experts.parameters()])
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_the_capacity_layout_runs_the_bank_once_the_busiest_experts_gemm_is_large():
    experts = Experts(4, 4, 8)
    small = SEGMENT_MACS // (4 * 8) - 1  # rows whose first GEMM is just under SEGMENT_MACS
    assert experts.path("capacity", [small, 1, 0, 1], torch.float32) == "segments"
    assert experts.path("capacity", [small + 1, 1, 0, 1], torch.float32) == "bank"
    assert experts.path("capacity", [1, 1, 1, 1], torch.float32) == "bank"  # none idle
    assert experts.path("capacity", [0, 0, 1, 0], torch.float32) == "segments"  # few active


def test_the_packed_path_follows_the_segment_sizes_and_grouped_mm_runs_only_where_it_can():
    experts = Experts(4, 4, 8)
    big = SEGMENT_MACS // (4 * 8)  # rows whose first GEMM (d_model 4, width 8) is that large
    assert experts.path("packed", [0, 0, 5, 0], torch.float32) == "segments"  # few experts
    assert experts.path("packed", [big, big, big + 1, big - 1], torch.float32) == "segments"
    assert experts.path("packed", [3, 3, 3, 3], torch.float32) == "padded"  # small, even
    assert experts.path("packed", [9, 1, 1, 1], torch.float32) == "grouped_mm"  # small, uneven
    assert 4 * 9 > PAD_SLACK * 12
    assert experts.path("packed", [9, 1, 1, 1], torch.float64) == "padded"  # no float64
    assert experts.path("packed", [0, 0, 0, 0], torch.float32) == "padded"  # no rows at all
    odd = Experts(4, 4, 5)  # hidden rows 20 bytes wide: grouped_mm wants multiples of 16
    assert odd.path("packed", [9, 1, 1, 1], torch.float32) == "padded"
    x, offsets = torch.randn(12, 4), torch.tensor([0, 3, 6, 9, 12])
    torch.testing.assert_close(odd(x, offsets), torch.cat(
        [reference_ffn(odd, x[3 * e:3 * e + 3], e) for e in range(4)]), rtol=1e-5, atol=1e-6)
