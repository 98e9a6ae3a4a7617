"""moelab.kernels against moelab's torch reference (route(), the "index" backend, Experts).

On a machine without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton), in float32 and float16 (the interpreter has no
bfloat16). Shapes are tiny because the interpreter is slow. Every kernel output is allocated
poisoned (NaN, or a sentinel integer) during the kernel calls, so an element a kernel fails to
write shows up as a mismatch.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch

import moelab
from moelab import Experts, MoE, route

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from moelab.kernels import expert_ffn, fused_route, gating, permute, tile_schedule  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
POISON_INT = -1234567
D_MODEL, D_FF = 24, 40  # not multiples of the 16/32 blocks: the edges are masked


@contextmanager
def poisoned():
    """torch.empty / empty_like hand out NaN (floats) or POISON_INT (integers) while active."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(POISON_INT)
        return t

    with mock.patch.object(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k))), \
            mock.patch.object(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k))):
        yield


def make_logits(num_tokens, num_experts, scenario="random", seed=0, dtype=torch.float32):
    """Fresh random logits; "one_expert" sends every first choice to the last expert,
    "empty_expert" makes expert 0 nobody's choice."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=generator) * 2
    if scenario == "one_expert":
        logits[:, -1] += 40.0
    elif scenario == "empty_expert":
        logits[:, 0] -= 40.0
    return logits.to(dtype=dtype, device=DEVICE)


def make_routing(num_tokens, num_experts, k, drop, scenario="random", seed=0, **options):
    options = {"min_capacity": 0, **options}
    return route(make_logits(num_tokens, num_experts, scenario, seed), k=k, drop_tokens=drop,
                 training=False, **options)


def kept_rows(routing):
    """[rows] bool: buffer rows that hold a route."""
    marks = torch.ones(routing.num_tokens, 1, device=routing.slot.device)
    return moelab.dispatch(marks, routing).reshape(-1) > 0


# ----------------------------------------------------------------------------------- gating

GATING_CASES = [
    # S, E, k, drop_tokens, scenario, extra options
    (37, 4, 1, True, "random", {}),
    (37, 4, 2, True, "random", {}),
    (37, 8, 2, False, "random", {}),
    (37, 8, 1, False, "random", {}),
    (21, 1, 1, True, "random", {}),
    (21, 1, 1, False, "random", {}),
    (37, 8, 2, True, "one_expert", {}),
    (37, 8, 1, True, "empty_expert", {"capacity_factor": 0.5}),
    (37, 4, 2, False, "empty_expert", {}),
    (37, 4, 2, True, "random", {"capacity_factor": 0.5, "min_capacity": 4}),
    (37, 4, 1, True, "random", {"renormalize": True}),
    (37, 4, 2, False, "random", {"renormalize": False}),
]


@pytest.mark.parametrize("num_tokens,num_experts,k,drop,scenario,options", GATING_CASES)
def test_fused_route_equals_route(num_tokens, num_experts, k, drop, scenario, options,
                                  monkeypatch):
    monkeypatch.setattr(gating, "SCAN_BLOCK", 2)  # 5 token blocks: the scan carries over 3 steps
    logits = make_logits(num_tokens, num_experts, scenario, seed=num_tokens + num_experts + k)
    options = {"min_capacity": 0, **options}
    reference = route(logits, k=k, drop_tokens=drop, training=False, **options)
    with poisoned():
        routing = fused_route(logits, k=k, drop_tokens=drop, block_tokens=8, **options)
    assert routing.capacity == reference.capacity
    for name in ("expert", "slot", "counts"):  # the discrete table: exactly
        assert torch.equal(getattr(routing, name), getattr(reference, name)), name
    # probabilities and weights: float32 rounding (two softmax implementations)
    torch.testing.assert_close(routing.probs, reference.probs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(routing.weight, reference.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(routing.aux_loss, reference.aux_loss)
    torch.testing.assert_close(routing.z_loss, reference.z_loss)
    if scenario == "one_expert":
        assert routing.drop_fraction > 0 and (routing.expert[:, 0] == num_experts - 1).all()
    if scenario == "empty_expert":
        assert routing.counts[0] == 0


def test_fused_route_half_logits_one_block():
    logits = make_logits(32, 4, dtype=torch.float16)  # S a multiple of the block
    reference = route(logits, k=2, training=False)
    with poisoned():
        routing = fused_route(logits, k=2, block_tokens=32)
    assert torch.equal(routing.expert, reference.expert)
    assert torch.equal(routing.slot, reference.slot)
    torch.testing.assert_close(routing.weight, reference.weight, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------- permute

PERMUTE_CASES = [
    (37, 4, 1, True, "random"),
    (37, 8, 2, False, "random"),
    (37, 8, 2, True, "one_expert"),
    (21, 1, 1, True, "random"),
    (37, 4, 2, True, "empty_expert"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens,num_experts,k,drop,scenario", PERMUTE_CASES)
def test_dispatch_and_combine_equal_index_backend(num_tokens, num_experts, k, drop, scenario,
                                                  dtype):
    routing = make_routing(num_tokens, num_experts, k, drop, scenario, seed=k)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(num_tokens, D_MODEL, generator=generator).to(DEVICE, dtype)
    with poisoned():
        buffer = moelab.dispatch(x, routing, "triton")
    assert torch.equal(buffer, moelab.dispatch(x, routing, "index"))  # a gather is exact

    expert_out = torch.randn(buffer.shape, generator=generator).to(DEVICE, dtype)
    reference = moelab.combine(expert_out, routing, "index")
    # rows no route uses must not be read: poison them
    poisoned_out = expert_out.reshape(-1, D_MODEL).clone()
    poisoned_out[~kept_rows(routing)] = float("nan")
    with poisoned():
        y = moelab.combine(poisoned_out.view(buffer.shape), routing, "triton")
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(y, reference, **tol)


@pytest.mark.parametrize("num_tokens,num_experts,k,drop,scenario", PERMUTE_CASES[:3])
def test_dispatch_and_combine_gradients(num_tokens, num_experts, k, drop, scenario):
    routing = make_routing(num_tokens, num_experts, k, drop, scenario, seed=2)
    x = torch.randn(num_tokens, D_MODEL, device=DEVICE)
    results = {}
    for backend in ("index", "triton"):
        xb = x.clone().requires_grad_(True)
        weight = routing.weight.clone().requires_grad_(True)
        routed = dataclasses.replace(routing, weight=weight)
        with poisoned():
            buffer = moelab.dispatch(xb, routed, backend)
            out = buffer * 1.5 + torch.linspace(-1, 1, buffer.numel(),
                                                 device=DEVICE).view_as(buffer)
            y = moelab.combine(out, routed, backend)
            loss = (y * torch.linspace(1, 2, y.numel(), device=DEVICE).view_as(y)).sum()
            results[backend] = torch.autograd.grad(loss, [xb, weight])
    (dx_index, dw_index), (dx_triton, dw_triton) = results["index"], results["triton"]
    torch.testing.assert_close(dx_triton, dx_index)
    kept = routing.kept  # the index backend gives dropped routes a (harmless) spurious gradient
    torch.testing.assert_close(dw_triton[kept], dw_index[kept])
    assert (dw_triton[~kept] == 0).all()


# ------------------------------------------------------------------------------ grouped FFN

FFN_CASES = [
    # E, k, drop, scenario, activation, bias, dtype, scattered
    (4, 1, True, "random", "gelu", True, torch.float32, True),
    (8, 2, False, "random", "swiglu", True, torch.float32, True),
    (4, 1, False, "empty_expert", "relu", False, torch.float32, True),
    (1, 1, True, "random", "gelu", True, torch.float32, False),
    (8, 2, True, "one_expert", "swiglu", False, torch.float32, False),
    (4, 2, True, "random", "gelu", True, torch.float16, True),
    (8, 2, False, "one_expert", "swiglu", True, torch.float16, False),
]


def _reference_ffn(experts, x, routing):
    buffer = moelab.dispatch(x, routing, "index")
    if routing.capacity is not None:
        return experts(buffer)
    return experts.forward_packed(buffer, routing.offsets)


@pytest.mark.parametrize("num_experts,k,drop,scenario,activation,bias,dtype,scattered",
                         FFN_CASES)
def test_grouped_ffn_equals_experts(num_experts, k, drop, scenario, activation, bias, dtype,
                                    scattered):
    torch.manual_seed(num_experts + k)
    routing = make_routing(37, num_experts, k, drop, scenario, seed=3)
    experts = Experts(num_experts, D_MODEL, D_FF, activation=activation, bias=bias).to(DEVICE)
    x = torch.randn(37, D_MODEL, device=DEVICE)
    rows = kept_rows(routing)
    backward = dtype == torch.float32

    reference_x = x.clone().requires_grad_(backward)
    reference = _reference_ffn(experts, reference_x, routing)
    kernel_x = x.to(dtype).requires_grad_(backward)
    with poisoned():
        kernel_in = kernel_x if scattered else moelab.dispatch(kernel_x, routing, "index")
        out = expert_ffn(kernel_in, routing, experts, scattered=scattered)
    assert out.shape == reference.shape and out.dtype == dtype
    flat, flat_reference = out.reshape(-1, D_MODEL), reference.reshape(-1, D_MODEL)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(flat[rows].float(), flat_reference[rows].detach(), **tol)
    if routing.capacity is not None:
        assert (flat[~rows] == 0).all()  # empty slots: zero rows, as dispatch's buffer
    if not backward:
        return

    # gradients: dX, dW_in, db_in, dW_out, db_out against autograd through Experts
    upstream = torch.randn(flat.shape, device=DEVICE) * rows[:, None]  # kept rows only
    params = list(experts.parameters())
    with poisoned():
        kernel_grads = torch.autograd.grad((flat * upstream).sum(), [kernel_x, *params])
    reference_grads = torch.autograd.grad((flat_reference * upstream).sum(),
                                          [reference_x, *params])
    for name, got, expected in zip(["x", *(n for n, _ in experts.named_parameters())],
                                   kernel_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=name)


def test_tile_schedule_covers_each_expert_once():
    load = torch.tensor([0, 5, 16, 17, 1], device=DEVICE)
    schedule = tile_schedule(load, block_m=16)
    assert schedule.tile_expert.tolist() == [1, 2, 3, 3, 4]  # expert 0 gets no tile
    assert schedule.tile_row.tolist() == [0, 0, 0, 16, 0]
    assert schedule.offsets.tolist() == [0, 0, 5, 21, 38] and schedule.rows == 39


# -------------------------------------------------------------------------------- MoE layer

LAYER_CASES = [
    dict(num_experts=4, k=1, activation="gelu"),
    dict(num_experts=8, k=2, activation="swiglu", drop_tokens=False),
    dict(num_experts=4, k=2, activation="relu", bias=False, residual=True),
]


@pytest.mark.parametrize("options", LAYER_CASES)
def test_moe_triton_gradients_equal_index(options):
    torch.manual_seed(0)
    layer = MoE(16, 32, use_rts=False, second_expert_sampling=False, min_capacity=0,
                **options).to(DEVICE)
    x = torch.randn(2, 19, 16, device=DEVICE)
    results = {}
    for backend in ("index", "triton"):
        layer.set_backend(backend)
        xb = x.clone().requires_grad_(True)
        with poisoned():
            y, routing = layer(xb)
            loss = (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)).sum() \
                + 0.01 * routing.aux_loss
            grads = torch.autograd.grad(loss, [xb, *layer.parameters()])
        results[backend] = (y.detach(), routing.slot, grads)
    (y_i, slot_i, grads_i), (y_t, slot_t, grads_t) = results["index"], results["triton"]
    assert torch.equal(slot_i, slot_t)
    if options.get("drop_tokens", True):
        assert (slot_t < 0).any(), "the case should drop some routes"
    torch.testing.assert_close(y_t, y_i, rtol=1e-5, atol=1e-6)
    names = ["x", *(n for n, _ in layer.named_parameters())]
    for name, got, expected in zip(names, grads_t, grads_i, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)


def index_then_triton(layer, x):
    """The layer's (y, Routing) without autograd with backend "index", then with "triton"
    (outputs poisoned), in that order."""
    with torch.no_grad():
        layer.set_backend("index")
        reference = layer(x)
        layer.set_backend("triton")
        with poisoned():
            return reference, layer(x)


def test_moe_triton_expert_choice_and_half_forward():
    torch.manual_seed(1)
    layer = MoE(16, 32, 4, k=1, choice="expert").to(DEVICE).eval()
    x = torch.randn(21, 16, device=DEVICE)
    for dtype in (torch.float32, torch.float16):
        layer, x = layer.to(dtype), x.to(dtype)
        (reference, routing), (y, routing_triton) = index_then_triton(layer, x)
        assert torch.equal(routing.slot, routing_triton.slot)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(y, reference, **tol)


@pytest.mark.parametrize("options", [dict(num_experts=4, k=1), dict(num_experts=8, k=2),
                                     dict(num_experts=4, k=2, drop_tokens=False)])
def test_moe_triton_eval_routes_with_the_fused_gate(options, monkeypatch):
    """In eval under no_grad, backend "triton" routes with fused_route (counted through a spy)
    and gives the "index" backend's routing and output; training and grad-enabled calls do not
    use it."""
    from moelab.kernels import gating

    calls = []
    real = gating.fused_route
    monkeypatch.setattr(gating, "fused_route", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.manual_seed(2)
    layer = MoE(16, 32, min_capacity=0, **options).to(DEVICE).eval()
    x = torch.randn(37, 16, device=DEVICE)
    (reference, routing), (y, fused) = index_then_triton(layer, x)
    assert calls == [1]
    assert torch.equal(fused.expert, routing.expert) and torch.equal(fused.slot, routing.slot)
    torch.testing.assert_close(fused.counts, routing.counts)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-6)
    layer(x)  # grad enabled: the gate's logits need a backward, so route() runs
    layer.train()(x)
    assert calls == [1]


# ------------------------------------------------------------------------------- bad inputs

def test_bad_inputs_raise_clear_errors():
    logits = make_logits(8, 4)
    with pytest.raises(ValueError, match="k = 1 and k = 2"):
        fused_route(logits, k=3)
    with pytest.raises(ValueError, match="float64"):
        fused_route(logits.double())
    with pytest.raises(ValueError, match="power of 2"):
        fused_route(logits, block_tokens=12)
    with pytest.raises(ValueError, match="no backward"):
        fused_route(logits.clone().requires_grad_(True))
    with pytest.raises(ValueError, match="NaN or Inf"):
        fused_route(logits.masked_fill(logits > 1, float("nan")))
    routing = route(logits, training=False)
    with pytest.raises(ValueError, match=r"x must be \[tokens=8, d\]"):
        permute.dispatch(torch.randn(7, 4, device=DEVICE), routing)
    with pytest.raises(ValueError, match="expert_out must be"):
        permute.combine(torch.randn(3, 4, device=DEVICE), routing)
    experts = Experts(4, 8, 16).to(DEVICE)
    with pytest.raises(ValueError, match="routing has 2 experts, the bank 4"):
        expert_ffn(torch.randn(8, 8, device=DEVICE), route(make_logits(8, 2)), experts)
    with pytest.raises(ValueError, match=r"tokens \[S=8, d=8\]"):
        expert_ffn(torch.randn(8, 5, device=DEVICE), routing, experts)
    with pytest.raises(ValueError, match="three powers of 2"):
        expert_ffn(torch.randn(8, 8, device=DEVICE), routing, experts, blocks=(16, 24, 16))
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="no bfloat16"):
            permute.dispatch(torch.randn(8, 4, dtype=torch.bfloat16), routing)


_NO_TRITON = """
import sys
sys.modules["triton"] = None  # as if triton were not installed
import moelab, torch
try:
    moelab.MoE(8, 16, 4, backend="triton")
