"""ParallelConfig and parallelize on one process (a 1-rank gloo group), checkpoints' bad input:
everything that needs no second process."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

from moelab import GPT, MoE, preset
from moelab.parallel import ParallelConfig, full_state_dict, load_full_state_dict, parallelize
from moelab.train import param_groups


@pytest.fixture
def one_rank(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("options,match", [
    (dict(exchange="ring"), r"exchange must be one of \('flat', 'hierarchical', "),
    (dict(node_size=3), r"node_size=3 is only used by exchange='hierarchical'"),
    (dict(exchange="hierarchical"), r"exchange='hierarchical' needs node_size"),
    (dict(tp_size=2), r"exchange='tp_coordinated' and tp_size > 1 go together"),
    (dict(exchange="tp_coordinated"), r"exchange='tp_coordinated' and tp_size > 1 go together"),
    (dict(ep_size=0), r"ep_size must be an integer >= 1"),
    (dict(timeout=float("nan")), r"timeout must be a finite number > 0"),
])
def test_parallel_config_refuses_options_it_would_ignore(options, match):
    with pytest.raises(ValueError, match=match):
        ParallelConfig(**options)


def test_parallelize_needs_a_process_group_and_an_moe_layer():
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        parallelize(MoE(8, 16, 4))


def test_parallelize_refuses_a_hierarchical_exchange_without_nodes(one_rank):
    with pytest.raises(ValueError, match=r"needs 1 < node_size < ep_size=1"):
        parallelize(MoE(8, 16, 4), exchange="hierarchical", node_size=3)
    with pytest.raises(ValueError, match="found no MoE layer"):
        parallelize(torch.nn.Linear(4, 4))


def test_ep_size_1_is_data_parallel_and_only_once(one_rank):
    layer = parallelize(MoE(8, 16, 4, bias_update_rate=0.1))
    assert layer.runner == "local" and layer.parallel is None  # the experts stay whole
    assert layer.router.reduce_load is not None  # the bias follows the whole batch
    layer(torch.randn(6, 8))
    with pytest.raises(ValueError, match="already parallelized"):
        parallelize(layer)


def _model_and_optimizer():
    torch.manual_seed(0)
    model = GPT(preset("tiny", block_size=8, d_model=16, n_head=2))
    return model, torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)


def test_load_full_state_dict_says_what_it_was_given():
    model, optimizer = _model_and_optimizer()
    with pytest.raises(ValueError, match=r"takes what full_state_dict returns.*\{'model': "):
        load_full_state_dict(model, model.state_dict())
    with pytest.raises(ValueError, match="holds no optimizer state"):
        load_full_state_dict(model, full_state_dict(model), optimizer)
    state = full_state_dict(model, optimizer)
    other = torch.optim.AdamW(model.parameters(), lr=1e-3)  # one group, not param_groups' four
    with pytest.raises(ValueError, match=r"has 1 parameter groups and the checkpoint 4"):
        load_full_state_dict(model, state, other)
    load_full_state_dict(model, state, optimizer)  # the right one loads
