"""Importing Triton, and the checks every kernel wrapper runs before a launch.

Importing this module imports Triton; ``moelab.kernels`` itself does not (see its ``__init__``).
"""

from __future__ import annotations

import torch

from . import INSTALL_HINT, INTERPRETER_HINT

try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(f"moelab.kernels needs Triton: {INSTALL_HINT}") from error

__all__ = ["triton", "tl", "check_launch", "next_power_of_2", "is_interpreted"]

#: dtypes the kernels take; the interpreter (numpy underneath) has no bfloat16.
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRETER_DTYPES = (torch.float32, torch.float16)


def is_interpreted(kernel) -> bool:
    """Whether a @triton.jit kernel was built for the interpreter (TRITON_INTERPRET=1 when its
    module was imported) rather than compiled for a GPU."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_launch(kernel, *tensors: torch.Tensor) -> None:
    """Fail with a clear message before a launch that Triton would fail obscurely.

    - CPU tensors need the interpreter; GPU tensors need a compiled kernel or the interpreter.
    - All tensors on one device.
    - Floating tensors in a dtype the current mode runs (no bfloat16 in the interpreter).
    """
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"moelab.kernels: all tensors must be on one device; got {devices}")
    device = next(iter(devices))
    interpreted = is_interpreted(kernel)
    if device.type == "cpu" and not interpreted:
        raise RuntimeError(f"moelab.kernels got CPU tensors but Triton compiles for a GPU. "
                           f"{INTERPRETER_HINT}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"moelab.kernels runs on CUDA GPUs (or the CPU interpreter); got "
                         f"tensors on {device}")
    allowed = INTERPRETER_DTYPES if interpreted else GPU_DTYPES
    for t in tensors:
        if t.is_floating_point() and t.dtype not in allowed:
            where = "the Triton interpreter (CPU)" if interpreted else "Triton on a GPU"
            raise ValueError(f"moelab.kernels under {where} takes "
                             f"{[str(d).removeprefix('torch.') for d in allowed]}; got {t.dtype}"
                             + (" (the interpreter has no bfloat16: use float32 or float16 on "
                                "the CPU)" if interpreted and t.dtype == torch.bfloat16 else ""))


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
