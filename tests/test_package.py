"""The package imports light, its public faces give what they say, and its imports point one
way (the math never imports a view; only the layer and dispatch import the kernels; the kernels
use only public names of the library)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_moelab_and_the_math_leave_the_views_and_heavy_packages_unimported():
    """`import moelab`, `moelab.kernels` and every module of the math (everything but viz/)
    import neither the views nor plotting, widgets, Triton or transformers."""
    code = ("import importlib, pkgutil, sys, moelab, moelab.kernels\n"
            "def walk(package):\n"
            "    for info in pkgutil.iter_modules(package.__path__, package.__name__ + '.'):\n"
            "        if info.name in ('moelab.viz', 'moelab.kernels'):\n"
            "            continue\n"
            "        module = importlib.import_module(info.name)\n"
            "        if info.ispkg:\n"
            "            walk(module)\n"
            "walk(moelab)\n"
            "heavy = [m for m in ('plotly', 'ipywidgets', 'moelab.viz', 'triton', 'matplotlib',"
            " 'pandas', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "print('ok', 'moelab.parallel.launcher' in sys.modules, 'moelab.layer' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stdout.split() == ["ok", "True", "True"]


def test_kernels_ship_inside_moelab():
    import moelab.kernels

    assert "Triton" in moelab.kernels.__doc__
    assert moelab.kernels.__file__.replace("\\", "/").endswith("kernels/__init__.py")


def test_public_faces():
    import inspect

    import moelab
    import moelab.parallel

    for package in (moelab, moelab.parallel):
        for name in package.__all__:
            assert getattr(package, name) is not None, name
    assert moelab.__version__
    from moelab.parallel import launch, parallelize

    assert inspect.isfunction(launch) and inspect.isfunction(parallelize)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in a file, relative ones resolved against moelab."""
    package = "moelab." + ".".join(path.relative_to(REPO / "moelab").parts[:-1]) \
        if path.is_relative_to(REPO / "moelab") else "moelab.kernels"
    package = package.rstrip(".")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            found.append((module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return found


def test_only_the_layer_and_dispatch_import_the_kernels():
    importers = set()
    for path in (REPO / "moelab").rglob("*.py"):
        for module, names in _imports(path):
            if module.startswith("moelab.kernels") or (module == "moelab" and "kernels" in names):
                importers.add(path.relative_to(REPO).as_posix())
    assert importers == {"moelab/layer.py", "moelab/dispatch.py"}, importers


def test_the_kernels_use_only_public_names_of_the_library():
    private = [(path.name, module, name) for path in (REPO / "kernels").glob("*.py")
               for module, names in _imports(path)
               if module.startswith("moelab") and not module.startswith("moelab.kernels")
               for name in names if name.startswith("_")]
    assert private == []


def test_no_source_folder_is_named_like_build_output():
    """ruff, black, pytest and the common .gitignore templates skip dist/, build/ and out/."""
    skipped = {"dist", "build", "out"}
    folders = {p.name for root in ("moelab", "kernels", "tests", "benchmarks", "notebooks")
               for p in (REPO / root).rglob("*") if p.is_dir()}
    assert not folders & skipped
