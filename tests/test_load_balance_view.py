"""LoadBalanceView, checked on its data and figure state (no browser), live beside a Trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelab.data import multidomain_corpus
from moelab.model import GPT, preset
from moelab.train import TrainConfig, Trainer
from moelab.viz.load_balance import LoadBalanceView, load_arrays, load_balance_figure


def fake_history():
    return [
        {"step": 1, "counts": [[6, 2], [4, 4]], "drop_fraction": [0.25, 0.0],
         "aux_loss": 2.5, "z_loss": 1.0, "lm_loss": 5.0},
        {"step": 2, "counts": [[4, 4], [8, 0]], "drop_fraction": [0.0, 0.5],
         "aux_loss": 2.1, "z_loss": 1.1, "lm_loss": 4.5},
    ]


def test_load_arrays_compute_share_cv_and_drops():
    arrays = load_arrays(fake_history())
    np.testing.assert_array_equal(arrays["steps"], [1, 2])
    np.testing.assert_allclose(arrays["share"][0], [[75, 50], [25, 50]])
    np.testing.assert_allclose(arrays["cv"][0], [0.5, 0.0])  # std/mean of (6,2) and (4,4)
    np.testing.assert_allclose(arrays["cv"][1], [0.0, 1.0])
    np.testing.assert_allclose(arrays["drop"], [[0.25, 0.0], [0.0, 0.5]])
    np.testing.assert_allclose(arrays["aux"], [2.5, 2.1])


def test_load_balance_figure_holds_the_history():
    fig = load_balance_figure(fake_history(), layer=1)
    heat = fig.data[0]
    np.testing.assert_allclose(np.array(heat.z), [[50, 100], [50, 0]])
    assert list(fig.data[3].y) == pytest.approx([0.0, 1.0])  # layer 1's CV line
    assert list(fig.data[4].y) == pytest.approx([0.0, 50.0])  # layer 1's drop % line
    assert "MoE layer 1" in fig.layout.annotations[0].text


def test_live_view_follows_a_trainer_and_throttles_redraws():
    torch.manual_seed(0)
    model = GPT(preset("tiny", block_size=16, d_model=32, n_head=2))
    data = multidomain_corpus(5_000).split(0.1)
    trainer = Trainer(model, *data, TrainConfig(steps=12, batch_size=2, eval_every=0,
                                                progress=False))
    view = LoadBalanceView(min_redraw_seconds=3600).attach(trainer)
    assert view.layer_names == ["MoE layer 0 (block 2)", "MoE layer 1 (block 4)"]
    trainer.train()
    assert len(view.history) == 12
    # one draw at construction, none during the 12 throttled steps, one when training ends
    assert view.redraws == 2
    heat = view.figure.data[0]
    expected = load_arrays(trainer.history)["share"][0]
    np.testing.assert_allclose(np.array(heat.z), expected)
    assert "step 12" in view.status.value
    view.layer_picker.value = 1
    np.testing.assert_allclose(np.array(view.figure.data[0].z),
                               load_arrays(trainer.history)["share"][1])


def test_load_balance_view_layers_from_names_and_one_figure_on_screen():
    """layer_names alone sets the layers; attach() rebuilds inside the same widget (what is
    already displayed shows the new figure) and closes the old FigureWidget."""
    view = LoadBalanceView(layer_names=["first", "second"])
    assert view.layer_names == ["first", "second"]
    for record in fake_history():
        view.update(record)
    view.refresh()
    assert list(view.figure.data[1].y) == pytest.approx(load_arrays(fake_history())["cv"][0])
    assert view.figure.data[3].name == "second"
    with pytest.raises(ValueError, match="one name per MoE layer"):
        LoadBalanceView(num_layers=3, layer_names=["a"])

    empty = LoadBalanceView()
    shown, old_figure = empty.widget, empty.figure
    model = GPT(preset("tiny", block_size=16, d_model=32, n_head=2))
    trainer = Trainer(model, *multidomain_corpus(5_000).split(0.1),
                      TrainConfig(steps=1, batch_size=2, eval_every=0, progress=False))
    empty.attach(trainer)
    assert empty.widget is shown and shown.children[1] is empty.figure
    assert empty.figure is not old_figure and old_figure.comm is None  # closed
    assert len(empty.figure.data) == 1 + 2 * 2 + 2
