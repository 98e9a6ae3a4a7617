"""ParallelView on synthetic traffic records (no browser, no processes), then fed by one real
2-rank launch of expert-parallel training."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from moelab.exchanges import messages_per_forward
from moelab.parallel import launch, parallel_layout
from moelab.viz.parallel_view import ParallelView, parallel_data, parallel_figure


def record(rank, step, traffic, expert_load, **extra):
    """A minimal record: 2 ranks, 4 experts, flat exchange unless `extra` says otherwise."""
    return {"rank": rank, "step": step, "world": len(traffic), "num_experts": len(expert_load),
            "traffic": traffic, "expert_load": expert_load, "row_bytes": 64,
            "messages": 2, "bytes_sent": 64 * 2 * sum(t for i, t in enumerate(traffic)
                                                        if i != rank), **extra}


def two_rank_records():
    # step 1 complete; step 2 only from rank 0 (the view must draw step 1)
    return [
        record(0, 1, [3, 5], [1, 2, 4, 1], loss=2.0),
        record(1, 1, [2, 6], [0, 2, 5, 1], loss=4.0),
        record(0, 2, [8, 0], [4, 4, 0, 0], loss=1.0),
    ]


def test_data_assembles_traffic_placement_and_load():
    data = parallel_data(two_rank_records())
    assert data["world"] == 2 and data["num_experts"] == 4 and data["step"] == 1
    np.testing.assert_array_equal(data["traffic"], [[3, 5], [2, 6]])
    np.testing.assert_array_equal(data["traffic_bytes"], 64 * np.array([[3, 5], [2, 6]]))
    np.testing.assert_array_equal(data["rows_received"], [5, 11])
    layout = parallel_layout(2, 2)
    for rank in range(2):  # placement defaults to the experts-first layout
        assert list(np.flatnonzero(data["placement"][rank])) == \
            list(layout.local_experts(rank, 4))
    np.testing.assert_array_equal(data["expert_tokens"], [1, 4, 9, 2])
    # routes the EP group sent to each rank's experts: rank 0 holds e0, e1; rank 1 e2, e3
    np.testing.assert_array_equal(data["rank_tokens"], [1 + 2 + 0 + 2, 4 + 1 + 5 + 1])
    assert data["loss"] == pytest.approx(3.0)
    np.testing.assert_array_equal(data["losses"][0], [1, 2])
    np.testing.assert_allclose(data["losses"][1], [3.0, 1.0])
    assert data["formula"] == {"flat": 2}
    np.testing.assert_array_equal(data["messages"]["flat"], [2, 2])


def test_data_with_one_rank_missing_shows_what_arrived():
    data = parallel_data([record(1, 1, [2, 6], [0, 2, 5, 1])])
    assert data["step"] is None
    np.testing.assert_array_equal(data["reported"], [False, True])
    np.testing.assert_array_equal(data["traffic"], [[0, 0], [2, 6]])
    assert data["placement"].sum() == 4  # placement is known for every rank
    assert np.isnan(data["messages"]["flat"][0])


def test_exchanges_side_by_side_with_their_formulas():
    records = []
    for rank in range(4):
        base = dict(world=4)
        records.append(record(rank, 0, [1] * 4, [1] * 8, messages=6, **base))
        records.append(record(rank, 1, [1] * 4, [1] * 8, messages=4, exchange="hierarchical",
                              node_size=2, **base))
        lane_traffic = [2 if (dst % 2) == (rank % 2) else 0 for dst in range(4)]
        records.append(record(rank, 2, lane_traffic, [1] * 8, messages=3,
                              exchange="tp_coordinated", ep_size=2, tp_size=2, **base))
    data = parallel_data(records)
    assert data["exchange"] == "tp_coordinated"
    assert data["formula"] == {"flat": 6, "hierarchical": 4, "tp_coordinated": 3}
    for name, measured in (("flat", 6), ("hierarchical", 4), ("tp_coordinated", 3)):
        np.testing.assert_array_equal(data["messages"][name], [measured] * 4)
    # TP: rank = t·L + lane; ranks 0, 1 hold experts 0-3 and ranks 2, 3 hold 4-7
    assert [list(np.flatnonzero(row)) for row in data["placement"]] == \
        [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7]]
    np.testing.assert_array_equal(data["expert_tokens"], [2] * 8)  # lanes counted once
    assert parallel_data(records, exchange="flat")["traffic"].sum() == 16
    with pytest.raises(ValueError, match="no records for exchange"):
        parallel_data(records, layer=3)


def test_figure_state_follows_the_data():
    fig = parallel_figure(two_rank_records())
    np.testing.assert_array_equal(np.array(fig.data[1].z), [[3, 5], [2, 6]])
    assert "5<br>320 B" in np.array(fig.data[1].text)[0, 1]
    placement = np.array(fig.data[0].z, dtype=float)
    assert np.isnan(placement[0, 2]) and placement[1, 2] == 9
    assert fig.data[2].visible and not fig.data[3].visible  # flat measured only
    assert list(fig.data[5].y) == [2, 2] and "= 2" in fig.data[5].name
    assert list(fig.data[8].y) == [5, 11] and list(fig.data[9].y) == [5, 11]
    assert "step 1" in fig.layout.title.text and "loss 3.000" in fig.layout.title.text
    in_bytes = parallel_figure(two_rank_records(), units="bytes")
    np.testing.assert_array_equal(np.array(in_bytes.data[1].z), 64 * np.array([[3, 5], [2, 6]]))
    with pytest.raises(ValueError, match="units must be one of"):
        parallel_figure(two_rank_records(), units="parsecs")


def test_live_view_throttles_and_accepts_reports_from_a_thread():
    view = ParallelView(min_redraw_seconds=3600)
    assert view.redraws == 1 and "waiting" in view.status.value
    rows = two_rank_records()
    workers = [threading.Thread(target=view.update, args=(r.pop("rank"), r)) for r in rows]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(view.records) == 3 and view.redraws == 1  # nothing redrawn yet
    view.refresh()
    assert view.redraws == 2
    np.testing.assert_array_equal(np.array(view.figure.data[1].z), [[3, 5], [2, 6]])
    view.units.value = "bytes"  # the toggle redraws
    assert view.redraws == 3
    assert np.array(view.figure.data[1].z)[1, 1] == 6 * 64
    eager = ParallelView(min_redraw_seconds=0)
    eager.update(0, {"step": 1, "world": 1, "num_experts": 2, "traffic": [4]})
    assert eager.redraws == 2
    assert ParallelView([two_rank_records()]).data()["step"] == 1  # launch's per-rank lists


@pytest.mark.timeout(120)
def test_a_real_two_rank_run_feeds_the_view():
    view = ParallelView(min_redraw_seconds=0.2)
    steps, block_size, batch_size = 2, 16, 2
    results = launch("moelab.examples.parallel_demo:train_with_reports", nprocs=2, timeout=90,
                     quiet=True, on_metric=view.update,
                     kwargs=dict(steps=steps, block_size=block_size, batch_size=batch_size,
                                 d_model=16, experts=4))
    view.refresh()
    assert len(view.records) == 2 * steps
    data = view.data()
    assert data["step"] == steps and data["world"] == 2 and data["exchange"] == "flat"
    last = {r["rank"]: r for r in view.records if r["step"] == steps}
    # the matrix is exactly what the ranks reported, row by row
    np.testing.assert_array_equal(data["traffic"], [last[0]["traffic"], last[1]["traffic"]])
    tokens = block_size * batch_size  # dropless top-1: every token goes to one expert
    for rank in range(2):
        assert sum(last[rank]["traffic"]) == tokens == sum(last[rank]["expert_load"])
        # the rows a rank sends to rank d are the routes it kept for d's experts
        load = np.array(last[rank]["expert_load"])
        assert last[rank]["traffic"] == [int(load[:2].sum()), int(load[2:].sum())]
        assert last[rank]["experts"] == list(parallel_layout(2, 2).local_experts(rank, 4))
        # messages: at most one per peer and exchange; bytes = rows that left × row size
        assert last[rank]["messages"] <= messages_per_forward(2, "flat")
        crossing = sum(t for d, t in enumerate(last[rank]["traffic"]) if d != rank)
        received = data["traffic"][1 - rank, rank]
        assert last[rank]["bytes_sent"] == (crossing + received) * last[rank]["row_bytes"]
    np.testing.assert_array_equal(data["rows_received"], data["traffic"].sum(axis=0))
    # the losses the ranks reported are the ones they returned
    for rank, result in enumerate(results):
        assert [r["loss"] for r in view.records if r["rank"] == rank] == result["losses"]
    np.testing.assert_array_equal(np.array(view.figure.data[1].z), data["traffic"])
