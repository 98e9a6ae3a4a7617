"""Expert parallelism on gloo: equivalence with one process, training, resharding, launch.

Every multi-process run goes through moelab.parallel.launch (torch elastic), with a timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moelab.exchanges import messages_per_exchange
from moelab.parallel import RankError, launch, parallel_layout, torchrun_command

TESTS = str(Path(__file__).parent)
ENV = {"PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
TOL = 1e-6
CHECKS = "moelab.examples.parallel_checks:"


def run(target, nprocs, *args, timeout=120):
    return launch(target, nprocs=nprocs, args=args, timeout=timeout, quiet=True, env=ENV)


EP_CASES = [
    dict(k=1), dict(k=2), dict(k=1, drop_tokens=False), dict(k=2, drop_tokens=False),
    dict(k=2, residual=True),
    dict(k=1, exchange="hierarchical", node_size=2),
    dict(k=2, exchange="hierarchical", node_size=2),
    dict(k=2, drop_tokens=False, exchange="hierarchical", node_size=2),
]


def check_results(results):
    for rank_results in results:
        for result in rank_results:
            for key in ("y", "x_grad", "router_grad", "expert_grad"):
                assert result[key] < TOL, result


def test_ep4_equals_single_process_flat_and_hierarchical():
    results = run(CHECKS + "ep_equivalence", 4, EP_CASES, 4)
    check_results(results)
    # ranks saw different token counts, and the last expert received nothing anywhere
    assert len({r[0]["tokens"] for r in results}) == 4
    assert all(case["load"][-1] == 0 for r in results for case in r)
    # messages per rank per forward: flat 2 × (p - 1) = 6, hierarchical 2 × ((G-1) + (p/G-1)) = 4
    by_case = {str(c["case"]): c["messages"] for c in results[0]}
    assert by_case[str(EP_CASES[0])] == 6
    assert by_case[str(EP_CASES[6])] == 4


def test_ep2_and_tp_coordinated_equal_single_process():
    check_results(run(CHECKS + "ep_equivalence", 2, EP_CASES[:5], 2))
    results = run(CHECKS + "ep_equivalence", 4, [dict(k=1, exchange="tp_coordinated", tp_size=2),
                                                 dict(k=2, exchange="tp_coordinated", tp_size=2)],
                  2)
    check_results(results)
    # TP ranks 0 and 1 hold the same tokens; each exchanges with 1 peer twice + 1 all-gather
    assert results[0][0]["tokens"] == results[1][0]["tokens"]
    assert results[0][0]["messages"] == 3


@pytest.mark.parametrize("nprocs,ep_size", [(2, 2), (4, 2)])
def test_training_with_ep_matches_ep1(nprocs, ep_size):
    result = run(CHECKS + "ep_training_equivalence", nprocs, ep_size)[0]
    assert result["losses_ep"] == pytest.approx(result["losses_ep1"], rel=1e-6)
    # Adam divides by sqrt(v): parameters whose gradients are ~0 amplify summation-order noise;
    # 1e-5 is 0.3% of one Adam step at lr 3e-3
    assert result["param_error"] < 1e-5


def test_reshard_4_2_1_4_keeps_outputs_and_optimizer_state():
    result = run(CHECKS + "reshard_roundtrip", 4)[0]
    assert result["ep_sizes"] == [4, 2, 1, 4]
    assert result["probe_loss"] == pytest.approx([result["probe_loss"][0]] * 4, rel=1e-6)
    assert result["next_step_loss"] == pytest.approx([result["next_step_loss"][0]] * 4,
                                                     rel=1e-5)
    assert result["next_step_loss"][0] != result["probe_loss"][0]


def test_launch_returns_results_streams_output_and_metrics(capsys):
    metrics = []
    results = launch("dist_targets:hello", nprocs=2, args=(7,), env=ENV, timeout=60,
                     on_metric=lambda rank, record: metrics.append((rank, record)))
    assert [r["rank"] for r in results] == [0, 1] and all(r["total"] == 3.0 for r in results)
    assert all(r["x"] == 7 for r in results)
    out = capsys.readouterr().out
    assert "[rank 0] hello from rank 0" in out and "[rank 1] hello from rank 1" in out
    assert sorted(rank for rank, _ in metrics) == [0, 1]
    assert all(record == {"step": 1, "total": 3.0} for _, record in metrics)


def _workers_alive(pids):
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive


def test_a_failing_rank_ends_the_run_fast_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(RankError, match="rank one exploded on purpose") as info:
        run("dist_targets:fail_on_rank_one", 3, timeout=60)
    assert info.value.rank == 1
    assert time.monotonic() - start < 30  # ~5 s of start-up; the failure itself ends in < 10 s
    leftovers = subprocess.run(["pgrep", "-f", "moelab.parallel.worker"], capture_output=True,
                               text=True).stdout.split()
    assert leftovers == []


def test_a_hung_collective_ends_at_the_collective_timeout_naming_it_and_the_absent_rank():
    with pytest.raises(RankError, match=r"rank 1 did not arrive at all_reduce \(test\)") as info:
        launch("dist_targets:hang_in_collective", nprocs=2, timeout=60, collective_timeout=3,
               quiet=True, env=ENV)
    assert info.value.rank == 1 and info.value.operation == "all_reduce (test)"


def test_bad_input_fails_clearly_without_hanging():
    with pytest.raises(ValueError, match="nprocs must be an integer >= 1"):
        launch("dist_targets:hello", nprocs=0)
    with pytest.raises(ValueError, match="cannot be imported"):
        launch("no_such_module_xyz:main", nprocs=2)
    with pytest.raises(ValueError, match="has no function"):
        launch(CHECKS + "nope", nprocs=2)
    with pytest.raises(ValueError, match="defined in the notebook"):
        launch(lambda: None, nprocs=2)
    with pytest.raises(ValueError, match="backend must be one of"):
        launch("dist_targets:hello", nprocs=2, backend="mpi")
    with pytest.raises(ValueError, match="needs one GPU per rank"):
        launch("dist_targets:hello", nprocs=2, backend="nccl")
    with pytest.raises(RankError, match="ep_size=3 must divide the world size 2"):
        run("dist_targets:bad_ep_size", 2, timeout=60)
    with pytest.raises(RankError, match="ranks built MoE layers with different configs"):
        run("dist_targets:mismatched_layers", 2, timeout=60)
    with pytest.raises(RankError, match="dropless routing has no capacity"):
        run("dist_targets:tp_coordinated_dropless", 2, timeout=60)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0, -5, True])
def test_launch_refuses_a_bad_timeout_at_the_call(value):
    with pytest.raises(ValueError, match="timeout"):
        launch("dist_targets:hello", nprocs=2, timeout=value)
    with pytest.raises(ValueError, match="collective_timeout"):
        launch("dist_targets:hello", nprocs=2, collective_timeout=value)
    with pytest.raises(ValueError, match=r"collective_timeout \(seconds\) must be a finite number "
                                         r"in \(0, 10\]"):
        launch("dist_targets:hello", nprocs=2, timeout=10, collective_timeout=20)


def test_launch_says_which_argument_cannot_be_sent_to_the_ranks():
    import threading

    with pytest.raises(ValueError, match=r"args\[1\] \(lock\) cannot be sent to the ranks"):
        launch("dist_targets:hello", nprocs=2, args=(1, threading.Lock()))
    with pytest.raises(ValueError, match=r"kwargs\['f'\] \(function\) cannot be sent"):
        launch("dist_targets:hello", nprocs=2, kwargs={"f": lambda: 0})


def test_layouts_and_message_formulas():
    layout = parallel_layout(8, 4, num_experts=8)
    assert layout.ep_groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert layout.edp_groups == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert list(layout.local_experts(5, 8)) == [2, 3]
    with pytest.raises(ValueError, match="must divide num_experts=6"):
        parallel_layout(8, 4, num_experts=6)
    with pytest.raises(ValueError, match="must divide the world size 6"):
        parallel_layout(6, 4)
    # the paper's layouts: 128 GPUs, 8 per node, 8-way TP
    assert [messages_per_exchange(128, name, node_size=8, tp_size=8)
            for name in ("flat", "hierarchical", "tp_coordinated")] == [127, 7 + 15, 15 + 7]


def test_torchrun_command_for_several_nodes():
    command = torchrun_command(CHECKS + "ep_equivalence", nnodes=2, nproc_per_node=8)
    assert command.startswith("torchrun --nnodes=2 --nproc-per-node=8 --node-rank=$NODE_RANK")
    assert f"-m moelab.parallel.worker --target {CHECKS}ep_equivalence" in command
    assert sys.executable  # the command uses torchrun from the same environment


@pytest.mark.parametrize("nprocs,ep_size", [(2, 2), (4, 4), (2, 1)])
def test_aux_free_bias_follows_the_whole_batch_on_every_rank(nprocs, ep_size):
    results = run(CHECKS + "aux_free_bias_equivalence", nprocs, ep_size)
    for result in results:
        assert result["differences"] == [0.0] * 4, result
        assert result["spread"] == 0.0 and result["checkpoint"] == 0.0
    assert max(abs(b) for b in results[0]["bias"]) > 0  # the bias moved
