"""Figures that fit the output area they are drawn in.

A figure with a fixed width scrolls sideways in a narrow JupyterLab window (a 1366-px screen
with the file browser open leaves about 930 px to a notebook's output) and wastes a wide one.
Static figures (``fig.show()``) are easy: without a width, plotly sizes them to their output
area. A ``go.FigureWidget`` is not: it is drawn before its output area is on the page, so plotly
falls back to its default 700 px, and it does not follow the window afterwards.

So every view puts its figures in a `FitBox`: a column as wide as the output area (at most
MAX_WIDTH_PX) holding a zero-height `WidthProbe`, a small widget that reports the width the
browser gives it, now and after every resize (a ResizeObserver). The box sets each figure's width
to that, clamped to [MIN_WIDTH_PX, MAX_WIDTH_PX] (below the minimum the panels' labels collide;
above the maximum a wide monitor would stretch the heatmaps' cells). Until a browser reports (a
headless run, or while the kernel is busy), a figure keeps plotly's autosize.
"""

from __future__ import annotations

import anywidget
import ipywidgets as widgets
import plotly.graph_objects as go
import traitlets

MIN_WIDTH_PX = 560
MAX_WIDTH_PX = 1280


def autosize(fig: go.Figure) -> go.Figure:
    """Let plotly size the figure's width to its output area (its height stays as set)."""
    fig.update_layout(autosize=True, width=None)
    return fig


def fitted_width(available: int) -> int | None:
    """The width a figure gets in an output area ``available`` px wide (None: not known)."""
    if available <= 0:
        return None
    return max(MIN_WIDTH_PX, min(MAX_WIDTH_PX, int(available)))


class WidthProbe(anywidget.AnyWidget):
    """Zero height, full width: reports the width (px) of the box it is drawn in."""

    _esm = """
    function render({ model, el }) {
      el.style.height = "0px";
      el.style.overflow = "hidden";
      const report = () => {
        const width = Math.round(el.getBoundingClientRect().width);
        if (width > 0 && width !== model.get("width")) {
          model.set("width", width);
          model.save_changes();
        }
      };
      const observer = new ResizeObserver(report);
      observer.observe(el);
      report();
      return () => observer.disconnect();
    }
    export default { render };
    """
    width = traitlets.Int(0).tag(sync=True)


class FitBox(widgets.VBox):
    """A column of widgets whose FigureWidgets take the width of the output area.

    ``FitBox(controls, figure)``; ``children`` are the widgets given, then the probe (replace
    them with `set_children` to keep the probe)."""

    def __init__(self, *children: widgets.Widget) -> None:
        self.probe = WidthProbe()
        super().__init__([*children, self.probe], layout=widgets.Layout(
            width="100%", max_width=f"{MAX_WIDTH_PX}px"))
        self.probe.observe(lambda change: self.fit(), names="width")
        self.observe(lambda change: self.fit(), names="children")

    def set_children(self, *children: widgets.Widget) -> None:
        self.children = (*children, self.probe)

    def fit(self) -> None:
        width = fitted_width(self.probe.width)
        if width is None:
            return
        for child in self.children:
            if isinstance(child, go.FigureWidget) and child.layout.width != width:
                child.layout.width = width


def bounded(*children: widgets.Widget) -> FitBox:
    """A `FitBox` of these widgets (controls, then figures)."""
    return FitBox(*children)
