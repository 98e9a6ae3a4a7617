"""Trainer: loss goes down, aux loss balances, groups are right, resume is exact."""

from __future__ import annotations

import pytest
import torch

from moelab.data import multidomain_corpus
from moelab.experts import Experts
from moelab.model import GPT, preset
from moelab.train import TrainConfig, Trainer, param_groups

TINY = dict(block_size=32, d_model=32, n_head=2)


@pytest.fixture(scope="module")
def corpus():
    return multidomain_corpus(30_000).split(0.1)


def make_trainer(corpus, seed=0, steps=30, **overrides):
    torch.manual_seed(seed)
    model = GPT(preset("tiny", **{**TINY, **overrides}))
    config = TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=0,
                         progress=False, seed=seed)
    return Trainer(model, corpus[0], corpus[1], config)


@pytest.mark.parametrize("layout", [dict(experts=0), dict(experts=4),
                                    dict(n_layer=4, experts="2/4", residual=True)], ids=str)
def test_loss_goes_down(corpus, layout):
    trainer = make_trainer(corpus, **layout)
    before = trainer.evaluate()
    history = trainer.train()
    assert len(history) == 30
    first = sum(r["loss"] for r in history[:5]) / 5
    last = sum(r["loss"] for r in history[-5:]) / 5
    assert last < first - 0.5
    assert trainer.evaluate() < before - 0.5


def load_cv(record):
    cvs = []
    for counts in record["counts"]:
        load = torch.tensor(counts, dtype=torch.float)
        cvs.append((load.std(unbiased=False) / load.mean()).item())
    return sum(cvs) / len(cvs)


def test_aux_loss_lowers_load_imbalance(corpus):
    results = {}
    for coef in (0.0, 0.1):
        history = make_trainer(corpus, steps=40, aux_loss_coef=coef).train()
        results[coef] = sum(load_cv(r) for r in history[-10:]) / 10
    assert results[0.1] < 0.8 * results[0.0], results


def test_history_records_moe_metrics(corpus):
    trainer = make_trainer(corpus, steps=4)
    trainer.config = trainer.config.replace(eval_every=2)
    seen = []
    trainer.subscribe(seen.append)
    trainer.train()
    assert [r["step"] for r in seen] == [1, 2, 3, 4]
    record = seen[-1]
    assert len(record["counts"]) == 2 and all(sum(c) == 8 * 32 for c in record["counts"])
    assert all(0 <= f <= 1 for f in record["drop_fraction"])
    assert seen[1]["val_loss"] is not None and seen[0]["val_loss"] is None
    assert record["tokens_per_s"] > 0 and record["aux_loss"] > 0


def test_param_groups_split_experts_by_module_type():
    model = GPT(preset("tiny", **TINY))
    groups = param_groups(model, 0.1)
    names = {g["name"] for g in groups}
    assert names == {"shared", "shared_no_decay", "expert", "expert_no_decay"}
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    expert_params = {id(p) for m in model.modules() if isinstance(m, Experts)
                     for p in m.parameters()}
    for group in groups:
        assert all((id(p) in expert_params) == group["moe"] for p in group["params"])
        assert (group["weight_decay"] == 0.0) == group["name"].endswith("no_decay")


def test_checkpoint_resume_is_bit_identical(corpus, tmp_path):
    straight = make_trainer(corpus, steps=10)
    straight.train(6)
    path = straight.save(tmp_path / "ckpt.pt")
    expected = [r["loss"] for r in straight.train(4)[-4:]]

    resumed = make_trainer(corpus, seed=123, steps=10)  # different init and RNG: load fixes all
    resumed.load(path)
    assert resumed.step_count == 6
    got = [r["loss"] for r in resumed.train(4)[-4:]]
    assert got == expected


def test_resume_refuses_other_config(corpus, tmp_path):
    path = make_trainer(corpus, steps=1).save(tmp_path / "a.pt")
    other = make_trainer(corpus, steps=1, experts=8)
    with pytest.raises(ValueError, match="different model config"):
        other.load(path)


def test_lr_schedule_warmup_then_cosine(corpus):
    trainer = make_trainer(corpus, steps=25)
    lrs = [trainer.lr_at(s) for s in range(25)]
    assert lrs[0] == pytest.approx(3e-3 / 5) and lrs[4] == pytest.approx(3e-3)
    assert lrs[-1] > trainer.lr_at(25) == pytest.approx(3e-4)  # reaches lr/10 at the end
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))


def test_a_truncated_checkpoint_says_what_is_wrong(corpus, tmp_path):
    trainer = make_trainer(corpus, steps=1)
    path = trainer.save(tmp_path / "a.pt")
    path.write_bytes(path.read_bytes()[:200])  # a save that did not finish
    with pytest.raises(ValueError, match="could not read the checkpoint .*truncated"):
        trainer.load(path)
    torch.save({"weights": 1}, path)
    with pytest.raises(ValueError, match="not a moelab Trainer checkpoint"):
        trainer.load(path)
