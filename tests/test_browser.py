"""JupyterLab in headless Chromium: every notebook, run as a learner runs it, at two window sizes.

This is the check that nbclient cannot make: that the widgets (ipywidgets, plotly's FigureWidget
through anywidget) actually render in JupyterLab 4 in a real browser, and that every figure fits
the output area. Each notebook is opened in a 1366 x 768 window with the file browser open (the
narrowest common laptop screen: the output area is then about 930 px wide), then Run > Run All
Cells; no cell may fail and every plot must draw its traces. The window is then resized to
1920 x 1080, as a learner resizes it: at both sizes no figure may be wider than its output area
(no horizontal scroll bar in any output). It uses Debian's
``/usr/bin/chromium`` (``.ci/run`` installs it) and never downloads a browser.

The notebooks' folder is copied to a temporary server root, so running them never writes
outputs or checkpoints into the repository. The kernel runs with MOELAB_PRESET=smoke and
MOELAB_SOLUTIONS=1 (the exercises' hidden solutions fill in the answers). Screenshots of every
figure land in ``build/browser/<notebook>_<width>x<height>_<n>.png`` (and the whole window in
``..._window.png``), to be looked at.

For development: ``MOELAB_BROWSER_NOTEBOOKS=00_tour,03_pr_moe`` picks notebooks,
``MOELAB_BROWSER_PRESET=laptop`` (or binder) runs them at another preset (slow: the laptop preset
trains for minutes), ``MOELAB_BROWSER_SIZES=1366x768`` picks window sizes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build" / "browser"
NOTEBOOK_DIR = REPO / "notebooks"
_chosen = os.environ.get("MOELAB_BROWSER_NOTEBOOKS", "")
NOTEBOOKS = ([NOTEBOOK_DIR / f"{name.strip().removesuffix('.ipynb')}.ipynb"
              for name in _chosen.split(",") if name.strip()]
             or sorted(NOTEBOOK_DIR.glob("*.ipynb")))
PRESET = os.environ.get("MOELAB_BROWSER_PRESET", "smoke")
SIZES = [tuple(int(v) for v in size.split("x"))
         for size in os.environ.get("MOELAB_BROWSER_SIZES", "1366x768,1920x1080").split(",")]

SERVER_START_TIMEOUT_S = 60
RUN_TIMEOUT_S = 240 if PRESET == "smoke" else 1500

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# JupyterLab user settings for a deterministic page: render every cell (no virtual scrolling,
# so the DOM holds all outputs), never autosave, no news or update checks.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {
        "windowingMode": "none",
        "autoStartDefaultKernel": True,
    },
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}

# A plotly figure in an output: a FigureWidget's div sits inside the output, a static figure's
# output *is* the plot div.
PLOT = ".jp-OutputArea-output.js-plotly-plot, .jp-OutputArea-output .js-plotly-plot"
# Drawn traces: scatter, bar, box... are <g class="trace">, a heatmap is <g class="hm"> holding an
# <image>; ._fullData is the list of traces plotly.js holds for the figure.
TRACE_COUNT_JS = """() => {
  const plots = [...document.querySelectorAll('PLOT')];
  return plots.map(gd => ({
    svg: gd.querySelectorAll('g.trace, g.hm, .heatmaplayer image').length,
    data: (gd._fullData || []).filter(t => t.visible !== false).length,
  }));
}"""
# Each figure against the output area it sits in: the plot's drawn width (its main svg), the
# output area's visible width, and whether anything inside the output scrolls sideways.
FIT_JS = """() => {
  const plots = [...document.querySelectorAll('PLOT')];
  return plots.map((gd, i) => {
    const output = gd.closest('.jp-OutputArea-output');
    const svg = gd.querySelector('svg.main-svg');
    const box = output.getBoundingClientRect();
    const plot = (svg || gd).getBoundingClientRect();
    let scrolls = [];
    for (let el = gd; el && el !== output.parentElement; el = el.parentElement) {
      if (el.scrollWidth > el.clientWidth + 1 &&
          ['auto', 'scroll'].includes(getComputedStyle(el).overflowX)) {
        scrolls.push(el.className.toString().slice(0, 60));
      }
    }
    return {index: i, plot_width: Math.round(plot.width), plot_left: Math.round(plot.left),
            plot_right: Math.round(plot.right), output_width: Math.round(output.clientWidth),
            output_left: Math.round(box.left), output_right: Math.round(box.right),
            output_scroll_width: output.scrollWidth, scrolls: scrolls};
  });
}"""
TRACE_COUNT_JS, FIT_JS = (js.replace("PLOT", PLOT) for js in (TRACE_COUNT_JS, FIT_JS))


def _chromium() -> str | None:
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _api(url: str, method: str = "GET") -> object:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read()
    return json.loads(body) if body else None


@dataclass
class Lab:
    base: str  # http://127.0.0.1:PORT
    token: str
    root: Path
    log: Path

    def url(self, path: str) -> str:
        sep = "&" if "?" in path else "?"
        return f"{self.base}{path}{sep}token={self.token}"

    def log_tail(self, n: int = 60) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def shutdown_kernels(self) -> None:
        try:
            for kernel in _api(self.url("/api/kernels")) or []:
                _api(self.url(f"/api/kernels/{kernel['id']}"), method="DELETE")
        except (urllib.error.URLError, OSError, ValueError):
            pass


@pytest.fixture(scope="module")
def chromium() -> str:
    path = _chromium()
    if path is None:
        pytest.skip("Debian chromium not installed; .ci/run installs it (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One JupyterLab server on a free port with its own config, data, settings, workspaces."""
    missing = [path for path in NOTEBOOKS if not path.is_file()]
    if missing:
        pytest.fail(f"{missing} missing: the browser test opens them in JupyterLab")
    tmp_path = tmp_path_factory.mktemp("lab")
    root = tmp_path / "root"
    shutil.copytree(
        NOTEBOOK_DIR, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__")
    )
    home = tmp_path / "jupyter"
    settings = home / "settings"
    for name, value in LAB_SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))

    env = dict(os.environ)
    env.update(
        MOELAB_PRESET=PRESET,
        MOELAB_SOLUTIONS="1",
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_DATA_DIR=str(home / "data"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        IPYTHONDIR=str(home / "ipython"),
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
        PYTHONUNBUFFERED="1",
    )
    token = secrets.token_hex(16)
    port = _free_port()
    log = tmp_path / "jupyter-lab.log"
    cmd = [
        sys.executable, "-m", "jupyterlab",
        "--no-browser",
        "--allow-root",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root}",
        f"--IdentityProvider.token={token}",
        "--ServerApp.terminals_enabled=False",
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={home / 'workspaces'}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]  # fmt: skip
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    server = Lab(base=f"http://127.0.0.1:{port}", token=token, root=root, log=log)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                _api(server.url("/api/status"))
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"jupyter lab did not answer within {SERVER_START_TIMEOUT_S} s:\n"
                        f"{server.log_tail()}"
                    )
                time.sleep(0.5)
        yield server
    finally:
        _stop(server, proc)


