"""Fault injection on 2 and 4 gloo ranks: every fault surfaces as a RankError that names the
right rank (and the collective, for a stall) within the collective timeout + 10 s of the fault,
with its traceback or exit signal in the message, and no process of the run is left.

The measured time from each fault to the error is printed (``pytest -s`` shows it)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from moelab.parallel import RankError, launch

TESTS = str(Path(__file__).parent)
ENV = {"PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
COLLECTIVE_TIMEOUT = 4.0
SLACK = 10.0  # the bound: the error within the collective timeout + 10 s of the fault


def faulty_run(target: str, nprocs: int, marks: Path, *args):
    """Launch a fault; return (the RankError, seconds from the fault to the error)."""
    with pytest.raises(RankError) as info:
        launch("fault_targets:" + target, nprocs=nprocs, args=(str(marks), *args), timeout=120,
               collective_timeout=COLLECTIVE_TIMEOUT, quiet=True, env=ENV)
    raised = time.time()
    stamps = [float(p.read_text()) for p in marks.glob("arrived_*")]
    stamps += [float(p.read_text()) for p in marks.glob("died")]
    fault = min(stamps) if stamps else raised
    assert_no_process_left(marks)
    # a failed run keeps its folder (the ranks' logs), and says where
    assert info.value.run_dir.is_dir() and str(info.value.run_dir) in str(info.value)
    shutil.rmtree(info.value.run_dir)
    print(f"\n{target} on {nprocs} ranks: error {raised - fault:.1f} s after the fault")
    return info.value, raised - fault


def assert_no_process_left(marks: Path) -> None:
    pids = [int(p.read_text()) for p in marks.glob("pid_*")]
    assert pids, "the ranks wrote no PIDs"
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    assert alive == [], f"processes of the run are still alive: {alive}"


@pytest.fixture
def marks(tmp_path):
    path = tmp_path / "marks"
    path.mkdir()
    return path


@pytest.mark.parametrize("nprocs", [2, 4])
def test_a_rank_that_raises_is_named_with_its_traceback(marks, nprocs):
    faulty = nprocs - 1
    error, seconds = faulty_run("raise_after_collectives", nprocs, marks, faulty)
    assert error.rank == faulty
    assert f"rank {faulty} raised on purpose after three collectives" in str(error)
    assert "Traceback" in str(error) and "raise_after_collectives" in str(error)
    assert seconds < SLACK


@pytest.mark.parametrize("nprocs", [2, 4])
def test_a_rank_stalled_before_the_expert_exchange_is_named_with_the_collective(marks, nprocs):
    error, seconds = faulty_run("stall_in_exchange", nprocs, marks, 1)
    assert error.rank == 1 and error.operation == "all_gather (exchange sizes)"
    assert "rank 1 did not arrive at all_gather (exchange sizes)" in str(error)
    assert "stall_in_exchange" in str(error)  # its stack: where it was instead (time.sleep)
    assert seconds < COLLECTIVE_TIMEOUT + SLACK


@pytest.mark.parametrize("nprocs,ep_size", [(2, 1), (4, 2)])
def test_a_rank_stalled_before_the_expert_gradient_all_reduce(marks, nprocs, ep_size):
    error, seconds = faulty_run("stall_in_expert_gradient_sync", nprocs, marks, 1, ep_size)
    assert error.rank == 1
    assert error.operation == "all_reduce (expert gradients over the expert-data-parallel group)"
    assert seconds < COLLECTIVE_TIMEOUT + SLACK


@pytest.mark.parametrize("nprocs", [2, 4])
def test_a_rank_stalled_before_a_checkpoint_gather(marks, nprocs):
    error, seconds = faulty_run("stall_in_checkpoint_gather", nprocs, marks, nprocs - 1)
    assert error.rank == nprocs - 1 and error.operation == "all_gather (expert checkpoint)"
    assert seconds < COLLECTIVE_TIMEOUT + SLACK


@pytest.mark.parametrize("nprocs", [2, 4])
def test_a_killed_rank_is_the_cause_not_the_survivors(marks, nprocs):
    error, seconds = faulty_run("die_while_others_wait", nprocs, marks, 1, "sigkill")
    assert error.rank == 1
    assert "rank 1 was killed by SIGKILL (exit code -9)" in str(error)
    assert "the other ranks:" in str(error) and "rank 0" in str(error)
    assert seconds < SLACK


@pytest.mark.parametrize("nprocs", [2, 4])
def test_a_rank_that_exits_without_a_result_while_others_wait(marks, nprocs):
    error, seconds = faulty_run("die_while_others_wait", nprocs, marks, 1, "exit0")
    assert error.rank == 1
    assert "rank 1 exited (code 0) without returning a result" in str(error)
    assert seconds < SLACK


@pytest.mark.parametrize("nprocs", [2, 4])
def test_a_rank_that_exits_without_a_result_after_the_others_are_done(marks, nprocs):
    error, seconds = faulty_run("exit_after_others_are_done", nprocs, marks, nprocs - 1)
    assert error.rank == nprocs - 1
    assert f"rank {nprocs - 1} exited (code 0) without returning a result" in str(error)
    assert "rank 0 finished" in str(error)
    assert seconds < SLACK


@pytest.mark.parametrize("nprocs", [2, 4])
@pytest.mark.parametrize("drop_tokens", [True, False], ids=["capacity", "dropless"])
def test_a_rank_without_tokens_takes_part_and_the_others_get_the_right_answer(nprocs,
                                                                             drop_tokens):
    results = launch("fault_targets:zero_tokens_on_one_rank", nprocs=nprocs,
                     args=(1, drop_tokens), timeout=120, quiet=True, env=ENV)
    for result in results:
        assert result["shape"] == (result["tokens"], 8)
        assert result["grad_shape"] == (result["tokens"], 8)
        assert result["error"] < 1e-6, result
    assert results[1]["tokens"] == 0


def test_a_run_leaves_no_folder_behind():
    """The launcher's files live in the run's own temporary folder, removed when it succeeds
    (torch elastic's launcher left a torchelastic_* folder in the temp directory per run)."""
    temp = Path(tempfile.gettempdir())
    before = set(temp.glob("moelab-launch-*")) | set(temp.glob("torchelastic_*"))
    launch("dist_targets:hello", nprocs=2, args=(1,), timeout=60, quiet=True, env=ENV)
    after = set(temp.glob("moelab-launch-*")) | set(temp.glob("torchelastic_*"))
    assert after == before
