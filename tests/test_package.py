"""The package imports light and says where its parts live."""

from __future__ import annotations

import subprocess
import sys


def test_import_moelab_is_light():
    code = ("import sys, moelab, moelab.kernels, moelab.inference, moelab.serving, "
            "moelab.interop; heavy = [m for m in ('plotly', 'ipywidgets', 'triton', "
            "'matplotlib', 'pandas', 'transformers') if m in sys.modules]; "
            "print(heavy); assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout


def test_kernels_ship_inside_moelab():
    import moelab.kernels

    assert "Triton" in moelab.kernels.__doc__
    assert moelab.kernels.__file__.replace("\\", "/").endswith("kernels/__init__.py")


def test_public_api():
    import moelab

    for name in moelab.__all__:
        assert getattr(moelab, name) is not None
    assert moelab.__version__
