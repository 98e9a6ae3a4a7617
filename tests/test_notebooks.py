"""Every notebook runs top to bottom with MOELAB_PRESET=smoke, and is committed clean.

The notebooks run headless through nbclient in a kernel of *this* interpreter (a kernelspec
written to a temporary JUPYTER_PATH, so a user's own "python3" kernel cannot stand in), from
their own folder, with MOELAB_PRESET=smoke and MOELAB_SOLUTIONS=1 (the hidden solution cells
fill in the exercises) in the kernel's environment.

Two checks keep the course from going stale:

- **claims**: every ``claim("name", ...)`` a notebook's code declares (moelab.course.claim)
  must report ``claim name: held`` or ``claim name: skipped: <reason>`` in the run; a claim the
  run contradicts raises, and so fails the notebook. Each notebook declares some, and at least
  one of them is judged (not skipped) even at the smoke preset.
- **exercises**: every notebook from 01 on has two or three "your turn" cells, each followed by
  a hidden solution and a check cell; with the solutions the checks pass (the run above), and
  without them the first check stops the notebook with a one-sentence ExerciseError.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 240
KERNEL_NAME = "moelab-test"

CLAIM_DECLARED = re.compile(r"""\bclaim\(\s*["']([^"'\s]+)["']""")
CLAIM_REPORTED = re.compile(r"^claim (\S+): (held\b.*|skipped: (.*))$", flags=re.M)
CHECK_CALL = re.compile(r"^check_\w+\(", flags=re.M)


def _ids(path: Path) -> str:
    return path.name


def _code_sources(nb) -> str:
    return "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")


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
    monkeypatch.setenv("MOELAB_SOLUTIONS", "1")
    return KERNEL_NAME


def test_there_are_notebooks():
    names = [path.name for path in NOTEBOOKS]
    assert "00_tour.ipynb" in names and "01_routing.ipynb" in names, names


def _claims(nb, text: str) -> tuple[set[str], dict[str, list[str]]]:
    declared = set(CLAIM_DECLARED.findall(_code_sources(nb)))
    reported: dict[str, list[str]] = {}
    for name, verdict, _ in CLAIM_REPORTED.findall(text):
        reported.setdefault(name, []).append(verdict)
    return declared, reported


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

    # Every declared claim reported held, or skipped with a reason; none reported undeclared.
    declared, reported = _claims(nb, text)
    assert declared, "a notebook states no checked claim: its readings are not checked"
    missing = sorted(declared - set(reported))
    assert not missing, f"claims declared but never reported (the cell did not check them): " \
                        f"{missing}"
    undeclared = sorted(set(reported) - declared)
    assert not undeclared, f"claims reported under names not written in the code: {undeclared}"
    for name, verdicts in reported.items():
        for verdict in verdicts:
            assert verdict.startswith("held") or re.match(r"skipped: \S", verdict), (name, verdict)
    judged = [name for name, verdicts in reported.items()
              if any(v.startswith("held") for v in verdicts)]
    assert judged, f"every claim was skipped at smoke: {reported}"

    # With MOELAB_SOLUTIONS=1 every exercise's check ran and passed.
    exercises = _exercises(nb)
    passed = len(re.findall(r"^✓ ", text, flags=re.M))
    assert passed >= len(exercises), f"{passed} checks passed for {len(exercises)} exercises"


def _exercises(nb) -> list[tuple[int, int, int]]:
    """(your-turn, solution, check) cell indices: a code cell that starts with "# Your turn", a
    hidden code cell that starts with "# Solution", then a cell that calls a check_ function."""
    cells = nb.cells
    found = []
    for i, cell in enumerate(cells):
        if cell.cell_type == "code" and cell.source.startswith("# Your turn"):
            solution, check = i + 1, i + 2
            assert check < len(cells), f"exercise at cell {i} has no solution and check after it"
            found.append((i, solution, check))
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_exercises_have_a_hidden_solution_and_a_check(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    exercises = _exercises(nb)
    number = int(path.name[:2])
    if number == 0:
        assert not exercises, "the tour has no exercises"
        return
    assert 2 <= len(exercises) <= 3, f"{len(exercises)} exercises; the course asks for 2 or 3"
    for yours, solution, check in exercises:
        turn, sol, chk = nb.cells[yours], nb.cells[solution], nb.cells[check]
        assert "..." in turn.source, f"the your-turn cell leaves nothing to fill in:\n{turn.source}"
        assert sol.cell_type == "code" and sol.source.startswith("# Solution"), sol.source[:200]
        assert sol.metadata.get("jupyter", {}).get("source_hidden") is True, \
            f"the solution is not hidden:\n{sol.source[:200]}"
        assert "if SOLUTIONS:" in sol.source, "a solution must fill in only with MOELAB_SOLUTIONS"
        assert chk.cell_type == "code" and CHECK_CALL.search(chk.source), chk.source[:200]
        task = nb.cells[yours - 1]
        assert task.cell_type == "markdown" and re.match(r"#+ Your turn", task.source), \
            f"say what to do above the your-turn cell:\n{task.source[:200]}"


@pytest.mark.notebook
@pytest.mark.timeout(300)
def test_an_unanswered_exercise_stops_with_a_helpful_message(kernel_env: str, monkeypatch):
    """Without the solutions, 01's first check stops the run with one sentence, no traceback."""
    monkeypatch.setenv("MOELAB_SOLUTIONS", "0")
    path = REPO / "notebooks" / "01_routing.ipynb"
    nb = nbformat.read(path, as_version=4)
    first_check = _exercises(nb)[0][2]
    nb.cells = nb.cells[:first_check + 1]
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=kernel_env,
                            resources={"metadata": {"path": str(path.parent)}})
    with pytest.raises(CellExecutionError):
        client.execute()
    errors = [o for o in nb.cells[first_check].outputs if o.output_type == "error"]
    assert len(errors) == 1, nb.cells[first_check].outputs
    error = errors[0]
    assert error.ename == "ExerciseError", error
    assert "not answered yet" in error.evalue and "`...`" in error.evalue, error.evalue
    shown = "\n".join(error.traceback)
    assert "Traceback" not in shown and "File " not in shown and len(error.traceback) <= 3, shown


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