def _stop(server: Lab, proc: subprocess.Popen) -> None:
    """Shut kernels down through the API (each runs in a session of its own), then the server."""
    if proc.poll() is None:
        server.shutdown_kernels()
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


IDLE = ".jp-NotebookPanel-toolbar .jp-Notebook-ExecutionIndicator[data-status='idle']"


def _wait_for_kernel(page, lab: Lab, timeout_s: float = 60) -> None:
    """Wait for the notebook's kernel to be up and idle, accepting a "Select Kernel" dialog."""
    deadline = time.monotonic() + timeout_s
    while True:
        dialog_accept = page.locator(".jp-Dialog .jp-mod-accept")
        if dialog_accept.count() > 0 and dialog_accept.first.is_visible():
            dialog_accept.first.click()
        try:  # listing kernels while one is starting can answer 500; ask again
            kernels = _api(lab.url("/api/kernels"))
        except (urllib.error.URLError, OSError):
            kernels = None
        if kernels and page.locator(IDLE).count() > 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"no idle kernel after {timeout_s} s; kernels: {kernels}")
        page.wait_for_timeout(500)


def _code_prompts(page) -> list[str]:
    return page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").all_inner_texts()


def _wait_for_run(page, deadline: float) -> None:
    """Wait until no code cell is queued or running ([*]) and the kernel reports idle."""
    while True:
        prompts = _code_prompts(page)
        busy = any("*" in prompt for prompt in prompts)
        ran = any(re.search(r"\[\d+\]", prompt) for prompt in prompts)
        if ran and not busy and page.locator(IDLE).count() > 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"cells still running after {RUN_TIMEOUT_S} s: {prompts}")
        page.wait_for_timeout(500)


def sync_api_error() -> type[Exception]:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    return PlaywrightTimeout


def _open_file_browser(page) -> None:
    """The left sidebar open on the file browser, as a learner who opened the notebook has it."""
    tab = page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab[data-id='filebrowser']")
    tab.wait_for(timeout=30_000)
    if "lm-mod-current" not in (tab.get_attribute("class") or ""):
        tab.click()
    page.locator(".jp-FileBrowser").first.wait_for(state="visible", timeout=10_000)


@pytest.mark.browser
@pytest.mark.timeout(RUN_TIMEOUT_S + 120)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_renders_and_fits(chromium: str, lab: Lab, path: Path) -> None:
    """Run All in the first window size, then every figure must fit at each size in turn.

    The notebook runs once (running it per size would double the suite's longest test for the
    same cells); the window is then resized, as a learner resizes it, and each FigureWidget must
    follow its output area's new width (moelab.viz.fit's ResizeObserver).
    """
    sync_api = pytest.importorskip("playwright.sync_api")

    BUILD.mkdir(parents=True, exist_ok=True)
    for old in BUILD.glob(f"{path.stem}_*.png"):
        old.unlink()
    console_errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            width, height = SIZES[0]
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on(
                "console",
                lambda msg: console_errors.append(msg.text) if msg.type == "error" else None,
            )
            page.on("pageerror", lambda exc: console_errors.append(f"pageerror: {exc}"))
            try:
                plots = _run_notebook(page, lab, path)
                too_wide = {f"{w}x{h}": _fit_at(page, plots, f"{path.stem}_{w}x{h}", (w, h))
                            for w, h in SIZES} if plots else {}
            except BaseException:
                page.screenshot(path=str(BUILD / f"{path.stem}_failure.png"))
                raise
        finally:
            browser.close()
            lab.shutdown_kernels()
            if console_errors:  # shown by pytest when the test fails
                print("browser console errors:", *console_errors[:50], sep="\n  ")
    too_wide = {size: fits for size, fits in too_wide.items() if fits}
    assert not too_wide, f"figures wider than their output area in {path.name}: {too_wide}"


