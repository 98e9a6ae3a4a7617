"""Every notebook runs top to bottom with MOELAB_PRESET=smoke, and is committed clean.

The notebooks run headless through nbclient in a kernel of *this* interpreter (a kernelspec
written to a temporary JUPYTER_PATH, so a user's own "python3" kernel cannot stand in), from
their own folder, with MOELAB_PRESET=smoke in the kernel's environment.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 240
KERNEL_NAME = "moelab-test"


def _ids(path: Path) -> str:
    return path.name


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    spec = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "moelab test kernel", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # no user startup files
    monkeypatch.setenv("MOELAB_PRESET", "smoke")
    return KERNEL_NAME


def test_there_are_notebooks():
    names = [path.name for path in NOTEBOOKS]
    assert "00_tour.ipynb" in names and "01_routing.ipynb" in names, names


@pytest.mark.notebook
@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_runs_with_smoke_preset(path: Path, kernel_env: str) -> None:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=kernel_env,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

    outputs = [output for cell in nb.cells if cell.cell_type == "code"
               for output in cell.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    # The kernel saw the preset: the parameters cell prints it.
    assert "preset 'smoke'" in text, text[:2000]
    assert all(cell.execution_count is not None for cell in nb.cells
               if cell.cell_type == "code" and cell.source.strip())


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_is_committed_clean(path: Path) -> None:
    """Outputs stripped, no execution counts, no widget state; DESIGN.md's notebook rules."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "a notebook without code"
    for cell in code:
        assert cell.outputs == [], f"outputs left in cell:\n{cell.source[:200]}"
        assert cell.execution_count is None, f"execution count left in:\n{cell.source[:200]}"
        assert "execution" not in cell.metadata, "execution timing left in cell metadata"
    assert "widgets" not in nb.metadata, "widget state saved in the notebook metadata"

    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    assert re.search(r"hardware", first.source, flags=re.I), "say what hardware it needs"
    assert re.search(r"\btime\b|minute", first.source, flags=re.I), "say how long it takes"
    sources = "\n".join(cell.source for cell in code)
    assert re.search(r"os\.environ\.get\(\s*[\"']MOELAB_PRESET[\"']", sources), \
        "a parameters cell must read MOELAB_PRESET"
    assert not re.search(r"^\s*[%!]\s*pip\b", sources, flags=re.M), "no %pip / !pip installs"
