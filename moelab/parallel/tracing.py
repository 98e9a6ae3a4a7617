"""Which collective a rank is in, so that a timeout or failure can name it."""

from __future__ import annotations

from contextlib import contextmanager

_stack: list[str] = []
_failed_in: list[str] = []


@contextmanager
def operation(name: str):
    """Mark the enclosed collective: ``with operation("all_to_all (expert dispatch)"): ...``"""
    _stack.append(name)
    try:
        yield
    except BaseException:
        if not _failed_in:  # the innermost operation that raised
            _failed_in.append(name)
        raise
    finally:
        _stack.pop()


def failed_operation() -> str | None:
    """The collective an exception escaped from (or the one running now), if any."""
    if _failed_in:
        return _failed_in[0]
    return _stack[-1] if _stack else None
