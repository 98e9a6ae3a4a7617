"""Shared pytest set-up. Runs before any test module imports triton."""

import os

import torch

if not torch.cuda.is_available():
    # Triton reads TRITON_INTERPRET when a kernel is decorated (when moelab.kernels' modules are
    # imported), so it has to be set before that: here, ahead of every test module.
    os.environ.setdefault("TRITON_INTERPRET", "1")
