"""Permute and combine from the mapping table: the paper's data-layout transforms (§5.4).

The einsum path multiplies an [S, E, C] one-hot mask into the tokens (S·E·C·d multiply-adds, all
but S·k·d of them by zero). With the mapping table the same buffers are a gather and a weighted
gather, S·k·d work:

- ``_source_rows_kernel``: for every kept route (s, j), ``source[base[e] + slot] = s``: the token
  each buffer row holds (-1 for an empty row). Integers only; the grouped FFN reads its input rows
  through this table.
- ``_gather_kernel``, grid (row blocks, column blocks): ``buffer[r] = x[source[r]]`` (0 for empty
  rows). This is ``dispatch``; the MoE layer's Triton path skips it (the GEMM gathers).
- ``_combine_kernel``, grid (token blocks, column blocks): ``y[s] = Σ_j w[s, j] · out[row(s, j)]``
  with ``row = base[expert] + slot``, summing the k routes in registers (no [S, k, d] temporary).
  With unit weights it is also the backward of dispatch (each token gathers its routes' grads).
- ``_combine_backward_kernel``, grid (token blocks): ``d_out[row(s, j)] = w[s, j] · dy[s]`` and
  ``d_w[s, j] = <dy[s], out[row(s, j)]>``.

``base[e]`` is e·C in the capacity layout [E, C, d] and the packed offset of expert e in the
dropless layout [N, d] (``Routing.offsets``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from moelab.routing import Routing

from ._runtime import check_launch, next_power_of_2, tl, triton

__all__ = ["dispatch", "combine", "layout", "source_rows", "Table"]


@triton.jit
def _source_rows_kernel(expert_ptr, slot_ptr, base_ptr, source_ptr, num_routes,
                        K: tl.constexpr, BLOCK: tl.constexpr):
    route = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = route < num_routes
    slot = tl.load(slot_ptr + route, mask=ok, other=-1)
    kept = ok & (slot >= 0)
    expert = tl.load(expert_ptr + route, mask=kept, other=0)
    row = tl.load(base_ptr + expert, mask=kept, other=0) + slot
    tl.store(source_ptr + row, route // K, mask=kept)


@triton.jit
def _gather_kernel(x_ptr, source_ptr, out_ptr, num_rows, width, stride_x, stride_out,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = row < num_rows
    col_ok = col < width
    source = tl.load(source_ptr + row, mask=row_ok, other=-1)
    filled = source >= 0
    values = tl.load(x_ptr + source[:, None].to(tl.int64) * stride_x + col[None, :],
                     mask=filled[:, None] & col_ok[None, :], other=0.0)
    tl.store(out_ptr + row[:, None].to(tl.int64) * stride_out + col[None, :], values,
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(out_ptr, expert_ptr, slot_ptr, weight_ptr, base_ptr, y_ptr,
                    num_tokens, width, stride_out, stride_y,
                    K: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    col = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_ok = token < num_tokens
    col_ok = col < width
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(K):
        route = token * K + j
        slot = tl.load(slot_ptr + route, mask=token_ok, other=-1)
        kept = token_ok & (slot >= 0)
        expert = tl.load(expert_ptr + route, mask=kept, other=0)
        row = tl.load(base_ptr + expert, mask=kept, other=0) + slot
        values = tl.load(out_ptr + row[:, None].to(tl.int64) * stride_out + col[None, :],
                         mask=kept[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            weight = tl.load(weight_ptr + route, mask=kept, other=0.0).to(tl.float32)
            values = values * weight[:, None]
        acc += values
    tl.store(y_ptr + token[:, None].to(tl.int64) * stride_y + col[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=token_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_backward_kernel(dy_ptr, out_ptr, expert_ptr, slot_ptr, weight_ptr, base_ptr,
                             d_out_ptr, d_weight_ptr, num_tokens, width,
                             stride_dy, stride_out, stride_d_out,
                             K: tl.constexpr, K_PAD: tl.constexpr, NEED_D_WEIGHT: tl.constexpr,
                             BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    token_ok = token < num_tokens
    choice = tl.arange(0, K_PAD)
    d_weight = tl.zeros([BLOCK_S, K_PAD], dtype=tl.float32)
    for start in range(0, width, BLOCK_D):
        col = start + tl.arange(0, BLOCK_D)
        col_ok = col < width
        dy = tl.load(dy_ptr + token[:, None].to(tl.int64) * stride_dy + col[None, :],
                     mask=token_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        for j in tl.static_range(K):
            route = token * K + j
            slot = tl.load(slot_ptr + route, mask=token_ok, other=-1)
            kept = token_ok & (slot >= 0)
            expert = tl.load(expert_ptr + route, mask=kept, other=0)
            row = (tl.load(base_ptr + expert, mask=kept, other=0) + slot).to(tl.int64)
            mask = kept[:, None] & col_ok[None, :]
            weight = tl.load(weight_ptr + route, mask=kept, other=0.0).to(tl.float32)
            tl.store(d_out_ptr + row[:, None] * stride_d_out + col[None, :],
                     (dy * weight[:, None]).to(d_out_ptr.dtype.element_ty), mask=mask)
            if NEED_D_WEIGHT:
                out = tl.load(out_ptr + row[:, None] * stride_out + col[None, :], mask=mask,
                              other=0.0).to(tl.float32)
                partial = tl.sum(dy * out, axis=1)  # [BLOCK_S]
                d_weight += tl.where(choice[None, :] == j, partial[:, None], 0.0)
    if NEED_D_WEIGHT:
        tl.store(d_weight_ptr + token[:, None] * K + choice[None, :], d_weight,
                 mask=token_ok[:, None] & (choice[None, :] < K))


# ------------------------------------------------------------------------------- host side

class Table(NamedTuple):
    """The mapping table as the kernels read it: contiguous [S, k] experts and slots, plus the
    buffer layout (``rows`` rows, expert e's slot 0 at row ``base[e]``)."""

    expert: Tensor  # [S, k] long
    slot: Tensor  # [S, k] long, -1 where dropped
    base: Tensor  # [E] long: row of slot 0 of each expert
    rows: int  # E·C (capacity) or N (dropless)
    capacity_layout: bool

    @property
    def k(self) -> int:
        return self.expert.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.expert.shape[0]


def layout(routing: Routing, load_host: Tensor | None = None) -> Table:
    """The kernels' view of a Routing.

    Capacity: E·C rows, base[e] = e·C. Dropless: N kept routes, base[e] = the packed offset; N
    is read from ``load_host`` (the loads already copied to the host) when given, else from the
    device (one wait)."""
    _check_routing(routing)
    if routing.capacity is not None:
        base = torch.arange(routing.num_experts, device=routing.slot.device) * routing.capacity
        rows = routing.num_experts * routing.capacity
    else:
        offsets = routing.offsets
        base = offsets[:-1].contiguous()
        rows = int(load_host.sum()) if load_host is not None else int(offsets[-1].item())
    return Table(routing.expert.contiguous(), routing.slot.contiguous(), base, rows,
                 routing.capacity is not None)


def _check_routing(routing: Routing) -> None:
    if not isinstance(routing, Routing):
        raise ValueError(f"expected a moelab Routing; got {type(routing).__name__}")
    for name in ("expert", "slot"):
        t = getattr(routing, name)
        if t.dtype != torch.long or t.dim() != 2:
            raise ValueError(f"routing.{name} must be a [S, k] long tensor; got "
                             f"{tuple(t.shape)} {t.dtype}")


def source_rows(table: Table) -> Tensor:
    """[rows] long: the token held by each buffer row, -1 for an empty row."""
    source = torch.full((table.rows,), -1, dtype=torch.long, device=table.slot.device)
    num_routes = table.slot.numel()
    if num_routes and table.rows:
        check_launch(_source_rows_kernel, table.slot, source)
        block = 256
        _source_rows_kernel[(triton.cdiv(num_routes, block),)](
            table.expert, table.slot, table.base, source, num_routes, K=table.k, BLOCK=block)
    return source


def _block_d(width: int) -> int:
    return min(128, max(16, next_power_of_2(width)))


def _gather(x: Tensor, source: Tensor) -> Tensor:
    num_rows, width = source.numel(), x.shape[1]
    out = torch.empty(num_rows, width, dtype=x.dtype, device=x.device)
    if num_rows:
        block_r, block_d = 32, _block_d(width)
        _gather_kernel[(triton.cdiv(num_rows, block_r), triton.cdiv(width, block_d))](
            x, source, out, num_rows, width, x.stride(0), out.stride(0),
            BLOCK_R=block_r, BLOCK_D=block_d)
    return out


def _combine(out: Tensor, table: Table, weight: Tensor | None, dtype: torch.dtype) -> Tensor:
    num_tokens, width = table.num_tokens, out.shape[1]
    y = torch.empty(num_tokens, width, dtype=dtype, device=out.device)
    block_s, block_d = 16, _block_d(width)
    _combine_kernel[(triton.cdiv(num_tokens, block_s), triton.cdiv(width, block_d))](
        out, table.expert, table.slot, weight if weight is not None else out, table.base, y,
        num_tokens, width, out.stride(0), y.stride(0), K=table.k,
        HAS_WEIGHT=weight is not None, BLOCK_S=block_s, BLOCK_D=block_d)
    return y


def _combine_backward(dy: Tensor, out: Tensor, table: Table, weight: Tensor,
                      need_d_weight: bool) -> tuple[Tensor, Tensor | None]:
    num_tokens, width = dy.shape
    # Rows no route writes (empty capacity slots) get zero gradient.
    alloc = torch.zeros if table.capacity_layout else torch.empty
    d_out = alloc(out.shape, dtype=out.dtype, device=out.device)
    d_weight = (torch.empty(num_tokens, table.k, dtype=torch.float32, device=dy.device)
                if need_d_weight else None)
    block_s = 16
    _combine_backward_kernel[(triton.cdiv(num_tokens, block_s),)](
        dy, out, table.expert, table.slot, weight, table.base, d_out,
        d_weight if d_weight is not None else dy, num_tokens, width,
        dy.stride(0), out.stride(0), d_out.stride(0),
        K=table.k, K_PAD=max(2, next_power_of_2(table.k)), NEED_D_WEIGHT=need_d_weight,
        BLOCK_S=block_s, BLOCK_D=_block_d(width))
    return d_out, d_weight


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, table, source):
        ctx.table = table
        return _gather(x, source)

    @staticmethod
    def backward(ctx, d_buffer):
        # d x[s] = Σ_j d buffer[row(s, j)]: the combine with unit weights
        return _combine(d_buffer.contiguous(), ctx.table, None, d_buffer.dtype), None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, weight, table):
        ctx.save_for_backward(out, weight)
        ctx.table = table
        return _combine(out, table, weight, out.dtype)

    @staticmethod
    def backward(ctx, dy):
        out, weight = ctx.saved_tensors
        d_out, d_weight = _combine_backward(dy.contiguous(), out, ctx.table, weight,
                                            ctx.needs_input_grad[1])
        if d_weight is not None:
            d_weight = d_weight.to(weight.dtype)
        return d_out, d_weight, None


