"""What went wrong in a failed launch, from what the ranks left in the run's folder.

The root cause is named first, then what every other rank did:

1. a rank that died without raising (killed by a signal, ``os._exit``, a crash in C) caused
   whatever the survivors saw after (their "connection closed" errors are its consequences);
2. else the rank whose own code raised first (timeouts and lost peers are consequences);
3. else, when ranks timed out waiting in a collective, a rank that raised nothing never
   arrived: the waiting ranks say which collective, its state file where it was instead, and a
   Python stack taken at the end what it was doing;
4. else the first error.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass, field
from pathlib import Path

from . import rundir
from .tracing import read_state


class RankError(RuntimeError):
    """A rank of a `launch` failed. ``rank`` is the root cause (the rank that died, raised
    first, or never arrived at a collective the others waited in); ``operation`` the moelab
    collective concerned (or None); ``traceback_text`` its traceback or exit; ``others`` a line
    per other rank; ``run_dir`` where the ranks' logs were kept (or None)."""

    def __init__(self, rank: int, traceback_text: str, *, operation: str | None = None,
                 headline: str | None = None, others: list[str] | None = None,
                 run_dir: Path | None = None) -> None:
        self.rank, self.traceback_text, self.operation = rank, traceback_text, operation
        self.others, self.run_dir = others or [], run_dir
        parts = [headline or f"rank {rank} failed:", traceback_text.rstrip()]
        if self.others:
            parts.append("the other ranks:\n" + "\n".join(f"  {line}" for line in self.others))
        if run_dir is not None:
            parts.append(f"the ranks' logs are kept in {run_dir}")
        super().__init__("\n".join(parts))


def describe_exit(code: int | None) -> str:
    if code is None:
        return "was still running and was stopped"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit code {code})"
    return f"exited (code {code})"


@dataclass
class RankRecord:
    rank: int
    exit_code: int | None = None  # None: still running when the run was stopped
    exited_at: float | None = None  # when the launcher saw it exit (time.time())
    error: dict | None = None  # its error_r.json
    has_result: bool = False
    state: tuple[float, str | None] | None = None  # (since, operation) from state_r
    stack: str = ""  # its stack_r.txt (taken just before it was stopped)
    log: list[str] = field(default_factory=list)

    @property
    def died(self) -> bool:
        """Ended without a Python error and without a result: a signal or os._exit."""
        return self.exit_code is not None and self.error is None and not (
            self.exit_code == 0 and self.has_result)


def read_records(run_dir: Path, nprocs: int, exits: dict[int, tuple[int | None, float | None]],
                 logs: dict[int, list[str]]) -> list[RankRecord]:
    records = []
    for rank in range(nprocs):
        code, when = exits.get(rank, (None, None))
        error_path, stack_path = rundir.error(run_dir, rank), rundir.stack(run_dir, rank)
        records.append(RankRecord(
            rank=rank, exit_code=code, exited_at=when,
            error=json.loads(error_path.read_text()) if error_path.exists() else None,
            has_result=rundir.result(run_dir, rank).exists(),
            state=read_state(rundir.state(run_dir, rank)),
            stack=stack_path.read_text() if stack_path.exists() else "",
            log=logs.get(rank, [])))
    return records


def _where(record: RankRecord) -> str:
    if record.state is None or record.state[1] is None:
        return "outside any moelab collective"
    return f"in the moelab collective {record.state[1]}"


def _last_lines(text: str, count: int) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[-count:])


def _summary(record: RankRecord) -> str:
    if record.error is not None:
        where = f" in {record.error['operation']}" if record.error.get("operation") else ""
        verb = {"timeout": "timed out", "peer_lost": "lost a peer"}.get(
            record.error.get("kind"), "raised")
        return f"rank {record.rank} {verb}{where}: {record.error.get('summary', '')}"
    if record.died:
        return f"rank {record.rank} {describe_exit(record.exit_code)}"
    if record.exit_code == 0:
        return f"rank {record.rank} finished"
    return f"rank {record.rank} {describe_exit(record.exit_code)} ({_where(record)})"


def diagnose(records: list[RankRecord], run_dir: Path | None) -> RankError | None:
    """The RankError for a failed run (None when every rank returned a result)."""
    if all(r.exit_code == 0 and r.has_result for r in records):
        return None
    died = sorted((r for r in records if r.died), key=lambda r: r.exited_at or 0.0)
    errors = sorted((r for r in records if r.error is not None), key=lambda r: r.error["time"])
    raised = [r for r in errors if r.error.get("kind") == "raised"]
    timeouts = [r for r in errors if r.error.get("kind") == "timeout"]

    def others(root: RankRecord) -> list[str]:
        return [_summary(r) for r in records if r is not root]

    if died:
        root = died[0]
        what = ("exited (code 0) without returning a result" if root.exit_code == 0
                else describe_exit(root.exit_code))
        tail = _last_lines("".join(root.log), 5)
        text = f"rank {root.rank} {what}" + (f"; its last output:\n{tail}" if tail else "")
        return RankError(root.rank, text, headline=f"rank {root.rank} failed first:",
                         others=others(root), run_dir=run_dir)
    if raised:
        root = raised[0]
        return RankError(root.rank, root.error["traceback"], operation=root.error.get("operation"),
                         others=others(root), run_dir=run_dir)
    absent = [r for r in records if r.error is None and not r.has_result]
    if timeouts and absent:
        # Ranks waited in a collective until it timed out (and the peers they left saw their
        # connections close): a rank that raised nothing never arrived.
        root, waited_in = absent[0], timeouts[0].error.get("operation")
        stack = _last_lines(root.stack, 12)
        text = (f"rank {root.rank} did not arrive at {waited_in or 'a collective'}: rank(s) "
                f"{sorted(r.rank for r in timeouts)} waited there and timed out; rank "
                f"{root.rank} was {_where(root)}" + (f"\nits stack:\n{stack}" if stack else ""))
        return RankError(root.rank, text, operation=waited_in,
                         headline=f"rank {root.rank} stalled:", others=others(root),
                         run_dir=run_dir)
    if errors:
        root = (timeouts or errors)[0]
        return RankError(root.rank, root.error["traceback"], operation=root.error.get("operation"),
                         others=others(root), run_dir=run_dir)
    root = next(r for r in records if not (r.exit_code == 0 and r.has_result))
    return RankError(root.rank, f"rank {root.rank} {describe_exit(root.exit_code)}",
                     others=[_summary(r) for r in records if r is not root], run_dir=run_dir)
