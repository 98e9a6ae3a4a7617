"""Mixture-of-Students (§4.2): distil a PR-MoE teacher into a shallower PR-MoE student.

Eq. 1: min_θ E[ L(x; θ) + α · L_KD(x; θ) ], with L the LM cross-entropy and L_KD the
temperature-scaled KL divergence to the teacher's soft labels (the teacher runs under no_grad).
Staged KD: KD helps early and hurts late (Fig. 5), so the paper stops it at 400K steps and trains
on the LM loss alone afterwards. DeepSpeed has no flag for this (it is done by restarting without
``--mos``); here it is one argument, ``kd_stop_step``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import check_int
from .model import GPTConfig


def student_config(teacher: GPTConfig, n_layer: int) -> GPTConfig:
    """The teacher's config with fewer layers (the paper: 24 -> 21). The student keeps the
    teacher's *last* expert counts, so the pyramid's big top layers survive
    (teacher 32×10 + 64×2 -> student 32×8 + 64×2, as in the MoS scripts)."""
    n_layer = check_int("n_layer", n_layer)
    if n_layer > teacher.n_layer:
        raise ValueError(f"a student has at most the teacher's depth: n_layer={n_layer} > "
                         f"teacher n_layer={teacher.n_layer}; choose n_layer <= "
                         f"{teacher.n_layer}")
    n_moe = n_layer // teacher.moe_every if teacher.expert_schedule else 0
    schedule = teacher.expert_schedule[len(teacher.expert_schedule) - n_moe:] if n_moe else 0
    return teacher.replace(n_layer=n_layer, experts=schedule, name=f"{teacher.name}_student")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over tokens.

    Megatron-DeepSpeed's ``calculate_mos_loss`` computes KLDivLoss(batchmean) / seq_length · T²,
    the same per-token mean.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: "
                         f"{tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    vocab = student_logits.shape[-1]
    log_p_student = F.log_softmax(student_logits.reshape(-1, vocab) / temperature, dim=-1)
    p_teacher = F.softmax(teacher_logits.reshape(-1, vocab).detach() / temperature, dim=-1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature ** 2


class StagedKD:
    """The MoS objective as a Trainer ``loss_fn``: LM + MoE losses + α·KD until kd_stop_step,
    LM + MoE losses after it. ``kd_stop_step=None`` is full KD (never stops)."""

    def __init__(self, teacher: nn.Module, alpha: float = 1.0, temperature: float = 1.0,
                 kd_stop_step: int | None = None) -> None:
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0; got {alpha!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature!r}")
        if kd_stop_step is not None and kd_stop_step < 0:
            raise ValueError(f"kd_stop_step must be >= 0 or None; got {kd_stop_step!r}")
        self.teacher = teacher.eval()
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        self.alpha, self.temperature, self.kd_stop_step = alpha, temperature, kd_stop_step

    def kd_active(self, step: int) -> bool:
        return self.kd_stop_step is None or step < self.kd_stop_step

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, step: int):
        output = model(x, y)
        loss = output.loss
        kd = None
        if self.kd_active(step) and self.alpha > 0:
            with torch.no_grad():
                teacher_logits = self.teacher(x).logits
            kd = kd_loss(output.logits, teacher_logits, self.temperature)
            loss = loss + self.alpha * kd
        return loss, output, {"kd_loss": None if kd is None else kd.item(),
                              "kd_active": kd is not None}