except ImportError as error:
    assert "pip install moelab[kernels]" in str(error), error
else:
    raise AssertionError("no error without triton")
y, _ = moelab.MoE(8, 16, 4)(torch.randn(3, 8))  # the library still runs
print("ok")
"""

_NO_INTERPRETER = """
import torch
import moelab
from moelab.kernels import permute
try:
    moelab.MoE(8, 16, 4, backend="triton")
except RuntimeError as error:
    assert "TRITON_INTERPRET=1" in str(error), error
else:
    raise AssertionError("no error on a CPU without the interpreter")
routing = moelab.route(torch.randn(6, 4), training=False)
try:
    permute.dispatch(torch.randn(6, 8), routing)
except RuntimeError as error:
    assert "TRITON_INTERPRET=1" in str(error), error
else:
    raise AssertionError("no error launching on CPU tensors without the interpreter")
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only messages")
@pytest.mark.parametrize("script,env", [(_NO_TRITON, {}), (_NO_INTERPRETER,
                                                            {"TRITON_INTERPRET": "0"})])
def test_missing_triton_or_interpreter_says_what_to_do(script, env):
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, env={**environ, **env}, cwd=REPO)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr + result.stdout


# ------------------------------------------------------------------ GPU compilation, no GPU

_COMPILE_FOR_GPU = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
if "nvidia" not in triton.backends.backends:
    print("SKIP no nvidia backend"); raise SystemExit(0)
