"""binder/ alone must be enough to run every notebook.

Binder (repo2docker) installs binder/requirements.txt, then binder/postBuild installs moelab
itself without dependencies, so nothing from pyproject.toml's dependency lists reaches a Binder
user. These tests keep the two in step:

- every dependency of moelab and of its ``lab`` and ``kernels`` extras (what the notebooks need:
  Jupyter, widgets, plotly, and Triton for notebook 05's kernels in the interpreter) is in
  binder/requirements.txt, torch at the Makefile's pin and from PyTorch's CPU index;
- every third-party module the notebooks import, directly or through the moelab modules they
  import (lazy imports included), comes from a requirement there (or from what those
  requirements install);
- runtime.txt names a Python that pyproject.toml accepts, and postBuild installs moelab without
  dependencies.

With ``MOELAB_BINDER_PYTHON=/path/to/venv/bin/python`` (a venv made from binder/ alone:
``pip install -r binder/requirements.txt && pip install --no-deps -e .``), the last test runs
every notebook in that interpreter at the binder preset.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import json
import os
import re
import sys
from collections import deque
from pathlib import Path

import nbformat
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
BINDER = REPO / "binder"
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement line (PEP 503)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def _binder_requirements() -> dict[str, str]:
    lines = (BINDER / "requirements.txt").read_text().splitlines()
    return {_name(line): line.strip() for line in lines
            if line.strip() and not line.lstrip().startswith(("#", "-"))}


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_binder_has_every_dependency_of_moelab_lab_and_kernels():
    project = _pyproject()["project"]
    needed = list(project["dependencies"])
    for extra in ("lab", "kernels"):
        needed += project["optional-dependencies"][extra]
    binder = _binder_requirements()
    missing = sorted({_name(r) for r in needed} - set(binder))
    assert not missing, (f"binder/requirements.txt lacks {missing}: a Binder user gets only what "
                         f"it lists (postBuild installs moelab with --no-deps)")


def test_binder_torch_is_the_makefiles_cpu_build():
    pin = re.search(r"^TORCH\s*\??:?=\s*(\S+)", (REPO / "Makefile").read_text(), flags=re.M)
    assert pin, "the Makefile names the torch it installs in a TORCH variable"
    binder = _binder_requirements()
    assert binder["torch"].replace(" ", "") == pin.group(1), (binder["torch"], pin.group(1))
    text = (BINDER / "requirements.txt").read_text()
    assert re.search(rf"^--(extra-)?index-url\s+{re.escape(CPU_INDEX)}\s*$", text, flags=re.M), \
        "binder must take torch from PyTorch's CPU index (PyPI's build is the CUDA one)"


def test_runtime_and_postbuild():
    runtime = (BINDER / "runtime.txt").read_text().strip()
    match = re.fullmatch(r"python-(\d+)\.(\d+)", runtime)
    assert match, runtime
    minimum = re.search(r">=\s*(\d+)\.(\d+)", _pyproject()["project"]["requires-python"])
    assert (int(match[1]), int(match[2])) >= (int(minimum[1]), int(minimum[2])), runtime
    post = (BINDER / "postBuild").read_text()
    assert re.search(r"pip install .*--no-deps.* -e \.", post), post
    assert os.access(BINDER / "postBuild", os.X_OK) and os.access(BINDER / "start", os.X_OK)
    assert "MOELAB_PRESET=binder" in (BINDER / "start").read_text()


# ----------------------------------------------------------------- what the notebooks import

STDLIB = set(sys.stdlib_module_names)


def _imports(tree: ast.AST) -> tuple[set[str], set[str]]:
    """(absolute module names, relative module names as '.x' / '..x') anywhere in a module,
    lazy and guarded imports included: a notebook that runs the code path needs them."""
    absolute, relative = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            absolute.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = "." * node.level + (node.module or "")
                relative.update([base] if node.module else
                                [base + alias.name for alias in node.names])
            else:
                absolute.add(node.module)
                absolute.update(f"{node.module}.{alias.name}" for alias in node.names)
    return absolute, relative


def _module_file(name: str) -> Path | None:
    """moelab.x -> its file (moelab.kernels lives in kernels/)."""
    parts = name.split(".")
    if parts[0] != "moelab":
        return None
    root = REPO / "kernels" if parts[1:2] == ["kernels"] else REPO / "moelab"
    rest = parts[2:] if parts[1:2] == ["kernels"] else parts[1:]
    path = root.joinpath(*rest)
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _resolve(relative: str, module: str, is_package: bool) -> str:
    level = len(relative) - len(relative.lstrip("."))
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)] if level > 1 else base
    rest = relative.lstrip(".")
    return ".".join(base + ([rest] if rest else []))


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level third-party module -> where it is imported (a notebook, or a moelab module
    that a notebook imports, followed through moelab's own imports)."""
    found: dict[str, set[str]] = {}
    todo: deque[tuple[str, str]] = deque()

    def note(names: set[str], where: str) -> None:
        for name in names:
            top = name.split(".")[0]
            if top == "moelab":
                todo.append((name, where))
            elif top not in STDLIB and top != "__future__":
                found.setdefault(top, set()).add(where)

    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            source = "\n".join(line for line in cell.source.splitlines()
                               if not line.lstrip().startswith(("%", "!")))
            absolute, _ = _imports(ast.parse(source))
            note(absolute, path.name)
            if cell.source.startswith("%%launch"):  # the ranks run the cell as a script
                note({"torch"}, path.name)
    seen: set[str] = set()
    while todo:
        name, where = todo.popleft()  # breadth first: each module named by its first user
        for candidate in (name, name.rsplit(".", 1)[0]):  # `from moelab.x import y`
            path = _module_file(candidate)
            if path is None or candidate in seen:
                continue
            seen.add(candidate)
            absolute, relative = _imports(ast.parse(path.read_text()))
            note(absolute, f"{candidate} (from {where})")
            is_package = path.name == "__init__.py"
            todo.extend((_resolve(r, candidate, is_package), where) for r in relative)
            if candidate != "moelab":
                todo.append(("moelab", where))
    return found


