"""Checks that run on every rank of a `launch`: expert parallelism against one process.

Each function is a launch target ("moelab.examples.parallel_checks:ep_equivalence") and returns
plain numbers (max errors, losses), so a test or a notebook cell can assert on them.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from ..data import multidomain_corpus
from ..layer import MoE
from ..model import GPT, preset
from ..parallel import (
    ParallelConfig,
    clip_grad_norm_,
    full_state_dict,
    load_full_state_dict,
    parallelize,
    sync_gradients,
)
from ..train import param_groups


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference, relative to the largest magnitude of the reference `a`."""
    if not a.numel():
        return 0.0
    return float((a - b).abs().max()) / max(float(a.abs().max()), 1e-12)


def ep_equivalence(cases: list[dict], ep_size: int, d_model: int = 8, d_ff: int = 16,
                   num_experts: int = 4, seed: int = 0) -> list[dict]:
    """For each case (MoE options such as k, drop_tokens or residual, and ParallelConfig options
    exchange, node_size, tp_size): the expert-parallel layer against the single-process layer on
    this rank's tokens.
    Ranks get different numbers of tokens, and the last expert is never chosen. Returns the max
    errors of y, dL/dx, the router gradient and the expert gradients, each relative to the
    reference's largest magnitude."""
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for case in cases:
        case = dict(case)
        plan = {name: case.pop(name) for name in ParallelConfig.option_names() if name in case}
        tp_size = plan.get("tp_size", 1)
        if tp_size > 1:
            plan.setdefault("exchange", "tp_coordinated")
        options = dict(use_rts=False, **case)
        torch.manual_seed(seed)
        reference = MoE(d_model, d_ff, num_experts, **options).eval()
        with torch.no_grad():  # x[:, 0] = 3 below, so the last expert's logit is -15: no tokens
            reference.router.weight[-1] = 0.0
            reference.router.weight[-1, 0] = -5.0
        parallel = copy.deepcopy(reference)
        parallelize(parallel, ep_size=ep_size, **plan)
        # TP ranks hold the same tokens; otherwise every rank has its own, uneven in number
        group_id = rank // tp_size if tp_size > 1 else rank
        generator = torch.Generator().manual_seed(seed + 1 + group_id)
        num_tokens = 6 + 5 * group_id
        x = torch.randn(num_tokens, d_model, generator=generator)
        x[:, 0] = 3.0
        probe = torch.randn(num_tokens, d_model, generator=generator)
        outputs = {}
        for name, layer in (("reference", reference), ("parallel", parallel)):
            xi = x.clone().requires_grad_()
            y, routing = layer(xi)
            (y * probe).sum().backward()
            outputs[name] = (y.detach(), xi.grad, layer.router.weight.grad.clone(),
                             layer.experts, routing)
        # expert gradients: the reference's summed over every rank's tokens (each TP group's
        # tokens counted once), sliced to this rank's experts; the EP layer's summed over the
        # replicas of its experts (the TP group), then compared.
        ref_grads = [p.grad.clone() for p in reference.experts.parameters()]
        ep_grads = [p.grad.clone() for p in parallel.experts.parameters()]
        for grad in ref_grads:
            dist.all_reduce(grad)
            grad /= tp_size
        if tp_size > 1:
            for grad in ep_grads:
                dist.all_reduce(grad, group=parallel.parallel.replica_group)
        experts = parallel.parallel.local_experts
        expert_error = max(_max_error(r[experts.start:experts.stop], e)
                           for r, e in zip(ref_grads, ep_grads, strict=True))
        ref, par = outputs["reference"], outputs["parallel"]
        results.append({
            "case": {**case, **plan}, "rank": rank, "world": world,
            "tokens": num_tokens, "capacity": par[4].capacity, "load": ref[4].load.tolist(),
            "y": _max_error(ref[0], par[0]), "x_grad": _max_error(ref[1], par[1]),
            "router_grad": _max_error(ref[2], par[2]), "expert_grad": expert_error,
            "scale": float(ref[0].abs().max()),
            "messages": parallel.parallel.stats.messages,
        })
    return results


def _batch(rank: int, step: int, block_size: int, data):
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return data.batch(2, block_size, generator)


def _train_steps(model: GPT, steps: int, data, start: int = 0) -> list[float]:
    """Data-parallel steps on every rank's own batch; returns the global mean losses."""
    optimizer = model._optimizer
    losses = []
    for step in range(start, start + steps):
        x, y = _batch(dist.get_rank(), step, model.config.block_size, data)
        loss = model(x, y).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync_gradients(model)
        clip_grad_norm_(model, 1.0)
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / dist.get_world_size())
    return losses