from moelab.kernels import gating, grouped_ffn, permute

def compile_for_sm90(fn, pointers, constexprs, **options):
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32")
                 for name in fn.arg_names}
    constants = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    try:
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants),
                                target=GPUTarget("cuda", 90, 32), options=options)
        print("OK", fn.__name__, "cubin" in kernel.asm)
    except Exception as error:  # report every failure, not just the first
        print("ERR", fn.__name__, constexprs, str(error)[-1500:])

i64, i32, f32, bf16 = "*i64", "*i32", "*fp32", "*bf16"
compile_for_sm90(gating._gate_block_kernel, dict(logits_ptr=bf16, probs_ptr=f32, expert_ptr=i64,
    gate_ptr=f32, rank_ptr=i64, hist_ptr=i32), dict(K=2, BLOCK_S=64, BLOCK_E=64))
compile_for_sm90(gating._scan_kernel, dict(hist_ptr=i32, counts_ptr=i64),
                 dict(K=2, BLOCK_B=64, BLOCK_E=64))
compile_for_sm90(gating._slot_kernel, dict(expert_ptr=i64, weight_ptr=f32, slot_ptr=i64,
    start_ptr=i32, eps="fp32"), dict(K=2, DROPLESS=False, RENORMALIZE=True, BLOCK_S=64))
