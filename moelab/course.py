"""The course's own checks: the claims a notebook makes about its run, and its exercises.

**Claims.** A notebook's reading of its own output ("the aux loss drops fewer routes than no
balancing") is checked in the cell that printed the numbers, with ``claim(name, holds, reading,
skip=...)``. It prints ``claim <name>: held (<reading>)``, or ``claim <name>: skipped: <why>``
where the preset is too small for the claim, and raises `ClaimError` when the run contradicts
the text. ``tests/test_notebooks.py`` runs every notebook and requires each claim a notebook
declares to report one of the two.

**Exercises.** Every notebook from 01 on has "your turn" cells. Each ``check_*`` function below
runs a learner's answer against the library and says what is wrong in a sentence
(`ExerciseError`, shown without a traceback), or prints what it checked. With
``MOELAB_SOLUTIONS=1`` in the environment (`SOLUTIONS`), the hidden solution cells fill the
answers in, as the notebook tests do.

Imports only the standard library, torch and moelab's math (no plotting, no widgets).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .routing import expert_capacity

__all__ = ["SOLUTIONS", "ClaimError", "ExerciseError", "claim"]



def solutions_wanted(environ=os.environ) -> bool:
    """Whether ``MOELAB_SOLUTIONS`` asks the hidden solution cells to fill in the answers."""
    return environ.get("MOELAB_SOLUTIONS", "").strip().lower() not in ("", "0", "false", "no")


#: True when the hidden solution cells fill in the answers (``MOELAB_SOLUTIONS=1``).
SOLUTIONS = solutions_wanted()


# ------------------------------------------------------------------------------------ claims

class ClaimError(AssertionError):
    """A notebook's reading does not hold in this run."""


def claim(name: str, holds: bool, reading: str = "", *, skip: str | bool | None = None) -> None:
    """Check one of a notebook's readings against the numbers its cell just computed.

    ``holds``: the comparison (e.g. ``drop_aux < drop_none``). ``reading``: the numbers it
    compared, in words, printed either way. ``skip``: a reason why the claim cannot be judged
    at this preset (e.g. ``SMOKE and "10 training steps are too few to ..."``); a false value
    means judge it. Returns nothing (a cell that ends with a claim displays no value).
    """
    if not name or any(ch.isspace() for ch in name):
        raise ValueError(f"a claim's name is one word (no spaces); got {name!r}")
    if skip:
        if not isinstance(skip, str) or not skip.strip():
            raise ValueError(f"claim {name}: say why it is skipped (skip must be a sentence)")
        print(f"claim {name}: skipped: {skip.strip()}")
        return
    if not holds:
        raise ClaimError(f"claim {name} does not hold in this run: {reading or '(no reading)'}. "
                         "The text above was written for this comparison; the run says "
                         "otherwise (please report it, with the preset and the numbers).")
    print(f"claim {name}: held" + (f" ({reading})" if reading else ""))


# --------------------------------------------------------------------------------- exercises

class ExerciseError(Exception):
    """What is wrong with an answer, in words. IPython shows the message, not a traceback."""

    def _render_traceback_(self) -> list[str]:
        return ["\x1b[1;31mNot yet:\x1b[0m " + line if i == 0 else "  " + line
                for i, line in enumerate(str(self).splitlines())]


def _passed(message: str) -> None:
    print("✓ " + message)


def _answered(value, name: str, what: str):
    """An answer left as ``...`` (or None) is not answered yet."""
    if value is ... or value is None:
        raise ExerciseError(f"`{name}` is not answered yet: in the cell above, replace the "
                            f"`...` with {what}, run that cell, then this one. (Stuck? The "
                            f"hidden cell below it holds a solution: click its ⋯ to show it.)")
    return value


def _counts(value, name: str, example: str = "") -> tuple[int, ...]:
    """An answer that should be a tuple of counts, as ints (a clear error if it is not)."""
    try:
        return tuple(int(n) for n in value)
    except (TypeError, ValueError):
        raise ExerciseError(f"`{name}` should be a tuple of expert counts{example}; got "
                            f"{value!r}") from None


def _function(fn, name: str, signature: str) -> Callable:
    if fn is None or fn is ...:
        raise ExerciseError(f"`{name}` is not defined yet: complete `def {name}{signature}` in "
                            f"the cell above and run it.")
    if not callable(fn):
        raise ExerciseError(f"`{name}` should be a function `{name}{signature}`; "
                            f"got {type(fn).__name__} {fn!r}")
    return fn


def _call(fn: Callable, name: str, *args, **kwargs):
    """Call a learner's function; its own mistakes come back as one sentence."""
    shown = ", ".join([_short(a) for a in args] + [f"{k}={_short(v)}" for k, v in kwargs.items()])
    try:
        result = fn(*args, **kwargs)
    except ExerciseError:
        raise
    except NotImplementedError:
        raise ExerciseError(f"`{name}` is not written yet (it raised NotImplementedError): "
                            f"fill in its body in the cell above.") from None
    except Exception as err:  # the learner's bug, reported in one line
        raise ExerciseError(f"`{name}({shown})` raised {type(err).__name__}: {err}") from None
    if result is None or result is ...:
        raise ExerciseError(f"`{name}({shown})` returned {result!r}: its body needs a `return` "
                            f"with the answer (the cell above still has the `...`?).")
    return result