def _model(ep_size: int, state: dict | None = None, **overrides) -> GPT:
    """A tiny GPT, expert-parallel over ep_size ranks (ep_size 1: every rank holds every
    expert, plain data parallelism), with its optimizer."""
    torch.manual_seed(0)
    config = preset("tiny", block_size=16, d_model=32, n_head=2, experts=4, use_rts=False,
                    **overrides)
    model = GPT(config)
    if ep_size > 1:
        parallelize(model, ep_size=ep_size)
    model._optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-3)
    if state is not None:
        load_full_state_dict(model, state, model._optimizer)
    return model


def ep_training_equivalence(ep_size: int, steps: int = 3) -> dict:
    """Train the same tiny GPT with ep=1 (pure data parallelism) and with ep=ep_size from the
    same weights on the same per-rank batches; return both loss curves and the largest
    absolute difference of any parameter afterwards (absolute: a bias that starts at zero is
    only ~lr·steps large, so a relative measure would magnify summation-order noise there)."""
    data = multidomain_corpus(5_000)
    baseline = _model(1)
    parallel = _model(ep_size, full_state_dict(baseline, baseline._optimizer))
    losses_1 = _train_steps(baseline, steps, data)
    losses_p = _train_steps(parallel, steps, data)
    a = full_state_dict(baseline)["model"]
    b = full_state_dict(parallel)["model"]
    return {"losses_ep1": losses_1, "losses_ep": losses_p,
            "param_error": max(float((a[k] - b[k]).abs().max()) if a[k].numel()
                               else 0.0 for k in a)}


def reshard_roundtrip(sizes: tuple[int, ...] = (4, 2, 1, 4), steps: int = 2) -> dict:
    """Train at sizes[0], then pass weights and optimizer state along the chain of ep_sizes
    (save at one size, load at the next). At every stop record the loss on a fixed probe batch
    (the outputs) and the probe loss after one more training step (the optimizer state)."""
    data = multidomain_corpus(5_000)
    model = _model(sizes[0])
    _train_steps(model, steps, data)
    state = full_state_dict(model, model._optimizer)
    probe = _batch(dist.get_rank(), 999, model.config.block_size, data)
    out = {"ep_sizes": list(sizes), "probe_loss": [], "next_step_loss": []}
    for ep_size in sizes:
        model = _model(ep_size, state)
        state = full_state_dict(model, model._optimizer)  # what the next size will load
        with torch.no_grad():
            out["probe_loss"].append(float(model.eval()(*probe).loss))
        _train_steps(model.train(), 1, data, start=steps)
        with torch.no_grad():
            out["next_step_loss"].append(float(model.eval()(*probe).loss))
    return out


def aux_free_bias_equivalence(ep_size: int, steps: int = 4, num_experts: int = 4,
                              d_model: int = 8, seed: int = 0) -> dict:
    """The auxiliary-loss-free bias under expert (or, at ep_size 1, data) parallelism against
    one process that routes every rank's tokens together: after each training step's routing
    the bias is updated from the load of the whole batch, so every rank holds the one-process
    bias, and so does the checkpoint. Returns the largest bias difference after each step, the
    ranks' spread, and the checkpoint's difference."""
    rank, world = dist.get_rank(), dist.get_world_size()
    options = dict(k=2, drop_tokens=False, bias_update_rate=0.05, second_expert_sampling=False)
    torch.manual_seed(seed)
    reference = MoE(d_model, 2 * d_model, num_experts, **options).train()
    with torch.no_grad():  # a router that prefers expert 0, so the bias has work to do
        reference.router.weight[0] += 1.0
    layer = parallelize(copy.deepcopy(reference), ep_size=ep_size)
    differences = []
    for step in range(steps):
        batches = [torch.randn(5 + r, d_model, generator=torch.Generator().manual_seed(
            100 * step + r)).abs() for r in range(world)]
        reference(torch.cat(batches))  # one process, every rank's tokens
        layer(batches[rank])
        differences.append(float((layer.router.selection_bias
                                  - reference.router.selection_bias).abs().max()))
    everyone = [torch.empty_like(layer.router.selection_bias) for _ in range(world)]
    dist.all_gather(everyone, layer.router.selection_bias)
    saved = full_state_dict(layer)["model"]["router.selection_bias"]
    return {"differences": differences,
            "spread": float(torch.stack(everyone).std(0).max()) if world > 1 else 0.0,
            "checkpoint": float((saved - reference.router.selection_bias).abs().max()),
            "bias": reference.router.selection_bias.tolist()}
