"""What the layer benchmarks' grids share: a moelab layer called in one layout, the checks
against a reference, the labels of the candidates, which code ran the experts."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moelab import MoE

RTOL = 1e-4  # relative to the largest output
LABELS = {"index_dropless": "index dropless", "deepspeed": "DeepSpeed",
          "deepspeed_nodrop": "DeepSpeed no-drop", "index_swiglu": "index swiglu",
          "mixtral": "Mixtral", "index_relu": "index relu", "switch": "Switch"}


def rel_err(a: Tensor, ref: Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def check(name: str, a: Tensor, ref: Tensor, notes: list[str], rtol: float = RTOL) -> float:
    if not bool(torch.isfinite(a).all()):
        raise SystemExit(f"FAIL {name}: output has NaN/Inf")
    err = rel_err(a, ref)
    if not err <= rtol:
        raise SystemExit(f"FAIL {name}: relative error {err:.2e} > {rtol:.0e}")
    notes.append(f"{name} {err:.1e}")
    return err


def layout_call(moe: MoE, x: Tensor, *, drop_tokens: bool, backend: str = "index"
                ) -> Callable[[], Tensor]:
    """A forward of ``moe`` in one layout and backend (set before every call: several
    candidates share one layer, hence its weights)."""
    config = moe.router.config.replace(drop_tokens=drop_tokens)

    def call() -> Tensor:
        moe.router.config = config
        if moe.backend != backend:
            moe.set_backend(backend)
        return moe(x)[0]
    return call


#: What the names in the reports' "which code ran the experts" tables mean (the rule that picks
#: one per call is `moelab.Experts.path`'s, with the timings behind it in its docstring).
PATHS_LEGEND = ('`Experts.path` picks one per call: "bank" (capacity layout, every expert in one '
                'batched matmul per matrix), "segments" (each expert that has rows runs its own '
                'GEMMs), "padded" (packed rows, segments padded to the largest, one batched '
                'FFN), "grouped_mm" (packed rows through torch.nn.functional.grouped_mm, no '
                'padding).')


def expert_path(moe: MoE, routing) -> str:
    """Which code ran the experts of ``moe`` for ``routing`` (`moelab.Experts.path`)."""
    if routing.capacity is None:
        return moe.experts.path("packed", routing.load.tolist(), torch.float32)
    load = moe.capacity_load(routing)
    return "bank" if load is None else moe.experts.path("capacity", load.tolist(), torch.float32)