def _short(value) -> str:
    if isinstance(value, Tensor):
        return f"tensor of shape {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ExerciseError(f"`{name}` should be one number; got a tensor of shape "
                                f"{list(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ExerciseError(f"`{name}` should be a number; got {type(value).__name__} "
                                f"{value!r}") from None
    return float(value)


def _tensor(value, name: str, shape: Sequence[int] | None = None) -> Tensor:
    if not isinstance(value, Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise ExerciseError(f"`{name}` should be a tensor; got {type(value).__name__}"
                                ) from None
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ExerciseError(f"`{name}` should have shape {list(shape)}; got "
                            f"{list(value.shape)}")
    return value


# ---- 01 routing

def check_capacity(C_train, C_decode) -> None:
    """01: C for a training batch (4 × 128 tokens, E = 16, top-2, cf = 1.25) and for a decode
    step (8 tokens, E = 16, top-2, cf = 1.0), both with min_capacity = 4."""
    cases = {"C_train": (C_train, 4 * 128, 16, 1.25, 2, 4),
             "C_decode": (C_decode, 8, 16, 1.0, 2, 4)}
    for name, (answer, S, E, cf, k, min_capacity) in cases.items():
        answer = _number(_answered(answer, name, "a whole number of slots"), name)
        expected = expert_capacity(S, E, cf, k, min_capacity)
        if answer == expected:
            continue
        raw = S / E * cf * k
        if answer == math.ceil(raw) and expected == min_capacity:
            hint = f"then take the larger of that and min_capacity = {min_capacity}"
        elif answer == math.floor(raw) and raw != math.floor(raw):
            hint = "round S/E·cf·k *up* (ceil): a fractional slot is a whole slot"
        elif math.isclose(answer, raw):
            hint = "C is a whole number of slots: ceil(S/E·cf·k)"
        elif answer == math.ceil(S / E * cf):
            hint = "each token sends k routes, so multiply by k"
        else:
            hint = "C = max(ceil(S/E · cf · k), min_capacity)"
        raise ExerciseError(f"{name} = {answer:g}, but moelab.expert_capacity({S}, {E}, {cf}, "
                            f"{k}, {min_capacity}) = {expected}: {hint}.")
    _passed(f"C_train = {C_train}, C_decode = {C_decode}: both equal moelab.expert_capacity. "
            f"The decode step's C comes from min_capacity alone.")


def check_top1(my_top1) -> None:
    """01: ``my_top1(logits [S, E], capacity) -> (expert [S], slot [S])``, top-1 routing with
    dropping by position (slot -1 when the expert is full), against moelab.route."""
    from .router import route

    fn = _function(my_top1, "my_top1", "(logits, capacity)")
    generator = torch.Generator().manual_seed(15)
    cases = [(8, 4, 1.0), (8, 4, 0.5), (16, 4, 1.0), (12, 3, 0.75), (20, 5, 2.0)]
    for S, E, cf in cases:
        logits = torch.randn(S, E, generator=generator) + torch.linspace(1.0, 0.0, E)
        reference = route(logits, k=1, capacity_factor=cf, min_capacity=0, use_rts=False)
        C = reference.capacity
        result = _call(fn, "my_top1", logits.clone(), C)
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise ExerciseError("`my_top1` should return two tensors, (expert, slot); got "
                                f"{_short(result)}")
        expert = _tensor(result[0], "expert").reshape(-1)
        slot = _tensor(result[1], "slot").reshape(-1)
        for name, value in (("expert", expert), ("slot", slot)):
            if value.numel() != S:
                raise ExerciseError(f"`{name}` should hold one entry per token ({S} for logits "
                                    f"of shape [{S}, {E}]); got {value.numel()}")
        want_expert, want_slot = reference.expert[:, 0], reference.slot[:, 0]
        wrong = (expert.long() != want_expert).nonzero().flatten()
        if len(wrong):
            s = int(wrong[0])
            raise ExerciseError(
                f"for logits of shape [{S}, {E}], token {s} goes to expert "
                f"{int(expert[s])} in yours and to {int(want_expert[s])} in moelab.route: "
                f"each token takes the expert with the largest logit (argmax over dim=-1).")
        wrong = (slot.long() != want_slot).nonzero().flatten()
        if len(wrong):
            s = int(wrong[0])
            raise ExerciseError(
                f"with capacity {C} and logits of shape [{S}, {E}], token {s} (expert "
                f"{int(want_expert[s])}) gets slot {int(slot[s])} in yours and "
                f"{int(want_slot[s])} in moelab.route: tokens take their expert's slots "
                f"0, 1, ... in token order, and get -1 once {C} are taken.")
    _passed(f"my_top1 equals moelab.route(k=1, use_rts=False) on {len(cases)} batches "
            f"(experts and slots, drops included).")


def check_aux_below_one(logits) -> None:
    """01: gate logits [S, E] whose top-1 l_aux is below 1."""
    from .router import route

    logits = _tensor(_answered(logits, "below_one", "a [S, E] tensor of logits"), "below_one")
    if logits.dim() != 2 or logits.shape[0] < 1 or logits.shape[1] < 2:
        raise ExerciseError(f"`below_one` should be logits of shape [S, E] with E >= 2; got "
                            f"shape {list(logits.shape)}")
    routing = route(logits.float(), k=1, min_capacity=0, use_rts=False)
    aux = float(routing.aux_loss)
    if aux >= 1 - 1e-3:
        raise ExerciseError(
            f"l_aux = {aux:.4f} for these logits (counts {routing.counts.tolist()}): not below "
            f"1. Hint: l_aux = E · Σ_e me_e · ce_e. Put most tokens (a large ce_e) on an "
            f"expert whose *mean* probability me_e is below 1/E: many tokens that barely "
            f"prefer it, and a few that prefer another expert with confidence.")
    _passed(f"l_aux = {aux:.4f} < 1 with counts {routing.counts.tolist()}: 1 is the value of "
            f"balanced routing, not the smallest l_aux can be.")


# ---- 02 load balance

def check_load_stats(my_load_stats) -> None:
    """02: ``my_load_stats(counts [E], capacity) -> (cv, drop_fraction)`` for top-1 routing."""
    from .router import route

    fn = _function(my_load_stats, "my_load_stats", "(counts, capacity)")
    generator = torch.Generator().manual_seed(2)
    for S, E, cf, tilt in ((64, 8, 1.0, 2.0), (40, 4, 1.25, 0.5), (30, 6, 1.0, 4.0)):
        logits = torch.randn(S, E, generator=generator) + tilt * torch.linspace(1, 0, E)
        routing = route(logits, k=1, capacity_factor=cf, min_capacity=0, use_rts=False)
        counts = routing.counts.clone()
        result = _call(fn, "my_load_stats", counts, routing.capacity)
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise ExerciseError("`my_load_stats` should return two numbers, (cv, "
                                f"drop_fraction); got {_short(result)}")
        cv, drop = _number(result[0], "cv"), _number(result[1], "drop_fraction")
        c = routing.counts.float()
        want_cv = float(c.std(unbiased=False) / c.mean())
        want_drop = routing.drop_fraction
        if not math.isclose(drop, want_drop, abs_tol=1e-6):
            hint = ("a fraction of all routes, not a count" if drop > 1 else
                    "an expert drops only what exceeds C: sum of max(0, counts - C), over "
                    "the sum of counts")
            raise ExerciseError(f"counts {counts.tolist()}, C = {routing.capacity}: your "
                                f"drop_fraction {drop:.4f}, the Routing's {want_drop:.4f}: "
                                f"{hint}.")
        if not math.isclose(cv, want_cv, rel_tol=1e-4, abs_tol=1e-6):
            sample = float(c.std(unbiased=True) / c.mean())
            hint = ("that is the sample std (n - 1); use the population std "
                    "(unbiased=False), so that one expert with everything gives √(E−1)"
                    if math.isclose(cv, sample, rel_tol=1e-4) else "CV = std(counts) / "
                    "mean(counts), with the population std (unbiased=False)")
            raise ExerciseError(f"counts {counts.tolist()}: your cv {cv:.4f}, expected "
                                f"{want_cv:.4f}: {hint}.")
    _passed("my_load_stats gives the load CV and moelab's Routing.drop_fraction on 3 routings.")


def check_bias_update(my_bias_update) -> None:
    """02: ``my_bias_update(bias [E], counts [E], rate) -> new bias``, DeepSeek-V3's rule,
    against moelab.Router.update_selection_bias."""
    from .router import Router

    fn = _function(my_bias_update, "my_bias_update", "(bias, counts, rate)")
    generator = torch.Generator().manual_seed(5)
    for E, rate in ((4, 0.01), (8, 0.001), (6, 0.1)):
        counts = torch.randint(0, 40, (E,), generator=generator)
        counts[0] = int(counts.float().mean().round())  # (maybe) one expert exactly at the mean
        bias = 0.05 * torch.randn(E, generator=generator)
        router = Router(4, E, bias_update_rate=rate)
        router.selection_bias.copy_(bias)
        router.update_selection_bias(counts)
        expected = router.selection_bias
        result = _tensor(_call(fn, "my_bias_update", bias.clone(), counts.clone(), rate),
                         "my_bias_update(...)", (E,))
        if torch.allclose(result.float(), expected, atol=1e-7):
            continue
        if torch.allclose(result.float(), bias - rate * torch.sign(counts.float().mean()
                                                                   - counts), atol=1e-7):
            hint = ("the sign is reversed: an expert *above* the mean load should become less "
                    "attractive (its bias goes down)")
        elif torch.allclose(result.float(), bias + rate * (counts.float().mean() - counts),
                            atol=1e-6):
            hint = "each step moves a bias by exactly ±γ: take the sign of (mean - load)"
        else:
            hint = "b_e ← b_e + γ · sign(mean load − load_e)"
        raise ExerciseError(f"bias {bias.numpy().round(3).tolist()}, counts "
                            f"{counts.tolist()}, γ = {rate}: yours "
                            f"{result.float().numpy().round(4).tolist()}, the Router's "
                            f"{expected.numpy().round(4).tolist()}: {hint}.")
    _passed("my_bias_update equals Router.update_selection_bias on 3 cases.")


# ---- 03 PR-MoE

def check_moe_params(my_moe_params) -> None:
    """03: ``my_moe_params(d_model, d_ff, num_experts, residual) -> int`` against the
    parameters of moelab.MoE(...)."""
    from .layer import MoE

    fn = _function(my_moe_params, "my_moe_params", "(d_model, d_ff, num_experts, residual)")
    for d, f, E, residual in ((8, 32, 4, False), (8, 32, 4, True), (16, 24, 3, True),
                              (12, 48, 8, False)):
        layer = MoE(d, f, E, residual=residual)
        expected = sum(p.numel() for p in layer.parameters())
        answer = _number(_call(fn, "my_moe_params", d, f, E, residual), "my_moe_params(...)")
        if answer == expected:
            continue
        ffn = d * f + f + f * d + d
        gate = E * d
        if answer == expected - gate:
            hint = f"add the gate, a d_model × E matrix ({gate} here, no bias)"
        elif answer == expected - E * (f + d) - (residual and (f + d)):
            hint = "each FFN has two biases too (d_ff and d_model)"
        elif residual and answer == expected - (2 * d + 2):
            hint = ("Residual-MoE also has its mixing coefficient, a Linear(d_model, 2) "
                    "with bias (2·d_model + 2)")
        elif residual and answer == expected - ffn - (2 * d + 2):
            hint = "with residual=True there is the fixed MLP (one more FFN) and the coefficient"
        else:
            hint = ("E expert FFNs of d·f + f + f·d + d each, the gate E·d, and with "
                    "residual one more FFN plus a Linear(d, 2)")
        raise ExerciseError(f"MoE(d_model={d}, d_ff={f}, num_experts={E}, residual={residual}) "
                            f"has {expected:,} parameters; yours says {answer:,.0f}: {hint}.")
    _passed("my_moe_params counts moelab.MoE's parameters exactly, with and without residual.")


def check_schedule(schedule) -> None:
    """03: the expert schedule of preset("tiny", n_layer=12, experts="8/32")."""
    from .model import preset

    schedule = _answered(schedule, "my_schedule", "a tuple with one expert count per MoE layer")
    config = preset("tiny", n_layer=12, experts="8/32")
    expected = tuple(config.expert_schedule)
    answer = _counts(schedule, "my_schedule", ", like (4, 4, 16)")
    if answer == expected:
        _passed(f"{answer}: MoE blocks {list(config.moe_layers)}, the last two with 32.")
        return
    if len(answer) != len(expected):
        hint = (f"a 12-block model with MoE on every other block has {len(expected)} MoE "
                f"layers (blocks {list(config.moe_layers)})")
    else:
        hint = "'a/b' gives b experts to the *last two* MoE layers and a to the others"
    raise ExerciseError(f"my_schedule = {answer}, but the config's is {expected}: {hint}.")


# ---- 04 Mixture-of-Students

def check_student_schedule(schedule) -> None:
    """04: the student_config(teacher, 8) schedule of a 12-block teacher with experts
    (2, 4, 8, 16, 32, 64)."""
    from .distill import student_config
    from .model import preset

    schedule = _answered(schedule, "my_student_schedule",
                         "a tuple with one expert count per MoE layer of the student")
    teacher = preset("tiny", n_layer=12, experts=(2, 4, 8, 16, 32, 64))
    expected = tuple(student_config(teacher, n_layer=8).expert_schedule)
    answer = _counts(schedule, "my_student_schedule")
    if answer == expected:
        _passed(f"{answer}: the student keeps the teacher's last {len(expected)} MoE layers.")
        return
    if len(answer) != len(expected):
        hint = f"8 blocks with MoE on every other one make {len(expected)} MoE layers"
    elif answer == tuple((2, 4, 8, 16, 32, 64)[:len(expected)]):
        hint = "the student keeps the teacher's *last* expert counts (the pyramid's top)"
    else:
        hint = "keep the teacher's last expert counts, one per MoE layer of the student"
    raise ExerciseError(f"my_student_schedule = {answer}; student_config gives {expected}: "
                        f"{hint}.")


def check_staged_loss(my_staged_loss) -> None:
    """04: ``my_staged_loss(student, teacher, x, y, step, alpha, kd_stop_step) -> loss``
    against moelab.distill.StagedKD."""
    from .distill import StagedKD
    from .model import GPT, preset

    fn = _function(my_staged_loss, "my_staged_loss",
                   "(student, teacher, x, y, step, alpha, kd_stop_step)")
    config = preset("tiny", n_layer=2, d_model=16, n_head=2, block_size=8, experts=2,
                    vocab_size=32)
    torch.manual_seed(0)
    teacher, student = GPT(config).eval(), GPT(config).eval()
    x = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    for step, alpha, stop in ((0, 1.0, 3), (2, 0.5, 3), (3, 1.0, 3), (5, 2.0, None)):
        objective = StagedKD(teacher, alpha=alpha, kd_stop_step=stop)
        with torch.no_grad():
            expected = float(objective(student, x, y, step)[0])
            answer = _number(_call(fn, "my_staged_loss", student, teacher, x, y, step, alpha,
                                   stop), "my_staged_loss(...)")
        if math.isclose(answer, expected, rel_tol=1e-5):
            continue
        active = stop is None or step < stop
        with torch.no_grad():
            own = float(student(x, y).loss)
        if active and math.isclose(answer, own, rel_tol=1e-5):
            hint = (f"at step {step} < kd_stop_step={stop}, KD is still on: add α · kd_loss("
                    f"student logits, teacher logits)" if stop is not None else
                    "kd_stop_step=None means KD never stops")
        elif not active and not math.isclose(answer, own, rel_tol=1e-5):
            hint = (f"from step kd_stop_step={stop} on, the loss is the student's own "
                    f"(output.loss) alone")
        else:
            hint = ("the student's own loss is `student(x, y).loss` (LM + 0.01·l_aux); add "
                    "alpha · kd_loss(student logits, teacher(x).logits)")
        raise ExerciseError(f"step {step}, alpha {alpha}, kd_stop_step {stop}: yours "
                            f"{answer:.5f}, StagedKD's {expected:.5f}: {hint}.")
    _passed("my_staged_loss equals StagedKD's loss before, at and after kd_stop_step, and "
            "with full KD.")


# ---- 05 inference kernels

def check_einsum_cost(einsum_macs, table_copies) -> None:
    """05: the dispatch einsum's multiply-adds and the mapping table's copies for S = 4096
    tokens, E = 64, top-1, cf = 1, min_capacity = 4, d = 1024."""
    from .dispatch import dispatch_masks
    from .router import route

    S, E, k, d = 4096, 64, 1, 1024
    macs = _number(_answered(einsum_macs, "einsum_macs", "a number (S·E·C·d)"), "einsum_macs")
    copies = _number(_answered(table_copies, "table_copies", "a number (S·k·d)"),
                     "table_copies")
    C = expert_capacity(S, E, 1.0, k, 4)
    # the library's own masks on a small case, to confirm the [S, E, C] shape the count uses
    small = route(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), k=1,
                  training=False)
    assert tuple(dispatch_masks(small)[0].shape) == (64, 8, small.capacity)
    if macs != S * E * C * d:
        hint = (f"the mask is [S, E, C] = [{S}, {E}, {C}] (C = expert_capacity(...)), and each "
                f"entry multiplies a d-vector")
        if macs == S * E * d:
            hint = "the mask has a C axis too: S·E·C·d"
        raise ExerciseError(f"einsum_macs = {macs:,.0f}; the einsum does S·E·C·d = "
                            f"{S * E * C * d:,} multiply-adds: {hint}.")
    if copies != S * k * d:
        raise ExerciseError(f"table_copies = {copies:,.0f}; the gather copies one d-row per "
                            f"kept route, at most S·k·d = {S * k * d:,} numbers.")
    _passed(f"{macs:,.0f} multiply-adds against {copies:,.0f} copies: {macs / copies:,.0f}x, "
            f"which is E·C = {E * C}.")


