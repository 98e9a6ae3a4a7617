"""SpecialisationView, checked on its data and figure state (no browser), live beside a probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelab.data import multidomain_corpus
from moelab.model import GPT, preset
from moelab.specialisation import SpecialisationProbe
from moelab.train import TrainConfig, Trainer
from moelab.viz.specialisation_view import (
                                            SpecialisationView,
                                            specialisation_arrays,
                                            specialisation_figure,
)


def _layer(dead, selectivity, co, share):
    return {"dead": dead, "selectivity": selectivity, "coactivation": co,
            "domain_share": share, "experts": len(co), "percentiles": {}}


def fake_history():
    co = [[0.5, 0.25], [0.25, 0.75]]
    share = [[1.0, 0.0], [0.3, 0.7], [0.5, 0.5]]
    return [
        {"step": 0, "layers": [_layer(0.0, 0.1, co, share), _layer(0.5, 0.0, co, share)]},
        {"step": 5, "layers": [_layer(0.5, 0.4, [[1, 0], [0, 0]], share),
                               _layer(0.0, 0.2, co, share)]},
    ]


def test_arrays_hold_the_lines_over_steps_and_the_last_heatmaps():
    arrays = specialisation_arrays(fake_history())
    np.testing.assert_array_equal(arrays["steps"], [0, 5])
    np.testing.assert_allclose(arrays["dead"], [[0.0, 0.5], [0.5, 0.0]])
    np.testing.assert_allclose(arrays["selectivity"], [[0.1, 0.4], [0.0, 0.2]])
    np.testing.assert_allclose(arrays["coactivation"][0], [[1, 0], [0, 0]])
    assert arrays["domain_share"][1].shape == (3, 2)
    assert specialisation_arrays([])["coactivation"] == []


def test_figure_draws_the_chosen_layer_in_percent():
    fig = specialisation_figure(fake_history(), ["a", "b", "c"], layer=1)
    np.testing.assert_allclose(np.array(fig.data[0].z, dtype=float), [[np.nan, 25], [25, np.nan]])
    np.testing.assert_allclose(np.array(fig.data[1].z)[1], [30, 70])
    assert list(fig.data[4].y) == pytest.approx([50.0, 0.0])  # layer 1's dead %
    assert list(fig.data[5].y) == pytest.approx([0.0, 0.2])  # layer 1's selectivity
    assert "MoE layer 1 at step 5" in fig.layout.annotations[0].text
    assert list(fig.layout.yaxis2.ticktext) == ["a", "b", "c"]


def test_live_view_follows_a_probe_while_a_trainer_runs():
    torch.manual_seed(0)
    model = GPT(preset("tiny", block_size=16, d_model=32, n_head=2))
    corpus = multidomain_corpus(5_000)
    trainer = Trainer(model, corpus, config=TrainConfig(steps=6, batch_size=2, eval_every=0,
                                                        progress=False))
    probe = SpecialisationProbe(corpus, every=3, batch_size=2).attach(trainer)
    view = SpecialisationView(min_redraw_seconds=3600).attach(probe)
    assert view.layer_names == ["MoE layer 0", "MoE layer 1"]
    assert view.domain_names == list(corpus.domain_names)
    redraws = view.redraws
    trainer.train()
    assert [entry["step"] for entry in view.history] == [0, 3, 6]
    assert view.redraws == redraws + 1  # throttled during training, drawn once at the end
    assert list(view.figure.data[2].x) == [0, 3, 6]
    assert "step 6" in view.status.value
    view.layer_picker.value = 1
    last = probe.history[-1]["layers"][1]
    expected = 100 * np.array(last["coactivation"])
    np.fill_diagonal(expected, np.nan)
    np.testing.assert_allclose(np.array(view.figure.data[0].z, dtype=float), expected)
