"""Which collective a rank is in, so that a timeout or failure can name it and its peers.

Every moelab collective runs inside ``operation(name)``. The rank keeps the name in memory and,
inside a `launch`, also in a small memory-mapped file of the run's folder (a memory write, no
system call), so that the launcher can read where every rank was when one of them failed: the
ranks waiting in a collective, and the ones that never arrived.
"""

from __future__ import annotations

import mmap
import time
from contextlib import contextmanager
from pathlib import Path

STATE_BYTES = 256  # "<unix time> <operation name>" or "<unix time> -" (outside any collective)

_stack: list[str] = []
_failed_in: list[str] = []
_state: mmap.mmap | None = None


def open_state(path: Path) -> None:
    """Publish this rank's current operation in ``path`` from now on (the worker calls it)."""
    global _state
    path.write_bytes(b" " * STATE_BYTES)
    with open(path, "r+b") as f:
        _state = mmap.mmap(f.fileno(), STATE_BYTES)
    _publish("-")


def _publish(name: str) -> None:
    if _state is not None:
        text = f"{time.time():.3f} {name}".encode()[:STATE_BYTES]
        _state[:] = text.ljust(STATE_BYTES)


def read_state(path: Path) -> tuple[float, str | None] | None:
    """(since when, operation or None outside any collective) from a rank's state file."""
    try:
        stamp, _, name = path.read_text().strip().partition(" ")
        return float(stamp), None if name in ("", "-") else name
    except (OSError, ValueError):
        return None


@contextmanager
def operation(name: str):
    """Mark the enclosed collective: ``with operation("all_to_all (expert dispatch)"): ...``"""
    _stack.append(name)
    _publish(name)
    try:
        yield
    except BaseException:
        if not _failed_in:  # the innermost operation that raised (the state keeps its name)
            _failed_in.append(name)
        _stack.pop()
        raise
    _stack.pop()
    _publish(_stack[-1] if _stack else "-")


def failed_operation() -> str | None:
    """The collective an exception escaped from (or the one running now), if any."""
    if _failed_in:
        return _failed_in[0]
    return _stack[-1] if _stack else None