def check_token_of_row(my_token_of_row) -> None:
    """05: ``my_token_of_row(routing) -> [E·C] long``: the token in each buffer row (-1 for an
    empty row), against what moelab.dispatch puts there."""
    from .dispatch import dispatch
    from .router import route

    fn = _function(my_token_of_row, "my_token_of_row", "(routing)")
    generator = torch.Generator().manual_seed(3)
    for S, E, k, cf in ((16, 4, 1, 1.0), (12, 3, 2, 0.75), (20, 5, 1, 0.5)):
        logits = torch.randn(S, E, generator=generator) + torch.linspace(1, 0, E)
        routing = route(logits, k=k, capacity_factor=cf, min_capacity=0, training=False)
        rows = routing.num_experts * routing.capacity
        # dispatch token ids + 1 (so an empty row, 0, is not token 0)
        ids = torch.arange(1, S + 1, dtype=torch.float32)[:, None]
        expected = dispatch(ids, routing, "index").reshape(rows).long() - 1
        answer = _tensor(_call(fn, "my_token_of_row", routing), "my_token_of_row(routing)")
        if answer.numel() != rows:
            raise ExerciseError(f"with E = {E} experts of C = {routing.capacity} slots the "
                                f"buffer has E·C = {rows} rows; yours has {answer.numel()} "
                                f"entries.")
        wrong = (answer.reshape(-1).long() != expected).nonzero().flatten()
        if len(wrong):
            r = int(wrong[0])
            e, c = divmod(r, routing.capacity)
            raise ExerciseError(f"S={S}, E={E}, k={k}, C={routing.capacity}: buffer row {r} "
                                f"(expert {e}, slot {c}) holds token {int(expected[r])} after "
                                f"moelab.dispatch; yours says {int(answer.reshape(-1)[r])}. "
                                f"Row = expert·C + slot, for kept routes only (slot >= 0); "
                                f"empty rows are -1.")
    _passed("my_token_of_row matches moelab.dispatch's buffer on 3 routings (top-1 and top-2).")