compile_for_sm90(permute._source_rows_kernel, dict(expert_ptr=i64, slot_ptr=i64, base_ptr=i64,
    source_ptr=i64), dict(K=2, BLOCK=256))
compile_for_sm90(permute._gather_kernel, dict(x_ptr=bf16, source_ptr=i64, out_ptr=bf16),
                 dict(BLOCK_R=32, BLOCK_D=128))
compile_for_sm90(permute._combine_kernel, dict(out_ptr=bf16, expert_ptr=i64, slot_ptr=i64,
    weight_ptr=f32, base_ptr=i64, y_ptr=bf16), dict(K=2, HAS_WEIGHT=True, BLOCK_S=16,
    BLOCK_D=128))
compile_for_sm90(permute._combine_backward_kernel, dict(dy_ptr=bf16, out_ptr=bf16,
    expert_ptr=i64, slot_ptr=i64, weight_ptr=f32, base_ptr=i64, d_out_ptr=bf16,
    d_weight_ptr=f32), dict(K=2, K_PAD=2, NEED_D_WEIGHT=True, BLOCK_S=16, BLOCK_D=128))
gemm = dict(a_ptr=bf16, a_index_ptr=i64, b_ptr=bf16, bias_ptr=bf16, c_ptr=bf16, pre_ptr=bf16,
            tile_expert_ptr=i32, tile_row_ptr=i32, load_ptr=i64, a_base_ptr=i64, c_base_ptr=i64)
