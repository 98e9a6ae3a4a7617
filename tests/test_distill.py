"""Mixture-of-Students: the KD loss, the staged switch, the student's shape."""

from __future__ import annotations

import pytest
import torch

from moelab.data import multidomain_corpus
from moelab.distill import StagedKD, kd_loss, student_config
from moelab.model import GPT, preset
from moelab.train import TrainConfig, Trainer


def test_kd_loss_matches_formula_and_is_zero_for_equal_logits():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert kd_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    temperature = 2.0
    p = torch.softmax(teacher.double() / temperature, -1)
    q = torch.softmax(student.double() / temperature, -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean() * temperature ** 2
    assert kd_loss(student, teacher, temperature).item() == pytest.approx(expected.item(),
                                                                         rel=1e-5)


def test_student_keeps_the_teachers_last_expert_counts():
    teacher = preset("paper_350m_pr_moe_32_64")
    student = student_config(teacher, 21)
    assert student.n_layer == 21 and student.moe.residual
    assert student.expert_schedule == (32,) * 8 + (64,) * 2  # the paper's MoS script
    with pytest.raises(ValueError, match="at most the teacher's depth"):
        student_config(teacher, 25)


def test_staged_kd_switches_off_and_teacher_gets_no_gradient():
    torch.manual_seed(0)
    teacher_config = preset("tiny", block_size=16, d_model=32, n_head=2, n_layer=4)
    teacher = GPT(teacher_config)
    student = GPT(student_config(teacher_config, 2))
    objective = StagedKD(teacher, alpha=0.5, temperature=2.0, kd_stop_step=3)
    data = multidomain_corpus(5_000).split(0.1)
    trainer = Trainer(student, *data, TrainConfig(steps=5, batch_size=4, eval_every=0,
                                                  progress=False), loss_fn=objective)
    history = trainer.train()
    assert [r["kd_active"] for r in history] == [True, True, True, False, False]
    assert all(r["kd_loss"] > 0 for r in history[:3])
    assert all(r["kd_loss"] is None for r in history[3:])
    # with KD on, loss = model loss + α·KD; after the stop, the model loss alone
    x, y = data[0].batch(2, 16, torch.Generator().manual_seed(0))
    student.eval()
    loss_on, out, extras = objective(student, x, y, step=0)
    torch.testing.assert_close(loss_on, out.loss + 0.5 * extras["kd_loss"])
    loss_off, out_off, _ = objective(student, x, y, step=3)
    torch.testing.assert_close(loss_off, out_off.loss)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_student_equal_to_teacher_has_zero_kd():
    torch.manual_seed(0)
    config = preset("tiny", block_size=16, d_model=32, n_head=2, experts=0)
    teacher = GPT(config)
    student = GPT(config)
    student.load_state_dict(teacher.state_dict())
    x = torch.randint(0, 256, (2, 16))
    loss, out, extras = StagedKD(teacher)(student.eval(), x, x, step=0)
    assert extras["kd_loss"] == pytest.approx(0.0, abs=1e-6)
