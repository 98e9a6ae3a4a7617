"""Experts: E feed-forward networks held as one weight bank [E, ...] per matrix.

DeepSpeed keeps a ModuleList of deep copies of one expert and loops over it; moelab keeps each
matrix as a single [E, ...] tensor (the shape the grouped GEMM kernels and the expert-parallel
sharding use: slice dim 0). How the bank runs depends on the layout and the load
(`Experts.path`): one batched matmul per matrix over the capacity layout, torch's grouped GEMM
over the packed rows, and only the experts that have rows when few do (decode).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import check_choice, check_int

ACTIVATIONS = ("gelu", "swiglu", "relu", "clamped_swiglu")
GATED = ("swiglu", "clamped_swiglu")  # h = [gate | up]: the first matrix is twice as wide
#: gpt-oss's clamped SwiGLU constants (transformers' GptOssExperts: alpha 1.702, limit 7.0)
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0


def activate(h: Tensor, activation: str, inplace: bool = False, *,
             alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT) -> Tensor:
    """The FFN's activation on h [..., f] (gated ones on h = [gate | up], [..., 2f]):

    - "gelu" / "relu";
    - "swiglu" (Shazeer 2020; Mixtral, Qwen, DeepSeek): silu(gate) · up;
    - "clamped_swiglu" (gpt-oss): gate and up clamped to ``limit`` (gate from above, up both
      ways), then gate · sigmoid(alpha · gate) · (up + 1).

    ``inplace=True`` overwrites h (no autograd; for inference): a gated activation then returns a
    view of h's gate half."""
    if activation == "gelu":
        return torch.ops.aten.gelu_(h) if inplace else F.gelu(h)
    if activation == "relu":
        return F.relu(h, inplace=inplace)
    gate, up = h.chunk(2, dim=-1)
    if activation == "clamped_swiglu":
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        # glu = gate · σ(α · gate); out = (up + 1) · glu
        return gate * torch.sigmoid(alpha * gate) * (up + 1)
    if inplace:
        return F.silu(gate, inplace=True).mul_(up)
    return F.silu(gate) * up


