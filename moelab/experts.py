"""Experts: E feed-forward networks held as one weight bank and run as one batched matmul.

DeepSpeed keeps a ModuleList of deep copies of one expert and loops over it; moelab keeps each
matrix as a single [E, ...] tensor so that all experts run in one ``baddbmm`` per matrix (the same
shape the grouped GEMM kernels and the expert-parallel sharding use: slice dim 0).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import check_choice, check_int

ACTIVATIONS = ("gelu", "swiglu", "relu")


def activate(h: Tensor, activation: str, inplace: bool = False) -> Tensor:
    """GELU / ReLU on h, or SwiGLU on h = [gate | up] (Shazeer 2020): silu(gate) · up.

    ``inplace=True`` overwrites h (no autograd; for inference): SwiGLU then returns a view of
    h's gate half."""
    if activation == "gelu":
        return torch.ops.aten.gelu_(h) if inplace else F.gelu(h)
    if activation == "relu":
        return F.relu(h, inplace=inplace)
    gate, up = h.chunk(2, dim=-1)
    if inplace:
        return F.silu(gate, inplace=True).mul_(up)
    return F.silu(gate) * up


#: Inference runs the experts in groups whose hidden activations [G, C, f] fit in about this many
#: bytes, so the second matmul reads them from cache instead of memory.
HIDDEN_GROUP_BYTES = 8 << 20


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
                 bias: bool = True) -> None:
        super().__init__()
        self.num_experts = check_int("num_experts", num_experts)
        self.d_model, self.d_ff = check_int("d_model", d_model), check_int("d_ff", d_ff)
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        self.parallel = None
        width = 2 * d_ff if activation == "swiglu" else d_ff
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

    def forward(self, x: Tensor, offsets: Tensor | None = None) -> Tensor:
        """[E, C, d] -> [E, C, d]: expert e runs on x[e]. With ``offsets`` [E + 1], x is the
        packed [N, d] instead (see `forward_packed`); both go through this module call, so hooks
        on the bank (the latency profiler's) see every expert FFN."""
        if offsets is not None:
            return self._forward_packed(x, offsets)
        return self._forward_bank(x)

    def _forward_bank(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[0] != self.num_experts or x.shape[2] != self.d_model:
            raise ValueError(f"Experts expects [num_experts={self.num_experts}, rows, "
                             f"d_model={self.d_model}]; got {tuple(x.shape)}")
        if torch.is_grad_enabled() and (x.requires_grad or self.w_in.requires_grad):
            # h_e = act(x_e · W_in[e] + b_in[e])                                         [E, C, f]
            h = self._affine(x, self.w_in, self.b_in)
            # y_e = h_e · W_out[e] + b_out[e]                                            [E, C, d]
            return self._affine(activate(h, self.activation), self.w_out, self.b_out)
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
            h = activate(self._affine(x[g], self.w_in[g], b_in), self.activation,
                         inplace=True)  # [G, C, f]
            self._affine(h, self.w_out[g], b_out, out=y[g])  # [G, C, d]
        return y

    @staticmethod
    def _affine(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor | None = None
                ) -> Tensor:
        weight = weight.to(x.dtype)
        if bias is None:
            return torch.bmm(x, weight, out=out)
        return torch.baddbmm(bias.to(x.dtype)[:, None, :], x, weight, out=out)

    def forward_packed(self, x: Tensor, offsets: Tensor) -> Tensor:
        """Packed rows [N, d], expert e owning rows offsets[e]:offsets[e+1] -> [N, d].

        The same as ``experts(x, offsets)``."""
        return self(x, offsets)

    def _forward_packed(self, x: Tensor, offsets: Tensor) -> Tensor:
        """Packed rows [N, d] -> [N, d].

        When at most half the experts have rows (decode: B tokens over many experts), each of
        those runs on its own segment and the others' weights are never read. Otherwise every
        segment is padded to the largest one ([E, max_rows, d]) for one batched FFN; the Triton
        grouped GEMM (moelab.kernels) removes the padding.
        """
        if offsets.shape != (self.num_experts + 1,):
            raise ValueError(f"offsets must have shape [num_experts + 1]=({self.num_experts + 1},)"
                             f"; got {tuple(offsets.shape)}")
        num_rows = x.shape[0]
        load = offsets[1:] - offsets[:-1]  # [E]
        load_host = load.tolist()  # one wait for the device: the shapes below depend on it
        active = [e for e, rows in enumerate(load_host) if rows]
        # (With no rows at all, the padded path still runs: an empty batched FFN that gives
        # every weight a zero gradient, as expert-parallel ranks without tokens need.)
        if active and 2 * len(active) <= self.num_experts:
            starts = list(itertools.accumulate(load_host[:-1], initial=0))
            return self._forward_segments(x, starts, load_host, active)
        max_rows = max(load_host, default=0)
        slot = torch.arange(max_rows, device=x.device)  # [M]
        valid = slot[None, :] < load[:, None]  # [E, M]
        source = torch.where(valid, offsets[:-1, None] + slot[None, :], num_rows)  # [E, M]
        padded = torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, source.reshape(-1))
        out = self._forward_bank(padded.view(self.num_experts, max_rows, x.shape[1]))
        return out.reshape(-1, out.shape[-1])[valid.reshape(-1)]  # [N, d]

    def _forward_segments(self, x: Tensor, starts: list[int], load: list[int],
                          active: list[int]) -> Tensor:
        """Expert by expert over the experts that have rows (views of x and of the weights, no
        copies); the outputs, concatenated in expert order, are the packed [N, d]."""
        outputs = []
        for e in active:
            one = slice(e, e + 1)  # expert e as a bank of one
            rows = x[None, starts[e]:starts[e] + load[e]]  # [1, n_e, d]
            h = self._affine(rows, self.w_in[one], None if self.b_in is None else self.b_in[one])
            y = self._affine(activate(h, self.activation), self.w_out[one],
                             None if self.b_out is None else self.b_out[one])  # [1, n_e, d]
            outputs.append(y[0])
        return torch.cat(outputs)  # [N, d]

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