for act, backward, swiglu_fwd, block_m, block_n, block_k in [(3, False, True, 64, 64, 32),
                                                            (1, True, False, 32, 64, 32)]:
    compile_for_sm90(grouped_ffn._grouped_gemm_kernel, gemm, dict(
        GATHER_A=not backward, ACT=act, BACKWARD=backward, HAS_BIAS=not backward,
        STORE_PRE=not backward, SWIGLU_FWD=swiglu_fwd, PRECISION="tf32", BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k), num_warps=8 if block_m * block_n >= 16384 else 4)
compile_for_sm90(grouped_ffn._grouped_wgrad_kernel, dict(a_ptr=bf16, a_index_ptr=i64,
    b_ptr=bf16, dw_ptr=bf16, db_ptr=bf16, load_ptr=i64, a_base_ptr=i64, b_base_ptr=i64),
    dict(GATHER_A=True, HAS_BIAS=True, PRECISION="tf32", BLOCK_M=64, BLOCK_N=64, BLOCK_K=32))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels for real")
def test_kernels_compile_for_a_gpu_target():
    """The interpreter runs Python; it does not see what only the GPU compiler rejects
    (non-constexpr globals, dtype rules of tl.dot, ...). Compile every kernel for sm_90 (bf16)
    to a cubin with the ptxas shipped in the triton wheel: no GPU needed."""
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_GPU], capture_output=True,
                            text=True, timeout=170, env=environ, cwd=REPO)
    if "SKIP" in result.stdout:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.startswith("ERR")], result.stdout
    assert sum(line.startswith("OK") and line.endswith("True") for line in lines) == 10, lines


# -------------------------------------------------------------------------------- benchmark

def test_bench_kernels_dry_run():
    env = {**os.environ, "TRITON_INTERPRET": "1"} if DEVICE == "cpu" else dict(os.environ)
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_kernels.py"),
                             "--dry-run"], capture_output=True, text=True, timeout=170,
                            env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-4000:]
    out = result.stdout
    for heading in ("## Ceilings", "## Grouped expert FFN", "## Decode", "## Gating and permute",
                    "## MoE layer", "## Bytes not copied"):
        assert heading in out, (heading, out)
    table_rows = [line for line in out.splitlines() if line.startswith("|") and "---" not in line]
    assert len(table_rows) >= 12, out
    assert "dry run" in out.lower()
    assert "nan" not in out.lower().replace("n/a", "")
