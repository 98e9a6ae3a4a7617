"""moelab.kernels: Triton kernels for the optimized MoE path (DeepSpeed-MoE §5.4).

- ``gating``: softmax over experts, top-k and capacity slots that write the dense token-to-expert
  mapping table (``fused_route`` returns a ``moelab.Routing``). Slots come from a per-expert
  prefix count over tokens in position order: a reduce-then-scan across token blocks (the paper
  parallelises this cumsum with a Blelloch scan).
- ``permute``: gather tokens into the expert-major buffer (capacity) or the packed expert-sorted
  buffer (dropless) from the mapping table, and the combine that scatters expert outputs back to
  token order, weighted by the gates and summed over the k routes in one kernel.
- ``grouped_ffn``: the expert FFN over variable-size expert segments as one launch per matrix,
  tiles scheduled over (expert, row-tile) pairs, activation fused, forward and backward. The first
  GEMM reads token rows through the mapping table (ScatterMoE's idea), so no permuted copy of the
  tokens is ever written.

``import moelab.kernels`` stays light: it does not import Triton. The names below load their
module (and Triton) on first use. On a CPU the kernels run in Triton's interpreter: set
``TRITON_INTERPRET=1`` in the environment before Triton or a kernel module is imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

INSTALL_HINT = "pip install moelab[kernels]  (installs triton)"
#: The activations the grouped expert FFN kernel computes (fused into its first GEMM).
GROUPED_FFN_ACTIVATIONS = ("gelu", "relu", "swiglu")
INTERPRETER_HINT = ("On a machine without a CUDA GPU, run the kernels in Triton's interpreter: set "
                    "TRITON_INTERPRET=1 in the environment *before* triton or moelab.kernels is "
                    "imported (TRITON_INTERPRET=1 python ..., or os.environ['TRITON_INTERPRET'] = "
                    "'1' in the first cell of a notebook). The interpreter is slow and has no "
                    "bfloat16: use tiny shapes in float32 or float16.")

_LAZY = {
    "fused_route": "gating", "dispatch": "permute", "combine": "permute",
    "expert_ffn": "grouped_ffn", "tile_schedule": "grouped_ffn",
}
__all__ = ["check_available", "triton_available", "interpreter_enabled", *_LAZY]


def triton_available() -> bool:
    """Whether Triton can be imported (found without importing it)."""
    if "triton" in sys.modules:
        return sys.modules["triton"] is not None
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET is set to a true value in the environment."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes", "y")


def check_available() -> None:
    """Raise unless the kernels can run here: Triton installed, and a CUDA GPU or the interpreter.

    Light: imports neither Triton nor a kernel module.
    """
    if not triton_available():
        raise ImportError(f"backend='triton' needs Triton, which is not installed: {INSTALL_HINT}")
    import torch

    if not torch.cuda.is_available() and not interpreter_enabled():
        raise RuntimeError(f"backend='triton': no CUDA GPU here. {INTERPRETER_HINT}")


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