def check_tiles(num_tiles, tile_schedule: Callable | None = None) -> None:
    """05: tiles of BLOCK_M = 16 rows for loads [37, 5, 0, 16], against the kernels' own
    schedule (``moelab.kernels.tile_schedule``, passed in: the course module does not import
    the kernels), or the formula it implements when it is not given."""
    loads, block_m = [37, 5, 0, 16], 16
    answer = _number(_answered(num_tiles, "num_tiles", "a whole number of tiles"), "num_tiles")
    if tile_schedule is not None:
        expected = len(tile_schedule(torch.tensor(loads), block_m=block_m).tile_expert)
        source = "moelab.kernels.tile_schedule"
    else:
        expected = sum(-(-n // block_m) for n in loads)
        source = "the schedule's formula"
    if answer == expected:
        _passed(f"{expected} tiles, as {source} says: a tile never holds two experts' rows.")
        return
    if answer == math.ceil(sum(loads) / block_m):
        hint = ("tiles never straddle two experts: count ceil(load / BLOCK_M) per expert, "
                "then add")
    else:
        hint = "per expert ceil(load / BLOCK_M) tiles (0 for an expert with no rows), summed"
    raise ExerciseError(f"num_tiles = {answer:g}; {source} gives {expected}: {hint}.")


# ---- 06 expert parallelism

def check_exchange_messages(predicted: dict) -> None:
    """06: messages per forward of one rank on 4 ranks: flat, hierarchical (2 ranks per node),
    TP-coordinated (tp_size 2)."""
    from .exchanges import messages_per_forward

    predicted = _answered(predicted, "my_messages",
                          "a dict {'flat': n, 'hierarchical': n, 'tp_coordinated': n}")
    layouts = {"flat": dict(), "hierarchical": dict(node_size=2),
               "tp_coordinated": dict(tp_size=2)}
    if not isinstance(predicted, dict) or set(predicted) != set(layouts):
        raise ExerciseError(f"`my_messages` should be a dict with the keys {sorted(layouts)}; "
                            f"got {predicted!r}")
    for name, options in layouts.items():
        value = _answered(predicted[name], f"my_messages[{name!r}]", "a number of messages")
        answer = _number(value, f"my_messages[{name!r}]")
        expected = messages_per_forward(4, name, **options)
        if answer == expected:
            continue
        per_exchange = expected // 2 if name != "tp_coordinated" else (expected - 1) // 2
        if answer == per_exchange:
            hint = "that is one exchange; a forward has two (to the experts and back)"
        elif name == "tp_coordinated" and answer == expected - 1:
            hint = "and after the way back, an all-gather over the L = 2 lanes (L − 1 = 1)"
        else:
            hint = {"flat": "p − 1 per exchange",
                    "hierarchical": "(G − 1) + (p/G − 1) per exchange",
                    "tp_coordinated": "(p/L − 1) per exchange, plus L − 1 for the all-gather"
                    }[name]
        raise ExerciseError(f"my_messages[{name!r}] = {answer:g}; one rank sends {expected} "
                            f"messages per forward: {hint}.")
    fewest = min(layouts, key=lambda n: messages_per_forward(4, n, **layouts[n]))
    _passed(f"{predicted}: the formulas agree; fewest: {fewest}. The launch below measures "
            f"them.")


def check_owner(my_owner) -> None:
    """06: ``my_owner(num_experts, ranks) -> list``: the rank that holds each expert in the
    experts-first layout, against moelab.parallel.parallel_layout."""
    from .parallel import parallel_layout

    fn = _function(my_owner, "my_owner", "(num_experts, ranks)")
    for E, P in ((4, 2), (8, 4), (16, 4), (6, 3)):
        layout = parallel_layout(P, P, num_experts=E)
        expected = [r for e in range(E) for r in range(P) if e in layout.local_experts(r, E)]
        result = _call(fn, "my_owner", E, P)
        try:
            answer = [int(v) for v in result]
        except (TypeError, ValueError):
            raise ExerciseError(f"`my_owner` should return a list of ranks, one per expert; got "
                                f"{_short(result)}") from None
        if answer == expected:
            continue
        hint = ("experts-first gives rank r the E/P consecutive experts r·E/P ... "
                "(r+1)·E/P − 1, so expert e lives on rank e // (E/P)")
        if answer == [e % P for e in range(E)]:
            hint = "that is round-robin; experts-first keeps consecutive experts together. " + hint
        raise ExerciseError(f"E={E}, P={P}: yours {answer}, parallel_layout's {expected}: "
                            f"{hint}.")
    _passed("my_owner matches parallel_layout(...).local_experts for 4 layouts.")


# ---- 07 serving

def check_touched(my_touched) -> None:
    """07: ``my_touched(local, num_experts, routes) -> float``: the expected number of a GPU's
    ``local`` experts that a step's ``routes`` (uniformly routed) reach, against the experts
    that moelab.route actually hits on random logits."""
    from .router import route

    fn = _function(my_touched, "my_touched", "(local, num_experts, routes)")
    generator = torch.Generator().manual_seed(7)
    trials = 2000
    for local, E, routes in ((2, 16, 8), (4, 16, 32), (1, 8, 1), (16, 128, 64)):
        answer = _number(_call(fn, "my_touched", local, E, routes), "my_touched(...)")
        logits = torch.randn(trials * routes, E, generator=generator)
        chosen = route(logits, k=1, drop_tokens=False, training=False).expert[:, 0]
        hit = torch.zeros(trials, E, dtype=torch.bool)
        hit[torch.arange(trials).repeat_interleave(routes), chosen] = True
        measured = float(hit[:, :local].sum(dim=1).float().mean())
        exact = local * (1 - (1 - 1 / E) ** routes)
        if math.isclose(answer, exact, rel_tol=1e-6):
            if abs(measured - exact) > 0.1 * max(exact, 0.1):  # the library disagrees: not you
                raise RuntimeError(f"route() hit {measured:.3f} experts, expected {exact:.3f}")
            continue
        hint = ("each route misses a given expert with probability 1 − 1/E, so all "
                f"{routes} miss it with (1 − 1/E)^routes; a GPU with `local` experts expects "
                f"local · (1 − (1 − 1/E)^routes) of them hit")
        if math.isclose(answer, min(local, local * routes / E), rel_tol=1e-6):
            hint = "routes can land on the same expert: " + hint
        raise ExerciseError(f"local={local}, E={E}, routes={routes}: yours {answer:.3f}; "
                            f"moelab.route hit {measured:.3f} of them on average over "
                            f"{trials} random steps: {hint}.")
    _passed("my_touched matches the experts moelab.route hits on random logits (4 cases).")


def check_scaling_prediction(faster_at_64: bool) -> None:
    """07: at batch 1 per replica, is 1.3B+MoE-128 (hierarchical exchange) faster on 64 GPUs
    than on 8, in the cost model?"""
    from .serving import predict

    answer = _answered(faster_at_64, "faster_at_64", "True or False")
    if not isinstance(answer, bool):
        raise ExerciseError(f"`faster_at_64` should be True or False; got {answer!r}")
    at8, at64 = (predict("1.3B+MoE-128", g, exchange="hierarchical", batch=1) for g in (8, 64))
    truth = at64.latency_ms < at8.latency_ms
    reads = (1e3 * at8.components["weight_reads"], 1e3 * at64.components["weight_reads"])
    exchange = (1e3 * at8.components["exchange"], 1e3 * at64.components["exchange"])
    detail = (f"8 GPUs {at8.latency_ms:.2f} ms, 64 GPUs {at64.latency_ms:.2f} ms (weight reads "
              f"{reads[0]:.2f} → {reads[1]:.2f} ms, exchange {exchange[0]:.2f} → "
              f"{exchange[1]:.2f} ms)")
    if answer != truth:
        raise ExerciseError(f"the model says {truth}: {detail}. Think about how many experts "
                            f"one token (batch 1) touches per layer, whatever the GPU count.")
    _passed(f"{truth}: {detail}.")


# ---- 08 MoE after DeepSpeed

def check_group_limited(my_group_limited) -> None:
    """08: ``my_group_limited(scores [E], n_group, topk_group, k) -> k expert indices``, the
    experts DeepSeek-V3's group-limited top-k chooses for one token, against moelab.route."""
    from .router import route

    fn = _function(my_group_limited, "my_group_limited", "(scores, n_group, topk_group, k)")
    generator = torch.Generator().manual_seed(8)
    cases = [(8, 2, 1, 2), (8, 4, 2, 3), (12, 3, 2, 4), (16, 4, 1, 2), (16, 8, 4, 8)]
    for E, n_group, topk_group, k in cases:
        for _ in range(4):
            logits = torch.randn(1, E, generator=generator) * 2
            reference = route(logits, k=k, score="sigmoid", renormalize=True, n_group=n_group,
                              topk_group=topk_group, drop_tokens=False, training=False)
            scores = torch.sigmoid(logits[0])
            answer = _call(fn, "my_group_limited", scores.clone(), n_group, topk_group, k)
            chosen = sorted(int(e) for e in _tensor(answer, "the chosen experts").reshape(-1))
            expected = sorted(reference.expert[0].tolist())
            if chosen == expected:
                continue
            size = E // n_group
            groups = scores.view(n_group, size)
            group_scores = groups.topk(2, dim=-1).values.sum(-1)
            kept = group_scores.topk(topk_group).indices.tolist()
            if len(chosen) != k:
                hint = f"return k = {k} experts"
            elif chosen == sorted(scores.topk(k).indices.tolist()):
                hint = ("that is the plain top-k: first keep the topk_group groups with the "
                        "best group scores, then take the top-k inside them")
            else:
                hint = (f"the groups are experts [g·{size}, (g+1)·{size}); a group's score is "
                        f"the sum of its two best scores (here {group_scores.tolist()}), so the "
                        f"kept groups are {sorted(kept)}")
            raise ExerciseError(f"E={E}, n_group={n_group}, topk_group={topk_group}, k={k}: "
                                f"yours chose {chosen}, moelab.route {expected}: {hint}.")
    _passed(f"my_group_limited chooses what moelab.route(n_group=..., topk_group=...) chooses "
            f"on {4 * len(cases)} tokens.")


def check_sigmoid_weights(my_sigmoid_weights) -> None:
    """08: ``my_sigmoid_weights(logits [E], chosen [k], scale) -> weights [k]``, DeepSeek-V3's
    gate weights: the chosen experts' sigmoid scores renormalised to sum to 1, times the routed
    scaling factor."""
    from .router import route

    fn = _function(my_sigmoid_weights, "my_sigmoid_weights", "(logits, chosen, scale)")
    generator = torch.Generator().manual_seed(9)
    for E, k, scale in ((8, 2, 1.0), (8, 2, 2.5), (16, 4, 2.5), (6, 1, 1.5)):
        logits = torch.randn(1, E, generator=generator)
        reference = route(logits, k=k, score="sigmoid", renormalize=True,
                          routed_scaling_factor=scale, drop_tokens=False, training=False)
        chosen = reference.expert[0]
        answer = _tensor(_call(fn, "my_sigmoid_weights", logits[0].clone(), chosen.clone(),
                               scale), "weights").reshape(-1).float()
        expected = reference.weight[0]
        if answer.shape != expected.shape:
            raise ExerciseError(f"return one weight per chosen expert ({k}); got "
                                f"{answer.numel()}")
        if torch.allclose(answer, expected, atol=1e-5):
            continue
        plain = torch.sigmoid(logits[0, chosen])
        if torch.allclose(answer, plain, atol=1e-5):
            hint = "renormalise: divide by the chosen scores' sum, then multiply by scale"
        elif torch.allclose(answer, plain / plain.sum(), atol=1e-5):
            hint = f"multiply by the routed scaling factor ({scale})"
        elif torch.allclose(answer, torch.softmax(logits[0], -1)[chosen] * scale, atol=1e-5):
            hint = "DeepSeek-V3 scores with a sigmoid per expert, not a softmax over all"
        else:
            hint = "w_j = sigmoid(u_j) / Σ_chosen sigmoid(u_i) · scale"
        raise ExerciseError(f"E={E}, k={k}, scale={scale}: yours {answer.tolist()}, "
                            f"moelab.route {expected.tolist()}: {hint}.")
    _passed("my_sigmoid_weights equals moelab.route(score='sigmoid', renormalize=True, "
            "routed_scaling_factor=...) on 4 tokens.")


#: The base of 08's fine-grained exercise: 8 experts 256 wide (4 · d_model), top-1.
FINE_GRAINED_BASE = dict(name="tiny", experts=8)


def check_fine_grained(experts, expert_d_ff, k) -> None:
    """08: the experts, width and routed k of ``fine_grained(preset("tiny", experts=8), 4, 1)``."""
    from .model import preset
    from .modern import fine_grained

    base = preset(**FINE_GRAINED_BASE)
    fine = fine_grained(base, 4, 1)
    answers = {"experts": (experts, fine.expert_schedule[0], "an expert count"),
               "expert_d_ff": (expert_d_ff, fine.moe.expert_d_ff, "a width"),
               "k": (k, fine.moe.router.k, "the routed experts per token")}
    width, k0, e0 = base.ffn_dim, base.moe.router.k, base.expert_schedule[0]
    hints = {"experts": f"m = 4 times as many: 4 × {e0}",
             "expert_d_ff": f"each 1/m as wide: {width} / 4",
             "k": f"k·m = {k0 * 4} chosen slots at the same FLOPs, and the shared expert takes "
                  f"one of them"}
    for name, (answer, expected, what) in answers.items():
        answer = _number(_answered(answer, name, what), name)
        if answer != expected:
            raise ExerciseError(f"{name} = {answer:g}, but fine_grained(base, 4, 1) has "
                                f"{expected}: {hints[name]}.")
    _passed(f"{experts} experts of width {expert_d_ff}, {k} routed + 1 shared per token: "
            f"{k + 1} × {expert_d_ff} = {(k + 1) * expert_d_ff} hidden units, as the base's "
            f"{k0} × {width}.")
