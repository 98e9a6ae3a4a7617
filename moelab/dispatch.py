"""Dispatch and combine: tokens -> expert-major buffers -> tokens, from one Routing.

Two layouts, chosen by the Routing:

- capacity (``routing.capacity == C``): an expert-major buffer [E, C, d]; expert e's tokens sit in
  rows ``slot`` of ``buffer[e]``, unused rows are zero. This is what DeepSpeed's all-to-all sends.
- dropless (``routing.capacity is None``): a packed buffer [N, d] of the N kept routes sorted by
  expert, with per-expert ``offsets`` [E + 1] (expert e owns rows offsets[e]:offsets[e+1]).

Three backends compute the same buffers (and gradients):

- "einsum": the GShard / DeepSpeed training path. It builds the one-hot dispatch mask and the
  combine-weight tensor, both [S, E, C], and runs ``einsum('sec,sm->ecm')`` and
  ``einsum('sec,ecm->sm')``: S·E·C·d multiply-adds each, of which all but S·k·d multiply zeros.
- "index": the paper's mapping table (§5.4): each kept route knows its row ``e·C + slot``; dispatch
  is one gather and combine one gather plus a k-term weighted sum, S·k·d work.
- "triton": the same mapping table in Triton kernels (moelab.kernels: permute, grouped FFN).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .routing import Routing

BACKENDS = ("einsum", "index", "triton")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "triton":
        from .kernels import check_available  # light: finds Triton without importing it

        check_available()  # Triton installed, and a CUDA GPU or TRITON_INTERPRET=1


def _num_rows(routing: Routing) -> int:
    if routing.capacity is not None:
        return routing.num_experts * routing.capacity
    if not routing.expert_choice:  # dropless token choice: one row per route, every route kept
        return routing.expert.numel()
    return int(routing.offsets[-1])


# ---------------------------------------------------------------- index backend (mapping table)

def _every_row_filled(routing: Routing, num_rows: int) -> bool:
    """Packed layout with every route kept (dropless routing): each row holds one route."""
    return routing.capacity is None and num_rows == routing.expert.numel()


def _source_token(routing: Routing, num_rows: int) -> Tensor:
    """[rows] long: the token that fills each buffer row, S (a padding index) for empty rows."""
    num_tokens, k = routing.expert.shape
    rows = routing.row.reshape(-1)  # [S·k]: each route's buffer row, -1 where dropped
    token = torch.arange(num_tokens * k, device=rows.device) // k  # [S·k]: each route's token
    if _every_row_filled(routing, num_rows):
        return torch.empty_like(rows).scatter_(0, rows, token)
    # source[row] = token for kept routes; dropped routes all write the extra last row, which is
    # cut off (a scatter, not a boolean selection: no wait for the device, CUDA-graph safe).
    source = torch.full((num_rows + 1,), num_tokens, dtype=torch.long, device=rows.device)
    source.scatter_(0, torch.where(rows >= 0, rows, num_rows), token)
    return source[:num_rows]


def _dispatch_index(x: Tensor, routing: Routing) -> Tensor:
    num_rows = _num_rows(routing)
    if x.shape[0] == 0:  # no tokens: every buffer row is empty
        return x.new_zeros(num_rows, x.shape[1])
    source = _source_token(routing, num_rows)  # [rows]
    filled = _every_row_filled(routing, num_rows)
    if torch.is_grad_enabled() and x.requires_grad:
        return _IndexDispatch.apply(x, source, routing.row, filled)
    return _gather_rows(x, source, filled)


def _gather_rows(x: Tensor, source: Tensor, every_row_filled: bool) -> Tensor:
    """buffer[row] = x[source[row]], and 0 for empty rows (source S)."""
    if every_row_filled:
        return x.index_select(0, source)
    empty = source == x.shape[0]
    # gather: empty rows read token 0 and are zeroed in place.
    buffer = x.index_select(0, torch.where(empty, 0, source))  # [rows, d]
    return _zero_rows_(buffer, empty)


def _zero_rows_(buffer: Tensor, rows: Tensor) -> Tensor:
    """buffer[rows] = 0 in place, for a [R] bool ``rows``. On the CPU an index_fill_ over the
    rows' indices (masked_fill_ with the broadcast [R, 1] mask measured 8-16x slower there);
    elsewhere masked_fill_, which needs no device wait (CUDA-graph safe)."""
    if buffer.device.type == "cpu":
        return buffer.index_fill_(0, rows.nonzero().squeeze(1), 0)
    return buffer.masked_fill_(rows[:, None], 0)


def _routes_of(rows: Tensor, flat: Tensor, all_kept: bool, zero_dropped: bool = False
               ) -> Tensor:
    """[S, k, d]: the rows of ``flat`` [rows, d] at each route (``all_kept``: no route was
    dropped). A dropped route (row -1) reads row 0, which its zero weight cancels where one
    follows; ``zero_dropped`` zeroes it instead."""
    num_tokens, k = rows.shape
    flat_rows = rows.reshape(-1) if all_kept else rows.clamp(min=0).reshape(-1)
    gathered = flat.index_select(0, flat_rows)  # [S·k, d]
    if zero_dropped and not all_kept:
        _zero_rows_(gathered, rows.reshape(-1) < 0)
    return gathered.view(num_tokens, k, flat.shape[-1])


def _sum_routes(routes: Tensor, weight: Tensor | None = None) -> Tensor:
    """[S, k, d] -> [S, d]: Σ_j (w_j ·) routes[:, j], as k - 1 fused multiply-adds on views
    (a reduction over the middle axis, and its backward's expand, cost 2-3x more here)."""
    y = routes[:, 0] if weight is None else routes[:, 0] * weight[:, :1]
    for j in range(1, routes.shape[1]):
        y = y + routes[:, j] if weight is None else torch.addcmul(y, routes[:, j],
                                                                   weight[:, j:j + 1])
    return y


class _IndexDispatch(torch.autograd.Function):
    """The mapping-table dispatch with its own backward. A token's gradient is the sum of its
    routes' rows of the buffer's gradient: a gather and a k-term sum (the combine with weight
    1), not the scatter-add that index_select's backward is (serial on the CPU: ~10x slower at
    T=4096, d=256)."""

    @staticmethod
    def forward(ctx, x, source, rows, every_row_filled):
        ctx.save_for_backward(rows)
        ctx.all_kept = every_row_filled
        return _gather_rows(x, source, every_row_filled)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        # dL/dx_s = Σ_j dL/dbuffer[row(s, j)]                                            [S, d]
        routes = _routes_of(rows, flat, ctx.all_kept, zero_dropped=True)
        return _sum_routes(routes), None, None, None


class _IndexCombine(torch.autograd.Function):
    """y_s = Σ_j w_sj · out[row_sj] with its own backward. Every buffer row serves at most one
    route, so the outputs' gradient is written, not accumulated: dL/dout[row_sj] = w_sj · dL/dy_s
    (an index_put, ~10x faster on the CPU than index_select's scatter-add backward), and
    dL/dw_sj = <dL/dy_s, out[row_sj]>."""

    @staticmethod
    def forward(ctx, flat_out, weight, rows, all_kept):
        ctx.save_for_backward(flat_out, weight, rows)
        ctx.all_kept = all_kept
        return _sum_routes(_routes_of(rows, flat_out, all_kept), weight)  # [S, d]

    @staticmethod
    def backward(ctx, grad):
        flat_out, weight, rows = ctx.saved_tensors
        grad_out = grad_weight = None
        if ctx.needs_input_grad[1]:
            # dL/dw_sj = Σ_m dL/dy_sm · out[row_sj, m]                                    [S, k]
            # (a dropped route's weight is 0 · p: whatever its gradient, p gets none of it)
            grad_weight = (_routes_of(rows, flat_out, ctx.all_kept) * grad[:, None, :]).sum(-1)
        if ctx.needs_input_grad[0]:
            num_rows = flat_out.shape[0]
            # dL/dout[row_sj] = w_sj · dL/dy_s; dropped routes write a spare last row      [rows, d]
            contribution = weight[..., None] * grad[:, None, :]  # [S, k, d]
            target = torch.where(rows >= 0, rows, num_rows).reshape(-1)
            grad_out = grad.new_zeros(num_rows + 1, grad.shape[-1])
            grad_out.index_put_((target,), contribution.reshape(-1, grad.shape[-1]))
            grad_out = grad_out[:num_rows]
        return grad_out, grad_weight, None, None


#: Up to this many tokens the inference combine gathers all k routes at once (fewer ops: what a
#: decode step pays for); above it, it accumulates route by route in one [S, d] buffer.
SMALL_COMBINE_TOKENS = 64


def _combine_index(expert_out: Tensor, routing: Routing) -> Tensor:
    num_tokens, k = routing.expert.shape
    flat_out = expert_out if expert_out.dim() == 2 else expert_out.view(-1, expert_out.shape[-1])
    weight = routing.weight  # [S, k]
    if weight.dtype != expert_out.dtype:
        weight = weight.to(expert_out.dtype)
    dropless = routing.capacity is None and not routing.expert_choice
    if torch.is_grad_enabled() and (expert_out.requires_grad or weight.requires_grad):
        return _IndexCombine.apply(flat_out, weight, routing.row, dropless)
    # Dropped routes read row 0 with weight 0, so they add nothing.
    rows = routing.row if dropless else routing.row.clamp(min=0)  # [S, k]: each route's row
    if num_tokens > SMALL_COMBINE_TOKENS:
        # y = Σ_j w_j · out[row_j], accumulated in place in one [S, d] buffer (no [S·k, d]
        # temporary, no batched matmul of S 1×k by k×d products).
        y = flat_out.index_select(0, rows[:, 0]).mul_(weight[:, :1])  # [S, d]
        for j in range(1, k):
            y.addcmul_(flat_out.index_select(0, rows[:, j]), weight[:, j:j + 1])
        return y
    gathered = flat_out.index_select(0, rows.reshape(-1))  # [S·k, d]
    if k == 1:
        return gathered * weight  # [S, d]
    # y_s = sum_j weight[s, j] · out[row[s, j]]                                       [S, d]
    return torch.bmm(weight[:, None, :], gathered.view(num_tokens, k, flat_out.shape[1])
                     ).squeeze(1)


# ------------------------------------------------------------- einsum backend (one-hot masks)

def dispatch_masks(routing: Routing, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """The GShard/DeepSpeed tensors, both [S, E, C]: the 0/1 dispatch mask and the combine
    weights (dropless uses C = the largest load). Built from the mapping table, for the einsum
    backend and to show what the table saves."""
    num_tokens, k = routing.expert.shape
    capacity = routing.buffer_rows
    kept = routing.kept
    token = torch.arange(num_tokens, device=kept.device)[:, None].expand(-1, k)[kept]
    combine = torch.zeros(num_tokens, routing.num_experts, capacity, dtype=dtype,
                          device=kept.device)
    combine = combine.index_put((token, routing.expert[kept], routing.slot[kept]),
                                routing.weight[kept].to(dtype))
    mask = torch.zeros_like(combine)
    mask[token, routing.expert[kept], routing.slot[kept]] = 1
    return mask, combine


def _packed_rows(routing: Routing) -> Tensor:
    """Rows of the padded [E, C_max] buffer that hold a route, in packed (expert-sorted) order."""
    rows = torch.arange(routing.buffer_rows, device=routing.slot.device)
    return (rows[None, :] < routing.load[:, None]).reshape(-1)  # [E·C_max] bool


def _dispatch_einsum(x: Tensor, routing: Routing) -> Tensor:
    mask, _ = dispatch_masks(routing, x.dtype)
    # dispatched[e, c, m] = sum_s mask[s, e, c] · x[s, m]                            [E, C, d]
    buffer = torch.einsum("sec,sm->ecm", mask, x)
    if routing.capacity is not None:
        return buffer.reshape(-1, x.shape[-1])
    return buffer.reshape(-1, x.shape[-1])[_packed_rows(routing)]  # pack: [N, d]


def _combine_einsum(expert_out: Tensor, routing: Routing) -> Tensor:
    _, combine = dispatch_masks(routing, expert_out.dtype)
    d_model = expert_out.shape[-1]
    if routing.capacity is None:  # unpack [N, d] into the padded [E, C_max, d]
        padded = expert_out.new_zeros(routing.num_experts * routing.buffer_rows, d_model)
        padded[_packed_rows(routing)] = expert_out.reshape(-1, d_model)
        expert_out = padded
    expert_out = expert_out.reshape(routing.num_experts, -1, d_model)
    # y[s, m] = sum_{e,c} combine[s, e, c] · out[e, c, m]                                [S, d]
    return torch.einsum("sec,ecm->sm", combine, expert_out)


# --------------------------------------------------------------------------------- public API

def dispatch(x: Tensor, routing: Routing, backend: str = "index") -> Tensor:
    """[S, d] tokens -> the expert buffer: [E, C, d] (capacity) or packed [N, d] (dropless)."""
    check_backend(backend)
    if x.dim() != 2 or x.shape[0] != routing.num_tokens:
        raise ValueError(f"x must be [tokens={routing.num_tokens}, d]; got {tuple(x.shape)}")
    if backend == "triton":
        from .kernels import permute  # imports Triton

        return permute.dispatch(x, routing)
    flat = _dispatch_index(x, routing) if backend == "index" else _dispatch_einsum(x, routing)
    if routing.capacity is not None:
        return flat.view(routing.num_experts, routing.capacity, x.shape[-1])
    return flat


def combine(expert_out: Tensor, routing: Routing, backend: str = "index") -> Tensor:
    """Expert outputs (the layout `dispatch` made) -> [S, d], the weighted sum over k routes."""
    check_backend(backend)
    if backend == "triton":
        from .kernels import permute  # imports Triton

        return permute.combine(expert_out, routing)
    if backend == "index":
        return _combine_index(expert_out, routing)
    return _combine_einsum(expert_out, routing)


class Dispatch(nn.Module):
    """The dispatch stage of an MoE layer: `dispatch` with the layer's backend, as a module so
    that hooks (the latency profiler's) see where it starts and ends.

    ``passthrough``: the layer's fused runner reads each route's token through the mapping
    table itself, so this stage hands the tokens on unchanged."""

    def __init__(self, backend: str = "index") -> None:
        super().__init__()
        check_backend(backend)
        self.backend, self.passthrough = backend, False

    def forward(self, tokens: Tensor, routing: Routing) -> Tensor:
        return tokens if self.passthrough else dispatch(tokens, routing, self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}" + (", passthrough" if self.passthrough else "")


class Combine(nn.Module):
    """The combine stage of an MoE layer: `combine` with the layer's backend, as a module."""

    def __init__(self, backend: str = "index") -> None:
        super().__init__()
        check_backend(backend)
        self.backend = backend

    def forward(self, expert_out: Tensor, routing: Routing) -> Tensor:
        return combine(expert_out, routing, self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
