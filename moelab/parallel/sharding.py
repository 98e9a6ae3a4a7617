"""Expert parameters and their optimizer state, sliced for an ep_size and gathered back.

An `Experts` bank keeps each matrix as one [E, ...] tensor, so an expert-parallel rank's share is
a slice of dim 0 and a checkpoint in "full" (ep_size-free) form is the concatenation. Expert
parameters are recognised by what they are (parameters of an `Experts` module), never by a
substring of their name (DeepSpeed's "expert" substring test catches user parameters too).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..experts import expert_banks
from .tracing import operation


def _expert_plans(model: nn.Module) -> dict:
    """{qualified name of every expert parameter: its bank's ExpertParallel (None: local)}."""
    return {f"{name}.{p}" if name else p: bank.parallel for name, bank in expert_banks(model)
            for p, _ in bank.named_parameters()}


def local_slice(full: Tensor, parallel) -> Tensor:
    """Rows [ep_rank·E/P, (ep_rank+1)·E/P) of a full [E, ...] expert tensor."""
    if parallel is None:
        return full
    rows = parallel.local_experts
    return full[rows.start:rows.stop]


def gather_full(local: Tensor, parallel) -> Tensor:
    """Concatenate the EP group's slices into the full [E, ...] tensor (on every rank)."""
    if parallel is None:
        return local
    parts = [torch.empty_like(local) for _ in range(parallel.ep_size)]
    with operation("all_gather (expert checkpoint)"):
        dist.all_gather(parts, local.contiguous(), group=parallel.ep_group)
    return torch.cat(parts)


def full_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Model (and optimizer) state with every expert tensor gathered to its full [E, ...] form:
    the same dict whatever the ep_size (collective: call on every rank)."""
    plans = _expert_plans(model)
    named = dict(model.named_parameters())
    state = {}
    for name, tensor in model.state_dict().items():
        if name in plans:
            tensor = gather_full(tensor, plans[name])
        state[name] = tensor.detach().clone()
    out = {"model": state}
    if optimizer is not None:
        ids = {id(p): n for n, p in named.items()}
        per_param = {}
        for group in optimizer.param_groups:
            for param in group["params"]:
                name = ids[id(param)]
                entry = {}
                for key, value in optimizer.state.get(param, {}).items():
                    if isinstance(value, Tensor) and value.dim() > 0 and name in plans:
                        value = gather_full(value, plans[name])
                    entry[key] = value.clone() if isinstance(value, Tensor) else value
                per_param[name] = entry
        out["optimizer"] = {"state": per_param,
                            "groups": [{k: v for k, v in g.items() if k != "params"}
                                       for g in optimizer.param_groups]}
    return out


def load_full_state_dict(model: nn.Module, state: dict,
                         optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a `full_state_dict` at this model's ep_size: each rank takes its experts' slice of
    the weights and (with ``optimizer``) of the optimizer state."""
    if not isinstance(state, dict) or "model" not in state:
        keys = sorted(state)[:4] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"load_full_state_dict takes what full_state_dict returns, a dict "
                         f"{{'model': ..., 'optimizer': ...}}; got {keys}. For a plain "
                         f"state_dict, pass {{'model': state_dict}}")
    if optimizer is not None and "optimizer" not in state:
        raise ValueError("an optimizer was given but the checkpoint holds no optimizer state "
                         "(it was saved with full_state_dict(model) alone): save it with "
                         "full_state_dict(model, optimizer), or load with optimizer=None")
    plans = _expert_plans(model)
    local = {}
    for name, tensor in state["model"].items():
        if name in plans:
            tensor = local_slice(tensor, plans[name])
        local[name] = tensor
    model.load_state_dict(local)
    if optimizer is None:
        return
    saved_groups = state["optimizer"]["groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"the optimizer has {len(optimizer.param_groups)} parameter groups and "
                         f"the checkpoint {len(saved_groups)}: build the optimizer as the saved "
                         f"one was (e.g. moelab.train.param_groups(model, weight_decay))")
    named = dict(model.named_parameters())
    unknown = sorted(set(state["optimizer"]["state"]) - set(named))
    if unknown:
        raise ValueError(f"the checkpoint's optimizer state names parameters this model does not "
                         f"have: {unknown[:4]}")
    for group, saved in zip(optimizer.param_groups, saved_groups, strict=True):
        group.update({k: v for k, v in saved.items() if k in group})
    for name, entry in state["optimizer"]["state"].items():
        param = named[name]
        restored = {}
        for key, value in entry.items():
            if isinstance(value, Tensor) and value.dim() > 0 and name in plans:
                value = local_slice(value, plans[name])
            restored[key] = value.clone() if isinstance(value, Tensor) else value
        if restored:
            optimizer.state[param] = restored
