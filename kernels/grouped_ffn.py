"""The expert FFN as a grouped GEMM over variable-size expert segments, forward and backward.

Every kept route is one row of a packed, expert-sorted space of N rows (expert e owns rows
``offsets[e] : offsets[e] + load[e]``; ``load[e]`` = routes expert e keeps). The work is cut into
tiles of BLOCK_M rows that never straddle two experts, and the tile list, built once per call from
the per-expert loads, is the *schedule*: program (t, n) of a launch computes tile t's rows of the
output columns n·BLOCK_N ..., with expert ``tile_expert[t]``'s weights. One launch covers every
expert whatever its load (an expert with no routes simply has no tiles), so nothing is padded to
the largest expert and nothing is computed for empty capacity slots.

Kernels:

- ``_grouped_gemm_kernel``: C[rows] = epilogue(A[rows] @ B[e]) over the schedule. A's rows are
  read either contiguously (``a_base[e] + local row``) or *through the mapping table*
  (``a_index[a_base[e] + local row]``, the token id of that route: ScatterMoE's scattered input),
  which is how the first GEMM reads the tokens [S, d] directly, so the permuted copy [N, d] that
  ``dispatch`` would write (and the GEMM would read back) never exists. Epilogues: bias and
  activation (GELU with erf, ReLU, SwiGLU from two accumulators, gate and up), optionally storing
  the pre-activation for the backward; or, in the backward, the activation's derivative applied
  to dH (so dZ comes out of the dH GEMM without another pass).
- ``_grouped_wgrad_kernel``: dW[e] = A_eᵀ @ B_e over expert e's rows (a loop of data-dependent
  length, load[e]), grid (E, M blocks, N blocks); the programs with pid_m = 0 also sum B's columns,
  the bias gradient. A's rows can again be read through the mapping table (dW_in = Xᵀ dZ reads
  the tokens in place).

Forward: H = act(X[table] W_in[e] + b_in[e]) (packed [N, f]); OUT = H W_out[e] + b_out[e], written
in the layout ``moelab.dispatch`` uses ([E, C, d], zero rows for empty slots, or packed [N, d]).
Backward from dOUT: dZ = act'(Z) ⊙ (dOUT W_out[e]ᵀ); dW_out = Hᵀ dOUT, db_out; dW_in = X[table]ᵀ dZ,
db_in; dX_routes = dZ W_in[e]ᵀ, summed over each token's k routes by the combine kernel (unit
weights). The gate weights are applied by ``moelab.kernels.combine`` after this.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from moelab.experts import Experts
from moelab.routing import Routing

from . import GROUPED_FFN_ACTIVATIONS
from ._runtime import check_launch, is_interpreted, tl, triton
from .permute import Table, _combine, layout, source_rows

__all__ = ["expert_ffn", "tile_schedule", "Schedule"]

_ACT = {"none": 0, "gelu": 1, "relu": 2, "swiglu": 3}
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, a_index_ptr, b_ptr, bias_ptr, c_ptr, pre_ptr,
    tile_expert_ptr, tile_row_ptr, load_ptr, a_base_ptr, c_base_ptr,
    N, K, up_offset,
    stride_am, stride_be, stride_bk, stride_bn, stride_bias, stride_cm, stride_pre,
    GATHER_A: tl.constexpr, ACT: tl.constexpr, BACKWARD: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE_PRE: tl.constexpr, SWIGLU_FWD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    local = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)  # rows inside expert's segment
    row_ok = local < tl.load(load_ptr + expert)
    if GATHER_A:  # scattered input: the token of each route, through the mapping table
        a_row = tl.load(a_index_ptr + tl.load(a_base_ptr + expert) + local, mask=row_ok, other=0)
    else:
        a_row = tl.load(a_base_ptr + expert) + local
    a_row = a_row.to(tl.int64)
    c_row = (tl.load(c_base_ptr + expert) + local).to(tl.int64)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = col < N
    kk = tl.arange(0, BLOCK_K)
    b_expert = b_ptr + expert.to(tl.int64) * stride_be

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if SWIGLU_FWD:
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + kk) < K
        a = tl.load(a_ptr + a_row[:, None] * stride_am + (k0 + kk)[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_ptrs = b_expert + (k0 + kk)[:, None] * stride_bk + col[None, :] * stride_bn
        b_mask = k_ok[:, None] & col_ok[None, :]
        b = tl.load(b_ptrs, mask=b_mask, other=0.0).to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if SWIGLU_FWD:
            b_up = tl.load(b_ptrs + up_offset * stride_bn, mask=b_mask, other=0.0).to(a.dtype)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)

    mask = row_ok[:, None] & col_ok[None, :]
    c_ptrs = c_ptr + c_row[:, None] * stride_cm + col[None, :]
    if BACKWARD:
        # acc = dH; write dZ = dH ⊙ act'(Z), Z read back from the forward's pre-activation.
        pre_ptrs = pre_ptr + c_row[:, None] * stride_pre + col[None, :]
        z = tl.load(pre_ptrs, mask=mask, other=0.0).to(tl.float32)
        if ACT == 1:  # d/dz [z Φ(z)] = Φ(z) + z φ(z)
            cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
            out = acc * (cdf + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI)
        elif ACT == 2:
            out = tl.where(z > 0, acc, 0.0)
        elif ACT == 3:  # h = silu(g) · u: dg = dh · u · σ(g)(1 + g(1 - σ(g))), du = dh · silu(g)
            up = tl.load(pre_ptrs + up_offset, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            tl.store(c_ptrs + up_offset, (acc * z * sig).to(c_ptr.dtype.element_ty), mask=mask)
            out = acc * up * sig * (1.0 + z * (1.0 - sig))
        else:
            out = acc
    else:
        if HAS_BIAS:
            bias_ptrs = bias_ptr + expert.to(tl.int64) * stride_bias + col
            acc += tl.load(bias_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if SWIGLU_FWD:
                acc_up += tl.load(bias_ptrs + up_offset, mask=col_ok,
                                  other=0.0).to(tl.float32)[None, :]
        if STORE_PRE:
            pre_ptrs = pre_ptr + c_row[:, None] * stride_pre + col[None, :]
            tl.store(pre_ptrs, acc.to(pre_ptr.dtype.element_ty), mask=mask)
            if SWIGLU_FWD:
                tl.store(pre_ptrs + up_offset, acc_up.to(pre_ptr.dtype.element_ty), mask=mask)
        if ACT == 1:  # GELU, erf form (torch's default)
            out = 0.5 * acc * (1.0 + tl.math.erf(acc * _SQRT1_2))
        elif ACT == 2:
            out = tl.maximum(acc, 0.0)
        elif ACT == 3:  # SwiGLU: silu(gate) · up
            out = acc * tl.sigmoid(acc) * acc_up
        else:
            out = acc
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_wgrad_kernel(
    a_ptr, a_index_ptr, b_ptr, dw_ptr, db_ptr, load_ptr, a_base_ptr, b_base_ptr,
    M, N, stride_am, stride_bm, stride_dw_e, stride_dw_m, stride_db,
    GATHER_A: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW[e] = A_eᵀ B_e ([M, N]) over expert e's load[e] rows; db[e] = Σ_rows B_e."""
    expert = tl.program_id(0)
    pid_m = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N
    rows = tl.load(load_ptr + expert)
    a_base = tl.load(a_base_ptr + expert)
    b_base = tl.load(b_base_ptr + expert)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_K):
        local = r0 + kk
        ok = local < rows
        if GATHER_A:
            a_row = tl.load(a_index_ptr + a_base + local, mask=ok, other=0)
        else:
            a_row = a_base + local
        a = tl.load(a_ptr + a_row.to(tl.int64)[:, None] * stride_am + m[None, :],
                    mask=ok[:, None] & m_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
        b = tl.load(b_ptr + (b_base + local).to(tl.int64)[:, None] * stride_bm + n[None, :],
                    mask=ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(tl.trans(a), b.to(a.dtype), acc, input_precision=PRECISION)
        if HAS_BIAS:
            bias_acc += tl.sum(b.to(tl.float32), axis=0)
    tl.store(dw_ptr + expert.to(tl.int64) * stride_dw_e + m[:, None] * stride_dw_m + n[None, :],
             acc.to(dw_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    if HAS_BIAS:
        if pid_m == 0:
            tl.store(db_ptr + expert * stride_db + n, bias_acc.to(db_ptr.dtype.element_ty),
                     mask=n_ok)


# ------------------------------------------------------------------------------- host side

class Schedule(NamedTuple):
    """Which program does what: tile t covers rows ``tile_row[t] : tile_row[t] + block_m`` of
    expert ``tile_expert[t]``'s segment (rows past ``load[e]`` masked)."""

    tile_expert: Tensor  # [T] int32
    tile_row: Tensor  # [T] int32: first row of the tile inside its expert's segment
    load: Tensor  # [E] long: routes each expert keeps
    offsets: Tensor  # [E] long: first packed row of each expert
    rows: int  # N = Σ load
    block_m: int


def tile_schedule(routing_or_load: Routing | Tensor, block_m: int = 16,
                  load_host: Tensor | None = None) -> Schedule:
    """The (expert, row-tile) pairs one grouped-GEMM launch runs, from a Routing (or loads [E]).

    The grid size is the number of tiles, so the loads must reach the host: pass ``load_host``
    when the caller already copied them, else this copies them (one wait for the device)."""
    load = routing_or_load.load if isinstance(routing_or_load, Routing) else routing_or_load
    device = load.device
    if load_host is None:
        load_host = load.cpu()
    tiles = (load_host + block_m - 1) // block_m  # [E]
    tile_expert = torch.repeat_interleave(torch.arange(load_host.numel()), tiles)  # [T]
    first_tile = torch.cumsum(tiles, 0) - tiles
    tile_row = (torch.arange(tile_expert.numel()) - first_tile[tile_expert]) * block_m
    offsets = torch.cumsum(load_host, 0) - load_host
    return Schedule(tile_expert.to(device=device, dtype=torch.int32),
                    tile_row.to(device=device, dtype=torch.int32), load.to(device),
                    offsets.to(device), int(load_host.sum()), block_m)


class _Plan(NamedTuple):
    table: Table  # layout of the expert outputs (and of the input when not scattered)
    schedule: Schedule
    source: Tensor | None  # [layout rows]: token of each row (scattered input), else None
    activation: str
    blocks: tuple[int, int, int]  # BLOCK_M, BLOCK_N, BLOCK_K
    store_pre: bool


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision products (torch.matmul's default); 16-bit inputs: tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def _gemm(plan: _Plan, a, a_index, a_base, b, b_strides, bias, c, c_base, n_cols, k_dim, *,
          act: str = "none", backward: bool = False, pre=None, store_pre: bool = False,
          up_offset: int = 0) -> None:
    schedule = plan.schedule
    block_m, block_n, block_k = plan.blocks
    num_tiles = schedule.tile_expert.numel()
    if num_tiles == 0 or n_cols == 0:
        return
    _grouped_gemm_kernel[(num_tiles, triton.cdiv(n_cols, block_n))](
        a, a_index if a_index is not None else schedule.load, b,
        bias if bias is not None else b, c, pre if pre is not None else c,
        schedule.tile_expert, schedule.tile_row, schedule.load, a_base, c_base,
        n_cols, k_dim, up_offset,
        a.stride(0), *b_strides, bias.stride(0) if bias is not None else 0, c.stride(0),
        pre.stride(0) if pre is not None else 0,
        GATHER_A=a_index is not None, ACT=_ACT[act], BACKWARD=backward,
        HAS_BIAS=bias is not None, STORE_PRE=store_pre,
        SWIGLU_FWD=act == "swiglu" and not backward, PRECISION=_precision(a.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=8 if block_m * block_n >= 128 * 128 else 4, num_stages=3)


def _wgrad(plan: _Plan, a, a_index, a_base, b, b_base, dw, db) -> None:
    schedule = plan.schedule
    num_experts, m_dim, n_dim = dw.shape
    block = 32 if is_interpreted(_grouped_wgrad_kernel) else 64
    _grouped_wgrad_kernel[(num_experts, triton.cdiv(m_dim, block), triton.cdiv(n_dim, block))](
        a, a_index if a_index is not None else schedule.load, b, dw,
        db if db is not None else dw, schedule.load, a_base, b_base, m_dim, n_dim,
        a.stride(0), b.stride(0), dw.stride(0), dw.stride(1), db.stride(0) if db is not None else 0,
        GATHER_A=a_index is not None, HAS_BIAS=db is not None, PRECISION=_precision(a.dtype),
        BLOCK_M=block, BLOCK_N=block, BLOCK_K=32, num_warps=4, num_stages=3)


class _ExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, b_out, plan: _Plan):
        table, schedule = plan.table, plan.schedule
        d_ff, d_model = w_out.shape[1], w_out.shape[2]
        width = w_in.shape[2]
        packed = schedule.rows
        # H = act(X W_in[e] + b_in[e]): packed [N, f]; Z (pre-activation) kept for the backward
        h = torch.empty(packed, d_ff, dtype=x.dtype, device=x.device)
        pre = (torch.empty(packed, width, dtype=x.dtype, device=x.device)
               if plan.store_pre else None)
        _gemm(plan, x, plan.source, table.base, w_in,
              (w_in.stride(0), w_in.stride(1), w_in.stride(2)), b_in, h, schedule.offsets,
              d_ff, d_model, act=plan.activation, pre=pre, store_pre=plan.store_pre,
              up_offset=d_ff)
        # OUT = H W_out[e] + b_out[e], in the dispatch layout (empty capacity rows stay 0)
        alloc = torch.zeros if table.capacity_layout else torch.empty
        out = alloc(table.rows, d_model, dtype=x.dtype, device=x.device)
        _gemm(plan, h, None, schedule.offsets, w_out,
              (w_out.stride(0), w_out.stride(1), w_out.stride(2)), b_out, out, table.base,
              d_model, d_ff)
        ctx.plan = plan
        ctx.save_for_backward(x, w_in, w_out, h, pre)
        ctx.has_bias = (b_in is not None, b_out is not None)
        return out

    @staticmethod
    def backward(ctx, d_out):
        x, w_in, w_out, h, pre = ctx.saved_tensors
        plan = ctx.plan
        table, schedule = plan.table, plan.schedule
        need_x, need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad[:5]
        d_out = d_out.contiguous()
        d_ff, d_model = w_out.shape[1], w_out.shape[2]
        width = w_in.shape[2]
        dx = dw_in = db_in = dw_out = db_out = None

        if need_w_out or need_b_out:
            dw_out = torch.empty_like(w_out)
            db_out = (torch.empty(w_out.shape[0], d_model, dtype=w_out.dtype, device=x.device)
                      if ctx.has_bias[1] else None)
            _wgrad(plan, h, None, schedule.offsets, d_out, table.base, dw_out, db_out)
        if need_x or need_w_in or need_b_in:
            # dZ = act'(Z) ⊙ (dOUT W_out[e]ᵀ): B[k, n] = W_out[e, n, k] (strides swapped, no copy)
            dz = torch.empty(schedule.rows, width, dtype=x.dtype, device=x.device)
            _gemm(plan, d_out, None, table.base, w_out,
                  (w_out.stride(0), w_out.stride(2), w_out.stride(1)), None, dz,
                  schedule.offsets, d_ff, d_model, act=plan.activation, backward=True, pre=pre,
                  up_offset=d_ff)
            if need_w_in or need_b_in:
                dw_in = torch.empty_like(w_in)
                db_in = (torch.empty(w_in.shape[0], width, dtype=w_in.dtype, device=x.device)
                         if ctx.has_bias[0] else None)
                _wgrad(plan, x, plan.source, table.base, dz, schedule.offsets, dw_in, db_in)
            if need_x:
                w_in_t = (w_in.stride(0), w_in.stride(2), w_in.stride(1))  # B[k, n] = W_in[e,n,k]
                if plan.source is not None:
                    # per-route dX rows (packed), then each token sums its k routes' rows
                    dx_routes = torch.empty(schedule.rows, d_model, dtype=x.dtype,
                                            device=x.device)
                    _gemm(plan, dz, None, schedule.offsets, w_in, w_in_t, None, dx_routes,
                          schedule.offsets, d_model, width)
                    packed = Table(table.expert, table.slot, schedule.offsets, schedule.rows,
                                   False)
                    dx = _combine(dx_routes, packed, None, x.dtype)
                else:
                    alloc = torch.zeros if table.capacity_layout else torch.empty
                    dx = alloc(x.shape, dtype=x.dtype, device=x.device)
                    _gemm(plan, dz, None, schedule.offsets, w_in, w_in_t, None, dx, table.base,
                          d_model, width)
        return (dx, dw_in, db_in if need_b_in else None, dw_out,
                db_out if need_b_out else None, None)


def _blocks(max_load: int, interpreted: bool) -> tuple[int, int, int]:
    """BLOCK_M, BLOCK_N, BLOCK_K. Few rows per expert (decode) is a weight-streaming problem:
    small M tiles, wide K; many rows is compute-bound: large square-ish tiles."""
    if interpreted:
        return 16, 32, 32
    block_m = 16 if max_load <= 16 else 32 if max_load <= 32 else 64 if max_load <= 64 else 128
    return block_m, 64 if block_m <= 32 else 128, 128 if block_m <= 32 else 64


def expert_ffn(x: Tensor, routing: Routing, experts: Experts, *, scattered: bool = True,
               blocks: tuple[int, int, int] | None = None) -> Tensor:
    """The experts' FFN on every kept route, in the layout ``moelab.dispatch`` produces.

    Args:
        x: with ``scattered=True`` (the default) the tokens [S, d] in token order: the first GEMM
            reads each route's row through the mapping table, and no permuted copy is made. With
            ``scattered=False``, the dispatched buffer ([E, C, d] or packed [N, d]).
        routing: the mapping table.
        experts: the ``moelab.Experts`` bank whose weights to use (gradients flow to them).
        blocks: (BLOCK_M, BLOCK_N, BLOCK_K) override, powers of 2 and >= 16.

    Returns [E, C, d] (capacity; rows of empty slots are 0) or packed [N, d] (dropless), equal to
    ``experts(dispatch(x, routing))`` / ``experts.forward_packed(...)`` on every kept row.
    """
    if not isinstance(experts, Experts):
        raise ValueError(f"experts must be a moelab.Experts; got {type(experts).__name__}")
    if not isinstance(routing, Routing):
        raise ValueError(f"routing must be a moelab.Routing; got {type(routing).__name__}")
    if experts.activation not in GROUPED_FFN_ACTIVATIONS:
        raise ValueError(f"the grouped FFN kernel computes {GROUPED_FFN_ACTIVATIONS}; these "
                         f"experts use {experts.activation!r}: use backend='index'")
    if routing.num_experts != experts.num_experts:
        raise ValueError(f"routing has {routing.num_experts} experts, the bank "
                         f"{experts.num_experts}")
    load = routing.load  # [E] on the device
    load_host = load.cpu()  # the one wait for the device: grid size, tile sizes and N need it
    table = layout(routing, load_host)
    d_model = experts.d_model
    if scattered:
        if x.dim() != 2 or x.shape != (routing.num_tokens, d_model):
            raise ValueError(f"x must be the tokens [S={routing.num_tokens}, d={d_model}]; got "
                             f"{tuple(x.shape)}")
    elif x.shape[-1] != d_model or x.numel() != table.rows * d_model:
        raise ValueError(f"x must be the dispatched buffer ({table.rows} rows of d={d_model}); "
                         f"got {tuple(x.shape)}")
    params = [p for p in (experts.w_in, experts.b_in, experts.w_out, experts.b_out)
              if p is not None]
    check_launch(_grouped_gemm_kernel, x, *params)
    x2d = x.reshape(-1, d_model)
    x2d = x2d if x2d.stride(1) == 1 else x2d.contiguous()
    max_load = int(load_host.max()) if load_host.numel() else 0
    chosen = blocks or _blocks(max_load, is_interpreted(_grouped_gemm_kernel))
    if len(chosen) != 3 or any(b < 16 or b & (b - 1) for b in chosen):
        raise ValueError(f"blocks must be three powers of 2 >= 16; got {chosen}")
    schedule = tile_schedule(load, chosen[0], load_host)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or
                                              any(p.requires_grad for p in params))
    plan = _Plan(table, schedule, source_rows(table) if scattered else None,
                 experts.activation, tuple(chosen), needs_grad)
    out = _ExpertFFN.apply(x2d, experts.w_in, experts.b_in, experts.w_out, experts.b_out, plan)
    if table.capacity_layout:
        return out.view(routing.num_experts, routing.capacity, d_model)
    return out