def dispatch(x: Tensor, routing: Routing) -> Tensor:
    """[S, d] tokens -> [E, C, d] (capacity) or packed [N, d] (dropless), like
    ``moelab.dispatch(x, routing)``; differentiable in x."""
    _check_routing(routing)
    if x.dim() != 2 or x.shape[0] != routing.num_tokens:
        raise ValueError(f"x must be [tokens={routing.num_tokens}, d]; got {tuple(x.shape)}")
    check_launch(_gather_kernel, x, routing.slot)
    x = x if x.stride(1) == 1 else x.contiguous()
    table = layout(routing)
    buffer = _Dispatch.apply(x, table, source_rows(table))
    if routing.capacity is not None:
        return buffer.view(routing.num_experts, routing.capacity, x.shape[1])
    return buffer


def combine(expert_out: Tensor, routing: Routing) -> Tensor:
    """Expert outputs in the layout ``dispatch`` makes -> [S, d]: y_s = Σ_j w_sj · out[row(s, j)],
    like ``moelab.combine``; differentiable in the outputs and in ``routing.weight``."""
    table = layout(routing)
    if expert_out.dim() not in (2, 3) or \
            expert_out.numel() != table.rows * expert_out.shape[-1]:
        expected = (f"[E={routing.num_experts}, C={routing.capacity}, d]"
                    if routing.capacity is not None else f"[N={table.rows}, d]")
        raise ValueError(f"expert_out must be {expected} for this routing; got "
                         f"{tuple(expert_out.shape)}")
    flat = expert_out.reshape(table.rows, expert_out.shape[-1])
    flat = flat if flat.stride(1) == 1 else flat.contiguous()
    check_launch(_combine_kernel, flat, routing.weight)
    return _Combine.apply(flat, routing.weight.contiguous(), table)