def _run_notebook(page, lab: Lab, path: Path):
    """Open the notebook, Run All, check that every cell ran clean; the plots' locator (or None)."""
    # A workspace of its own (reset): only this notebook open, whatever ran before it.
    page.goto(lab.url(f"/lab/workspaces/{path.stem}/tree/{path.name}?reset"),
              wait_until="domcontentloaded")
    page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
    _open_file_browser(page)
    _wait_for_kernel(page, lab)

    # Run > Run All Cells, as a learner would.
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()

    deadline = time.monotonic() + RUN_TIMEOUT_S
    _wait_for_run(page, deadline)
    # No cell may fail: an error output carries a traceback, a widget that fails shows a message.
    failures = []
    for output in page.locator(".jp-OutputArea-output").all():
        text = output.inner_text()
        mime = output.get_attribute("data-mime-type") or ""
        if (
            "Traceback" in text
            or "Error displaying widget" in text
            or (mime == "application/vnd.jupyter.stderr" and re.search(r"\w+Error\b", text))
        ):
            failures.append(text[:2000])
    assert not failures, "error output in the notebook:\n" + "\n---\n".join(failures)
    prompts = _code_prompts(page)
    # A cell whose input is hidden (an exercise's solution) shows no prompt; every other code
    # cell must show its execution count.
    hidden = sum(1 for cell in json.loads(path.read_text())["cells"] if cell["cell_type"] == "code"
                 and cell["metadata"].get("jupyter", {}).get("source_hidden"))
    unnumbered = [p for p in prompts if not re.search(r"\[\d+\]", p)]
    assert len(unnumbered) == hidden and all(p.strip() == "" for p in unnumbered), \
        f"not every cell ran ({hidden} hidden): {prompts}"
    if hidden:  # the hidden solutions ran too: every exercise's check passed
        checks = page.locator(".jp-OutputArea-output").filter(has_text=re.compile(r"^✓ "))
        assert checks.count() >= hidden, f"{checks.count()} checks passed for {hidden} exercises"

    # Every figure has data, and plotly.js drew it.
    plots = page.locator(PLOT)
    if plots.count() == 0:
        page.screenshot(path=str(BUILD / f"{path.stem}_window.png"))
        return None
    page.wait_for_function(
        f"() => ({TRACE_COUNT_JS})().every(p => p.svg > 0)", timeout=30_000, polling=250)
    counts = page.evaluate(TRACE_COUNT_JS)
    assert all(c["svg"] > 0 and c["data"] > 0 for c in counts), counts
    return plots


def _fit_at(page, plots, stem: str, size: tuple[int, int]) -> list[dict]:
    """The window at ``size``: the figures that do not fit their output area (screenshots too)."""
    page.set_viewport_size({"width": size[0], "height": size[1]})
    # Every figure fits its output area: nothing to scroll sideways to. A FigureWidget takes its
    # width from the kernel once the browser has reported the output's width (moelab.viz.fit),
    # so give that round trip a few seconds before measuring.
    try:
        page.wait_for_function(
            f"() => ({FIT_JS})().every(f => f.plot_right <= f.output_right + 1)",
            timeout=15_000, polling=250)
    except sync_api_error() as error:
        print(f"{stem}: figures still wider than their output after 15 s:", error)
    page.wait_for_timeout(500)  # plotly's autosize settles after the last relayout
    fits = page.evaluate(FIT_JS)
    too_wide = [fit for fit in fits
                if fit["plot_right"] > fit["output_right"] + 1 or fit["scrolls"]
                or fit["output_scroll_width"] > fit["output_width"] + 1]
    plots.first.scroll_into_view_if_needed()
    page.screenshot(path=str(BUILD / f"{stem}_window.png"))
    # Screenshots of whole outputs: a taller window (the width, and so every figure's width,
    # stays the same) so that an output taller than the screen is not cut off.
    page.set_viewport_size({"width": size[0], "height": 2400})
    page.wait_for_timeout(500)
    for index in range(len(fits)):
        output = plots.nth(index).locator("xpath=ancestor-or-self::div[contains("
                                          "concat(' ', @class, ' '), ' jp-OutputArea-output ')][1]")
        output.scroll_into_view_if_needed()
        output.screenshot(path=str(BUILD / f"{stem}_{index}.png"))
    return too_wide