#: Inference runs the experts in groups whose hidden activations [G, C, f] fit in about this many
#: bytes, so the second matmul reads them from cache instead of memory.
HIDDEN_GROUP_BYTES = 8 << 20
#: Packed layout: when an expert's first GEMM averages at least this many multiply-adds
#: (rows · d_model · hidden width), each expert runs its own GEMMs ("segments").
SEGMENT_MACS = 1 << 25
#: Packed layout: segments padded to the largest when E · largest <= PAD_SLACK · rows.
PAD_SLACK = 1.5
#: The dtypes torch.nn.functional.grouped_mm takes (it has no float64).
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _needs_grad(x: Tensor, weight: Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def _static() -> bool:
    """Inside a CUDA graph capture or a torch.compile trace: no waiting for the device, no
    shapes from the data."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available()
                                             and torch.cuda.is_current_stream_capturing())


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: grouped_mm's backward refuses
    an expanded one ("Invalid strides/sizes"), as the gradient of a sum is."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _contiguous_grad(x: Tensor) -> Tensor:
    return _ContiguousGrad.apply(x) if x.requires_grad else x


class Experts(nn.Module):
    """E independent FFNs, d_model -> d_ff -> d_model.

    Weights: ``w_in`` [E, d, f] (f = 2·d_ff for SwiGLU: gate and up side by side), ``w_out``
    [E, d_ff, d], biases ``b_in`` [E, f] and ``b_out`` [E, d] when ``bias=True``.

    DeepSpeed: deep-copies one expert, so every expert (and with equal seeds every rank) starts
    with identical weights and only routing noise breaks the symmetry. moelab draws each expert's
    weights independently (nn.Linear's init, per expert).

    ``parallel``: None when the bank holds all of its layer's experts; under expert parallelism
    (`moelab.parallel.parallelize`) the plan whose slice of the experts this bank holds
    (``parallel.local_experts``), which checkpoints and gradient averaging read.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "gelu",
                 bias: bool = True, *, swiglu_alpha: float = SWIGLU_ALPHA,
                 swiglu_limit: float = SWIGLU_LIMIT) -> None:
        super().__init__()
        self.num_experts = check_int("num_experts", num_experts)
        self.d_model, self.d_ff = check_int("d_model", d_model), check_int("d_ff", d_ff)
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        self.swiglu_alpha, self.swiglu_limit = swiglu_alpha, swiglu_limit
        self.parallel = None
        width = 2 * d_ff if activation in GATED else d_ff
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, width))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.b_in = nn.Parameter(torch.empty(num_experts, width)) if bias else None
        self.b_out = nn.Parameter(torch.empty(num_experts, d_model)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # nn.Linear's default init, drawn independently for every expert: U(-1/√fan_in, 1/√fan_in)
        for weight, bias, fan_in in ((self.w_in, self.b_in, self.d_model),
                                     (self.w_out, self.b_out, self.d_ff)):
            bound = 1 / math.sqrt(fan_in)
            weight.uniform_(-bound, bound)
            if bias is not None:
                bias.uniform_(-bound, bound)

    def forward(self, x: Tensor, offsets: Tensor | None = None, load: Tensor | None = None
                ) -> Tensor:
        """The expert FFNs over a dispatched buffer, in its layout:

        - capacity layout [E, C, d] -> [E, C, d]: expert e runs on x[e]. With ``load`` [E]
          (rows in use per expert, ``Routing.load``), experts without rows do no work and
          their output rows are 0 (the combine never reads them);
        - packed [N, d] with ``offsets`` [E + 1] -> [N, d]: expert e owns rows
          offsets[e]:offsets[e+1] (``load``, if given, is offsets' differences, already known).

        `path` says which code runs; every path gives the same numbers. Both layouts go through
        this module call, so hooks on the bank (the latency profiler's) see every expert FFN."""
        if offsets is not None:
            return self._forward_packed(x, offsets, load)
        if x.dim() != 3 or x.shape[0] != self.num_experts or x.shape[2] != self.d_model:
            raise ValueError(f"Experts expects [num_experts={self.num_experts}, rows, "
                             f"d_model={self.d_model}]; got {tuple(x.shape)}")
        if load is not None and not _static():
            load_host = load.tolist()  # one wait for the device: which experts have rows
            if self.path("capacity", load_host, x.dtype) == "segments":
                return self._capacity_segments(x, load_host)
        return self._forward_bank(x)

    def forward_packed(self, x: Tensor, offsets: Tensor) -> Tensor:
        """Packed rows [N, d], expert e owning rows offsets[e]:offsets[e+1] -> [N, d].

        The same as ``experts(x, offsets)``."""
        return self(x, offsets)

    def path(self, layout: str, load: list[int], dtype: torch.dtype) -> str:
        """Which code runs the experts for a layout ("capacity" or "packed") and the rows per
        expert ``load``:

        - "segments": each expert that has rows runs on its own rows (two plain GEMMs), and
          the others' weights are never read. Taken when at most half the experts have rows
          (decode: a few tokens over many experts); in the capacity layout also when some
          expert is idle and the busiest's first GEMM is under SEGMENT_MACS multiply-adds (its
          GEMMs are then a read of its weights, which an idle expert need not do); in the
          packed layout when an expert's first GEMM averages SEGMENT_MACS multiply-adds or
          more (each GEMM is then large enough that the per-expert call costs nothing beside
          it: 128 rows at d_model 256 and a 1024-wide hidden layer, 8 rows at 1024 and 4096);
        - "bank" (capacity layout otherwise): every expert in one batched matmul per matrix;
        - "padded" (packed layout, small segments of nearly equal size: the largest at most
          PAD_SLACK times the mean): every segment padded to the largest, one batched FFN;
        - "grouped_mm" (packed layout, small uneven segments): ``torch.nn.functional.grouped_mm``
          over the packed rows, no padding (float32, bfloat16, float16, rows a multiple of 16
          bytes wide; otherwise "padded").

        The thresholds come from timing the three packed paths on this project's CPU
        (benchmarks/RESULTS.md, bench_layer): on GEMMs that large torch's grouped_mm ran
        1.1-1.8x slower than one GEMM per expert; on smaller ones it was slower than padding
        when the segments were nearly equal, and fastest when they were uneven, where padding
        did up to 7x the work.
        """
        active = [rows for rows in load if rows]
        if active and 2 * len(active) <= self.num_experts:
            return "segments"
        gemm_macs = self.d_model * self.w_in.shape[2]  # per row of an expert's first GEMM
        if layout == "capacity":
            # Rows this few make an expert's GEMMs a read of its weights: skip the idle ones'.
            idle = len(active) < self.num_experts
            return "segments" if active and idle and max(active) * gemm_macs < SEGMENT_MACS \
                else "bank"
        if not active:  # no rows at all: the empty batched FFN still gives every weight a grad
            return "padded"
        if sum(active) * gemm_macs >= SEGMENT_MACS * len(active):
            return "segments"
        if (self.num_experts * max(active) <= PAD_SLACK * sum(active)
                or not self._grouped_mm_takes(dtype)):
            return "padded"
        return "grouped_mm"

    def _grouped_mm_takes(self, dtype: torch.dtype) -> bool:
        """grouped_mm's limits: its dtypes, and row strides that are multiples of 16 bytes."""
        size = torch.empty((), dtype=dtype).element_size()
        widths = (self.d_model, self.d_ff, self.w_in.shape[2])
        return dtype in GROUPED_MM_DTYPES and all(width * size % 16 == 0 for width in widths)

    # ------------------------------------------------------------------------ the paths

    def _forward_bank(self, x: Tensor) -> Tensor:
        """[E, C, d] -> [E, C, d], every expert in one batched matmul per matrix."""
        if _needs_grad(x, self.w_in):
            # h_e = act(x_e · W_in[e] + b_in[e])                                         [E, C, f]
            h = self._affine(x, self.w_in, self.b_in)
            # y_e = h_e · W_out[e] + b_out[e]                                            [E, C, d]
            return self._affine(self._act(h), self.w_out, self.b_out)
        return self._forward_inference(x)

    def _forward_inference(self, x: Tensor) -> Tensor:
        """The same FFN without autograd: experts in groups whose hidden [G, C, f] stays in
        cache, the activation in place, each group's output written straight into y."""
        num_experts, rows, _ = x.shape
        width = self.w_in.shape[2]
        group = max(1, HIDDEN_GROUP_BYTES // max(1, rows * width * x.element_size()))
        y = x.new_empty(num_experts, rows, self.d_model)  # [E, C, d]
        for start in range(0, num_experts, group):
            g = slice(start, start + group)
            b_in = None if self.b_in is None else self.b_in[g]
            b_out = None if self.b_out is None else self.b_out[g]
            h = self._act(self._affine(x[g], self.w_in[g], b_in), inplace=True)  # [G, C, f]
            self._affine(h, self.w_out[g], b_out, out=y[g])  # [G, C, d]
        return y

    def _act(self, h: Tensor, inplace: bool = False) -> Tensor:
        return activate(h, self.activation, inplace, alpha=self.swiglu_alpha,
                        limit=self.swiglu_limit)

    @staticmethod
    def _affine(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor | None = None
                ) -> Tensor:
        weight = _as(weight, x.dtype)
        if bias is None:
            return torch.bmm(x, weight, out=out)
        return torch.baddbmm(_as(bias, x.dtype)[:, None, :], x, weight, out=out)

    def _ffn(self, rows: Tensor, e: int, weights: tuple, out: Tensor | None = None) -> Tensor:
        """Expert e on rows [n, d] -> [n, d] (2-D matmuls on views of the bank; ``weights`` is
        the bank unbound per expert, `_unbound`). Without autograd the activation runs in place
        and the output goes to ``out``."""
        w_in, b_in, w_out, b_out = weights
        inference = out is not None
        # h = act(x · W_in[e] + b_in[e])                                                [n, f]
        h = rows @ w_in[e] if b_in is None else torch.addmm(b_in[e], rows, w_in[e])
        h = self._act(h, inplace=inference)
        # y = h · W_out[e] + b_out[e]                                                   [n, d]
        if b_out is None:
            return torch.mm(h, w_out[e], out=out)
        return torch.addmm(b_out[e], h, w_out[e], out=out)

    def _unbound(self, dtype: torch.dtype) -> tuple:
        """(w_in, b_in, w_out, b_out), each a tuple of E per-expert views (one op per matrix,
        however many experts run)."""
        return tuple(None if t is None else _as(t, dtype).unbind(0)
                     for t in (self.w_in, self.b_in, self.w_out, self.b_out))

    def _capacity_segments(self, x: Tensor, load: list[int]) -> Tensor:
        """[E, C, d] -> [E, C, d], running only the experts with rows, on their rows."""
        weights = self._unbound(x.dtype)
        if not _needs_grad(x, self.w_in):
            y = x.new_zeros(x.shape)
            for e, rows in enumerate(load):
                if rows:
                    self._ffn(x[e, :rows], e, weights, out=y[e, :rows])
            return y
        parts = []
        for e, rows in enumerate(load):
            part = x.new_zeros(x.shape[1], self.d_model)
            if rows:
                part = torch.cat([self._ffn(x[e, :rows], e, weights), part[rows:]])
            parts.append(part)
        return torch.stack(parts)

    def _forward_packed(self, x: Tensor, offsets: Tensor, load: Tensor | None) -> Tensor:
        """Packed rows [N, d] -> [N, d] by `path`."""
        if offsets.shape != (self.num_experts + 1,):
            raise ValueError(f"offsets must have shape [num_experts + 1]=({self.num_experts + 1},)"
                             f"; got {tuple(offsets.shape)}")
        if load is None:
            load = offsets[1:] - offsets[:-1]  # [E]
        load_host = load.tolist()  # one wait for the device: the shapes below depend on it
        path = self.path("packed", load_host, x.dtype)
        if path == "segments":
            return self._packed_segments(x, load_host)
        if path == "grouped_mm":
            return self._packed_grouped_mm(x, offsets, load, load_host)
        # (With no rows at all this still runs: an empty batched FFN that gives every weight a
        # zero gradient, as expert-parallel ranks without tokens need.)
        return self._packed_padded(x, offsets, load, load_host)

    def _packed_segments(self, x: Tensor, load: list[int]) -> Tensor:
        """Expert by expert over the experts that have rows (views of x and of the weights, no
        copies); the outputs, in expert order, are the packed [N, d]."""
        weights = self._unbound(x.dtype)
        starts = itertools.accumulate(load, initial=0)
        segments = [(e, start, rows) for e, (start, rows)
                    in enumerate(zip(starts, load, strict=False)) if rows]  # (E + 1 starts)
        if not _needs_grad(x, self.w_in):
            y = x.new_empty(x.shape[0], self.d_model)  # [N, d]
            for e, start, rows in segments:
                self._ffn(x[start:start + rows], e, weights, out=y[start:start + rows])
            return y
        return torch.cat([self._ffn(x[start:start + rows], e, weights)
                          for e, start, rows in segments])  # [N, d]

    def _packed_grouped_mm(self, x: Tensor, offsets: Tensor, load: Tensor,
                           load_host: list[int]) -> Tensor:
        """The packed rows through torch's grouped GEMM: expert e's rows times W_in[e], then
        W_out[e], with no padding (each expert's bias added to its own rows)."""
        ends = offsets[1:].to(torch.int32)  # [E]: where each expert's rows end
        num_rows = x.shape[0]

        inference = not _needs_grad(x, self.w_in)
        starts = list(itertools.accumulate(load_host, initial=0))[:-1]

        def affine(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
            # rows_e · W[e] (+ b[e]) for every expert e at once                          [N, ·]
            out = _contiguous_grad(F.grouped_mm(rows, _as(weight, rows.dtype), offs=ends))
            if bias is None:
                return out
            bias = _as(bias, rows.dtype)
            if inference:  # each expert's bias onto its own rows, in place: no [N, ·] copy
                for e, (start, n) in enumerate(zip(starts, load_host, strict=True)):
                    if n:
                        out[start:start + n] += bias[e]
                return out
            return out + bias.repeat_interleave(load, dim=0, output_size=num_rows)

        h = self._act(affine(x, self.w_in, self.b_in), inplace=inference)  # [N, f]
        return affine(h, self.w_out, self.b_out)  # [N, d]

    def _packed_padded(self, x: Tensor, offsets: Tensor, load: Tensor,
                       load_host: list[int]) -> Tensor:
        """Every segment padded to the largest ([E, max_rows, d]) for one batched FFN."""
        num_rows, max_rows = x.shape[0], max(load_host, default=0)
        slot = torch.arange(max_rows, device=x.device)  # [M]
        valid = slot[None, :] < load[:, None]  # [E, M]
        source = torch.where(valid, offsets[:-1, None] + slot[None, :], num_rows)  # [E, M]
        padded = torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, source.reshape(-1))
        out = self._forward_bank(padded.view(self.num_experts, max_rows, x.shape[1]))
        return out.reshape(-1, out.shape[-1])[valid.reshape(-1)]  # [N, d]

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
                f"activation={self.activation!r}, bias={self.b_in is not None}")


def expert_banks(model: nn.Module) -> Iterator[tuple[str, Experts]]:
    """Every `Experts` bank in ``model`` with its qualified name: the one walker that parameter
    groups, checkpoints and gradient averaging use to tell expert parameters from shared ones
    (by module type, never by a substring of a parameter's name)."""
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            yield name, module


def expert_parameter_names(model: nn.Module) -> set[str]:
    """Qualified names of the parameters that live in Experts banks."""
    return {f"{name}.{p}" if name else p for name, bank in expert_banks(model)
            for p, _ in bank.named_parameters()}
