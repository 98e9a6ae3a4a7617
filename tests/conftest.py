"""Shared pytest set-up. Runs before any test module imports triton."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads TRITON_INTERPRET when a kernel is decorated (when moelab.kernels' modules are
    # imported), so it has to be set before that: here, ahead of every test module.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _remove_failed_launch_folders():
    """A failed launch keeps its folder (the ranks' logs) for the user; the tests' own failures
    on purpose are removed after each test."""
    temp = Path(tempfile.gettempdir())
    before = set(temp.glob("moelab-launch-*"))
    yield
    for folder in set(temp.glob("moelab-launch-*")) - before:
        shutil.rmtree(folder, ignore_errors=True)
