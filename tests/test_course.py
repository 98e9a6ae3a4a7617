"""moelab.course: claims report held / skipped / fail loudly; every exercise check passes a right
answer, and turns an empty or wrong one into one helpful sentence (no traceback from inside)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from moelab import course
from moelab.course import ClaimError, ExerciseError, claim
from moelab.distill import kd_loss

# ------------------------------------------------------------------------------------ claims


def test_claim_held_prints_its_reading(capsys):
    assert claim("nb.more-is-less", 1 < 2, "1 < 2") is None  # nothing for a cell to display
    assert capsys.readouterr().out == "claim nb.more-is-less: held (1 < 2)\n"


def test_claim_skipped_prints_why(capsys):
    claim("nb.x", False, "0 < 1", skip="smoke trains 10 steps")
    assert capsys.readouterr().out == "claim nb.x: skipped: smoke trains 10 steps\n"


def test_claim_skip_false_judges_it(capsys):
    claim("nb.x", True, skip=False)  # `SMOKE and "..."` when not smoke
    assert capsys.readouterr().out == "claim nb.x: held\n"


def test_claim_that_fails_raises_with_the_numbers():
    with pytest.raises(ClaimError, match=r"claim nb.x does not hold in this run: 3 > 2"):
        claim("nb.x", 3 < 2, "3 > 2")


@pytest.mark.parametrize("skip", [True, "  "])
def test_claim_skip_needs_a_reason(skip):
    with pytest.raises(ValueError, match="say why"):
        claim("nb.x", True, skip=skip)


def test_claim_name_is_one_word():
    with pytest.raises(ValueError, match="one word"):
        claim("two words", True)


def test_solutions_flag_reads_the_environment():
    for value, expected in (("1", True), ("0", False), ("", False), ("yes", True),
                            ("false", False)):
        assert course.solutions_wanted({"MOELAB_SOLUTIONS": value}) is expected
    assert course.solutions_wanted({}) is False


def test_exercise_error_renders_without_a_traceback():
    lines = ExerciseError("first line\nsecond")._render_traceback_()
    assert len(lines) == 2 and "first line" in lines[0] and "Traceback" not in "".join(lines)


# ------------------------------------------------------------------------- right answers


def _top1(logits, capacity):
    expert = logits.argmax(dim=-1)
    slot = torch.full_like(expert, -1)
    for e in range(logits.shape[1]):
        mine = (expert == e).nonzero().flatten()[:capacity]
        slot[mine] = torch.arange(len(mine))
    return expert, slot


def _below_one():
    logits = torch.zeros(8, 4)
    logits[:7, 0], logits[7, 1] = 0.01, 10.0
    return logits


def _load_stats(counts, capacity):
    c = counts.float()
    drop = (c - capacity).clamp(min=0).sum() / c.sum()
    return float(c.std(unbiased=False) / c.mean()), float(drop)


def _bias_update(bias, counts, rate):
    return bias + rate * torch.sign(counts.float().mean() - counts)


def _moe_params(d_model, d_ff, num_experts, residual):
    ffn = 2 * d_model * d_ff + d_ff + d_model
    return num_experts * (ffn + d_model) + ((ffn + 2 * d_model + 2) if residual else 0)


def _staged_loss(student, teacher, x, y, step, alpha, kd_stop_step):
    output = student(x, y)
    if kd_stop_step is not None and step >= kd_stop_step:
        return output.loss
    return output.loss + alpha * kd_loss(output.logits, teacher(x).logits)


def _token_of_row(routing):
    token = torch.full((routing.num_experts * routing.capacity,), -1)
    s, j = routing.kept.nonzero(as_tuple=True)
    token[routing.expert[s, j] * routing.capacity + routing.slot[s, j]] = s
    return token


def _group_limited(scores, n_group, topk_group, k):
    groups = scores.view(n_group, -1)
    kept = groups.topk(2, dim=-1).values.sum(-1).topk(topk_group).indices
    masked = torch.full_like(groups, float("-inf"))
    masked[kept] = groups[kept]
    return masked.reshape(-1).topk(k).indices


RIGHT = {
    "check_capacity": (80, 4),
    "check_top1": (_top1,),
    "check_aux_below_one": (_below_one(),),
    "check_load_stats": (_load_stats,),
    "check_bias_update": (_bias_update,),
    "check_moe_params": (_moe_params,),
    "check_schedule": ((8, 8, 8, 8, 32, 32),),
    "check_student_schedule": ((8, 16, 32, 64),),
    "check_staged_loss": (_staged_loss,),
    "check_einsum_cost": (4096 * 64 * 64 * 1024, 4096 * 1024),
    "check_token_of_row": (_token_of_row,),
    "check_tiles": (5,),
    "check_exchange_messages": ({"flat": 6, "hierarchical": 4, "tp_coordinated": 3},),
    "check_owner": (lambda num_experts, ranks: [e // (num_experts // ranks)
                                                for e in range(num_experts)],),
    "check_touched": (lambda local, num_experts, routes:
                      local * (1 - (1 - 1 / num_experts) ** routes),),
    "check_scaling_prediction": (False,),
    "check_sigmoid_weights": (lambda logits, chosen, scale: torch.sigmoid(logits[chosen])
                              / torch.sigmoid(logits[chosen]).sum() * scale,),
    "check_group_limited": (_group_limited,),
    "check_fine_grained": (32, 64, 3),
}
CHECKS = sorted(name for name in dir(course) if name.startswith("check_"))


def test_the_tile_check_uses_the_kernels_schedule_when_given(capsys):
    from moelab.kernels import tile_schedule

    course.check_tiles(5, tile_schedule)
    assert "moelab.kernels.tile_schedule" in capsys.readouterr().out
    with pytest.raises(ExerciseError, match="tile_schedule gives 5"):
        course.check_tiles(6, tile_schedule)


def test_every_check_is_covered_here():
    assert sorted(RIGHT) == CHECKS


@pytest.mark.parametrize("name", CHECKS)
def test_right_answer_passes(name, capsys):
    getattr(course, name)(*RIGHT[name])
    assert capsys.readouterr().out.startswith("✓ ")


# ---------------------------------------------------------------- empty and wrong answers


def _blank(*args):  # what a "your turn" cell holds before it is answered: a body of `...`
    ...


def _empty_args(name):
    """The answer each check sees when the learner ran the cell without answering it."""
    return tuple(_blank if callable(a) else ... for a in RIGHT[name])


@pytest.mark.parametrize("name", CHECKS)
def test_empty_answer_says_what_to_do(name):
    with pytest.raises(ExerciseError) as info:
        getattr(course, name)(*_empty_args(name))
    message = str(info.value)
    assert re.search(r"not answered yet|returned None|not defined yet", message), message
    assert "..." in message or "return" in message, message


def test_undefined_function_is_named():
    with pytest.raises(ExerciseError, match=r"`my_top1` is not defined yet"):
        course.check_top1(None)


def test_a_learner_bug_comes_back_as_one_sentence():
    def broken(logits, capacity):
        return logits.argmax(dim=5), None

    with pytest.raises(ExerciseError, match=r"my_top1\(tensor of shape \[8, 4\], \d+\)` raised "
                                            r"IndexError"):
        course.check_top1(broken)


def test_not_implemented_is_not_written_yet():
    def todo(*args):
        raise NotImplementedError

    with pytest.raises(ExerciseError, match="not written yet"):
        course.check_owner(todo)


WRONG = [
    ("check_capacity", (64, 4), r"C_train = 64.*ceil|multiply by k|C = max"),
    ("check_capacity", (80, 1), r"min_capacity = 4"),
    ("check_capacity", (79.0, 4), r"moelab.expert_capacity"),
    ("check_top1", (lambda logits, c: (logits.argmax(-1), torch.zeros(len(logits))),),
     r"gets slot 0 in yours"),
    ("check_top1", (lambda logits, c: (logits.argmin(-1), torch.zeros(len(logits))),),
     r"argmax over dim=-1"),
    ("check_aux_below_one", (torch.zeros(8, 4),), r"l_aux = 1.0000.*Hint"),
    ("check_aux_below_one", (torch.zeros(8),), r"shape \[S, E\]"),
    ("check_load_stats", (lambda counts, c: (float(counts.float().std() / counts.float().mean()),
                                             _load_stats(counts, c)[1]),), r"sample std"),
    ("check_load_stats", (lambda counts, c: (0.0, 0.0),), r"drop_fraction"),
    ("check_bias_update", (lambda b, counts, r: b - r * torch.sign(counts.float().mean()
                                                                    - counts),),
     r"sign is reversed"),
    ("check_moe_params", (lambda d, f, e, res: _moe_params(d, f, e, res) - e * d,),
     r"add the gate"),
    ("check_moe_params", (lambda d, f, e, res: _moe_params(d, f, e, res)
                          - (2 * d + 2 if res else 0),), r"mixing coefficient"),
    ("check_schedule", ((8, 8, 8, 32, 32),), r"6 MoE layers"),
    ("check_schedule", ((8, 8, 8, 8, 8, 32),), r"last two"),
    ("check_student_schedule", ((2, 4, 8, 16),), r"\*last\*"),
    ("check_staged_loss", (lambda s, t, x, y, step, a, stop: s(x, y).loss,), r"KD is still on"),
    ("check_einsum_cost", (4096 * 64 * 1024, 4096 * 1024), r"C axis"),
    ("check_einsum_cost", (4096 * 64 * 64 * 1024, 4096),
     r"table_copies = 4,096; the gather copies"),
    ("check_token_of_row", (lambda r: torch.zeros(r.num_experts * r.capacity),),
     r"buffer row \d+ \(expert \d+, slot \d+\)"),
    ("check_token_of_row", (lambda r: torch.zeros(3),), r"E·C = \d+ rows"),
    ("check_tiles", (4,), r"never straddle"),
    ("check_exchange_messages", ({"flat": 3, "hierarchical": 4, "tp_coordinated": 3},),
     r"a forward has two"),
    ("check_exchange_messages", ({"flat": 6, "hierarchical": 4, "tp_coordinated": 2},),
     r"all-gather"),
    ("check_exchange_messages", ({"flat": 6},), r"keys"),
    ("check_owner", (lambda e, p: [i % p for i in range(e)],), r"round-robin"),
    ("check_touched", (lambda local, e, routes: min(local, local * routes / e),),
     r"routes can land on the same expert"),
    ("check_scaling_prediction", (True,), r"the model says False"),
    ("check_scaling_prediction", ("no",), r"True or False"),
    ("check_sigmoid_weights", (lambda u, c, s: torch.sigmoid(u[c]),), r"renormalise"),
    ("check_sigmoid_weights", (lambda u, c, s: torch.sigmoid(u[c]) / torch.sigmoid(u[c]).sum(),),
     r"routed scaling factor"),
    ("check_sigmoid_weights", (lambda u, c, s: torch.softmax(u, -1)[c] * s,), r"not a softmax"),
    ("check_group_limited", (lambda s, g, tg, k: s.topk(k).indices,), r"plain top-k"),
    ("check_group_limited", (lambda s, g, tg, k: s.topk(k - 1).indices,), r"return k = "),
    ("check_fine_grained", (8, 64, 3), r"m = 4 times as many"),
    ("check_fine_grained", (32, 64, 4), r"the shared expert takes one"),
]


@pytest.mark.parametrize(("name", "answer", "pattern"), WRONG,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(WRONG)])
def test_wrong_answer_says_what_is_wrong(name, answer, pattern):
    with pytest.raises(ExerciseError, match=pattern):
        getattr(course, name)(*answer)


def test_checks_compare_against_the_library_not_a_copy():
    """The capacity check follows moelab.expert_capacity (float32 rounding included)."""
    from moelab import expert_capacity

    assert expert_capacity(4 * 128, 16, 1.25, 2, 4) == 80
    assert math.ceil(8 / 16 * 2) < 4 == expert_capacity(8, 16, 1.0, 2, 4)