def _installed_closure(names: set[str]) -> set[str]:
    """The distributions these install (their requirements, recursively, as installed here)."""
    closure, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for requirement in requires:
            if "extra ==" in requirement:
                continue
            todo.append(_name(requirement))
    return closure


def test_every_module_the_notebooks_import_comes_from_binder():
    imports = _third_party_imports()
    assert {"torch", "plotly", "ipywidgets", "triton"} <= set(imports), sorted(imports)
    providers = metadata.packages_distributions()
    closure = _installed_closure(set(_binder_requirements()))
    uncovered = {}
    for module, where in sorted(imports.items()):
        dists = {_name(d) for d in providers.get(module, [])}
        assert dists, f"{module} (imported in {sorted(where)}) is not installed here"
        if not dists & closure:
            uncovered[module] = (sorted(dists), sorted(where)[:3])
    assert not uncovered, f"imported by the notebooks but not installed by binder/: {uncovered}"


# ------------------------------------------------------------------ a venv from binder/ alone

BINDER_PYTHON = os.environ.get("MOELAB_BINDER_PYTHON")


@pytest.mark.notebook
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not BINDER_PYTHON, reason="set MOELAB_BINDER_PYTHON to a venv made from "
                                              "binder/ alone to run the notebooks in it")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_in_a_binder_venv(path: Path, tmp_path: Path, monkeypatch) -> None:
    from nbclient import NotebookClient

    spec = tmp_path / "jupyter" / "kernels" / "binder"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [BINDER_PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "binder venv", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("MOELAB_PRESET", os.environ.get("MOELAB_BINDER_PRESET", "binder"))
    monkeypatch.setenv("MOELAB_SOLUTIONS", "1")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="binder",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
