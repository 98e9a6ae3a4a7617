"""What every view shares: a notebook shows it as its ``widget``; a live one (fed by a Trainer,
a probe or a launch while it runs) redraws at most every ``min_redraw_seconds``, and its last
state is always drawn when the run ends."""

from __future__ import annotations

import time

MIN_REDRAW_SECONDS = 0.3  # at most ~3 redraws a second, however fast the records arrive


class View:
    """A view: its ``widget`` (set by the subclass) is what the notebook displays."""

    widget = None

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


class LiveView(View):
    """A view redrawn from records as they arrive: ``redraw_due()`` says whether the last
    redraw is old enough; ``refresh`` calls ``_drew()`` after each redraw (``redraws`` counts
    them)."""

    def __init__(self, min_redraw_seconds: float = MIN_REDRAW_SECONDS) -> None:
        self.min_redraw_seconds = min_redraw_seconds
        self.redraws = 0
        self._last_draw = 0.0

    def redraw_due(self) -> bool:
        return time.monotonic() - self._last_draw >= self.min_redraw_seconds

    def _drew(self) -> None:
        self.redraws += 1
        self._last_draw = time.monotonic()

    def _redraw_layer(self, draw, arrays) -> None:
        """One batch redraw of a view with a layer picker (its ``figure``, ``layer_picker`` and
        ``layer_names``): ``draw(figure, arrays, layer, layer_name)`` for the picked layer."""
        layer = self.layer_picker.value or 0
        with self.figure.batch_update():
            draw(self.figure, arrays, layer, self.layer_names[layer] if self.layer_names else "")
        self._drew()
