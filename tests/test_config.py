"""Configs declared once: validation from the declarations, options by name at any depth, and
every option reaching every place that uses it (route, Router, MoE, GPT, checkpoints)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from moelab import GPT, GPTConfig, MoE, MoEConfig, Router, RouterConfig, route
from moelab.data import multidomain_corpus
from moelab.train import TrainConfig, Trainer

#: A valid value other than the default for every MoE-layer option (router options included).
#: Adding an option to RouterConfig or MoEConfig fails test_every_option_has_a_sample until it
#: has a sample here, so the reach tests below cover it.
SAMPLES = {
    "k": 2, "capacity_factor": 1.5, "eval_capacity_factor": 0.75, "min_capacity": 2,
    "drop_tokens": False, "use_rts": False, "noisy_gate_policy": "Jitter",
    "second_expert_sampling": False, "drop_policy": "probs", "choice": "expert",
    "bias_update_rate": 0.01, "renormalize": True, "score": "sigmoid",
    "routed_scaling_factor": 2.5, "n_group": 2, "topk_group": 2, "balance_loss": "sequence",
    "router_bias": True, "use_selection_bias": True, "scale_expert_input": True,
    "activation": "swiglu", "bias": False, "residual": True, "residual_gate": "sigmoid",
    "residual_d_ff": 24, "backend": "einsum", "swiglu_alpha": 1.0, "swiglu_limit": 5.0,
    "expert_d_ff": 12,
}
LAYER_OPTIONS = tuple(name for name in MoEConfig.option_names() if name != "router")


def needs(name: str) -> dict:
    """Options a sample needs beside it to be valid."""
    return {"residual_gate": {"residual": True}, "residual_d_ff": {"residual": True},
            "topk_group": {"n_group": 2}}.get(name, {})


def test_every_option_has_a_sample():
    assert set(SAMPLES) == set(LAYER_OPTIONS)
    for name, value in SAMPLES.items():
        config = MoEConfig.create(**{name: value, **needs(name)})
        owner = config.router if name in RouterConfig.option_names() else config
        assert getattr(owner, name) == value != getattr(MoEConfig(), name, getattr(
            RouterConfig(), name, None))


@pytest.mark.parametrize("name", LAYER_OPTIONS)
def test_each_option_reaches_every_moe_layer_of_a_gpt(name):
    """Set one option on a GPTConfig by name: every MoE layer (of a Pyramid schedule) has it,
    in its config and in the module that acts on it."""
    value = SAMPLES[name]
    config = GPTConfig.create(n_layer=4, d_model=16, n_head=2, experts="2/4",
                              **{name: value, **needs(name)})
    model = GPT(config)
    layers = [block.ffn for block in model.blocks if block.is_moe]
    assert len(layers) == 2
    for layer in layers:
        owner = layer.config.router if name in RouterConfig.option_names() else layer.config
        assert getattr(owner, name) == value
        if name in RouterConfig.option_names():
            assert getattr(layer.router.config, name) == value
    if name == "activation":
        assert all(layer.experts.activation == value for layer in layers)
    if name == "backend":
        assert all(layer.dispatch.backend == value == layer.combine.backend for layer in layers)


@pytest.mark.parametrize("name", RouterConfig.option_names())
def test_each_router_option_is_taken_by_route_router_and_moe_by_name(name):
    value, extra = SAMPLES[name], needs(name)
    logits = torch.randn(12, 4)
    assert route(logits, **{name: value}, **extra).num_tokens == 12
    assert getattr(Router(8, 4, **{name: value}, **extra).config, name) == value
    assert getattr(MoE(8, 16, 4, **{name: value}, **extra).router.config, name) == value
    config = RouterConfig(**{name: value}, **extra)
    assert getattr(Router(8, 4, config).config, name) == value


def test_options_by_name_at_any_depth_and_unknown_names():
    config = GPTConfig.create(k=2, residual=True, n_layer=2)
    assert (config.moe.router.k, config.moe.residual, config.n_layer) == (2, True, 2)
    again = config.replace(k=3, experts=4)
    assert again.moe.router.k == 3 and again.moe.residual and config.moe.router.k == 2
    with pytest.raises(TypeError, match="has no option 'top_k'.*valid options: .*capacity_factor"):
        GPTConfig.create(top_k=2)
    with pytest.raises(TypeError, match="MoEConfig has no option"):
        MoE(8, 16, 4, ep_size=2)  # expert parallelism is applied from outside now
    names = GPTConfig.option_names()
    assert len(names) == len(set(names))


@pytest.mark.parametrize("cls,options,match", [
    (RouterConfig, dict(k=0), r"k must be an integer >= 1"),
    (RouterConfig, dict(capacity_factor=True), r"capacity_factor must be a finite number > 0"),
    (RouterConfig, dict(capacity_factor=float("inf")), r"capacity_factor must be a finite"),
    (RouterConfig, dict(min_capacity=1.5), r"min_capacity must be an integer >= 0"),
    (RouterConfig, dict(drop_tokens="yes"), r"drop_tokens must be True or False"),
    (RouterConfig, dict(noisy_gate_policy="RSample", k=2), r"RSample.*top-1"),
    (RouterConfig, dict(renormalize=1), r"renormalize must be True or False"),
    (MoEConfig, dict(residual_d_ff=0), r"residual_d_ff must be an integer >= 1"),
    (MoEConfig, dict(residual_d_ff=8), r"residual_d_ff=8 .* residual=False"),
    (MoEConfig, dict(backend="cuda"), r"backend must be one of"),
    (MoEConfig, dict(router=dict(k=2)), r"router must be a RouterConfig"),
    (GPTConfig, dict(dropout=1.0), r"dropout must be a finite number in \[0, 1\)"),
    (GPTConfig, dict(aux_loss_coef=-1.0), r"aux_loss_coef must be a finite number >= 0"),
])
def test_bad_values_name_the_field_and_the_range(cls, options, match):
    with pytest.raises(ValueError, match=match):
        cls.create(**options)


def test_integral_numbers_are_accepted_and_stored_as_int():
    config = RouterConfig(k=np.int64(2), min_capacity=np.int32(3))
    assert config.k == 2 and type(config.k) is int and type(config.min_capacity) is int
    assert MoE(8, 16, np.int64(4), k=np.int64(2)).router.k == 2


def test_the_docstring_lists_every_option():
    for cls in (RouterConfig, MoEConfig, GPTConfig):
        for f in dataclasses.fields(cls):
            assert f"    {f.name} = " in cls.__doc__, (cls.__name__, f.name)


def test_configs_round_trip_through_plain_dicts():
    config = GPTConfig.create(experts=(2, 4), n_layer=4, k=2, choice="expert", residual=True,
                              name="round trip")
    data = config.to_dict()
    assert data["moe"]["router"]["choice"] == "expert"
    assert GPTConfig.from_dict(data) == config
    assert GPTConfig.from_dict(data).experts == (2, 4)


def test_a_gpt_trains_with_expert_choice_and_the_checkpoint_keeps_it(tmp_path):
    """Expert-choice routing reaches a GPT's MoE layers from its config (a GPT could not use
    it before configs were nested), trains, and survives a checkpoint."""
    corpus = multidomain_corpus(20_000)
    config = GPTConfig.create(vocab_size=256, block_size=16, n_layer=2, n_head=2, d_model=16,
                              experts=4, choice="expert")
    torch.manual_seed(0)
    trainer = Trainer(GPT(config), corpus, corpus,
                      TrainConfig(steps=3, batch_size=2, eval_every=0, progress=False))
    history = trainer.train()
    assert len(history) == 3 and all(np.isfinite(r["loss"]) for r in history)
    routing = trainer.model(torch.zeros(1, 16, dtype=torch.long)).routings[1]
    assert routing.expert_choice
    path = trainer.save(tmp_path / "expert_choice.pt")
    resumed = Trainer(GPT(GPTConfig.from_dict(torch.load(path, weights_only=False)
                                              ["model_config"])), corpus, corpus,
                      TrainConfig(steps=3, batch_size=2, eval_every=0, progress=False))
    resumed.load(path)
    assert resumed.model.config.moe.router.choice == "expert"
    with pytest.raises(ValueError, match="different model config"):
        Trainer(GPT(config.replace(choice="token")), corpus, corpus,
                TrainConfig(steps=1, progress=False)).load(path)
