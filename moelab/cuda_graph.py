"""CUDA graphs for decode: one captured step replayed for every new token.

Launching a decode step's many small kernels costs more than running them at small batch; a CUDA
graph records the step once and replays it with one launch. A captured graph replays fixed
kernels on fixed buffers, so the step (`StaticDecodeStep`) reads its inputs from static buffers
(the current tokens [B, 1] and the cache slot they go to, a [1] tensor), writes keys and values
with ``index_copy_`` at that slot, and attends over the whole preallocated cache under a mask
computed from it; per-sequence positions are that slot minus each sequence's left pad, on the
device. Nothing in it may wait for the device or take a shape from the data, and dropless
routing does (each expert's load sizes its buffer). So while the step is captured the MoE layers
route in the capacity layout with a capacity that can never drop a route (`static_routing`:
C >= S, the step's B tokens, e.g. cf = E / k): the same experts and weights as dropless, at the
cost of E·B buffer rows instead of B·k. Graph decode therefore equals eager cached decode
(tested on a GPU; on a CPU a ``torch.compile(fullgraph=True)`` of the same step stands in for
"capturable"). `moelab.generation.generate(cuda_graph=True)` uses this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .layer import MoE
from .model import GPT, KVCache
from .routing import expert_capacity


def synchronize(device: torch.device) -> None:
    """Wait for a CUDA device (a no-op elsewhere): before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def no_drop_capacity_factor(num_tokens: int, num_experts: int, k: int,
                            min_capacity: int = 4) -> float:
    """A capacity factor whose capacity C = max(⌈S/E · cf · k⌉, min_capacity) is >= S.

    An expert appears at most once among a token's k choices, so it is asked for at most S
    routes: with C >= S no route is ever dropped. cf = E / k gives ⌈S⌉ = S (checked with
    `moelab.routing.expert_capacity`'s own float32 arithmetic, E as a fallback)."""
    for factor in (num_experts / k, float(num_experts)):
        if expert_capacity(num_tokens, num_experts, factor, k, min_capacity) >= num_tokens:
            return factor
    raise AssertionError("unreachable: cf = E gives C >= S · k")


@contextmanager
def static_routing(model: nn.Module, num_tokens: int, dropless: bool = True
                   ) -> Iterator[nn.Module]:
    """Route every token-choice MoE layer in the capacity layout (static shapes), and put the
    routers back as they were afterwards.

    Capacity routing sizes every buffer from S, E, k and cf alone, so nothing in it waits for
    the device or takes a shape from the data; this is what a captured CUDA graph needs.
    With ``dropless=True`` (or a router that is dropless anyway) each router gets
    ``drop_tokens=True`` and the `no_drop_capacity_factor` for ``num_tokens`` tokens: no route
    is dropped, so the result equals dropless routing. ``dropless=False`` keeps a dropping
    router's own eval capacity factor. Expert-choice routers are left alone (their buffers are
    static already). Use it in eval (``inference_mode``): it sets the *eval* capacity factor.
    """
    routers = [m.router for m in model.modules()
               if isinstance(m, MoE) and m.router.config.choice == "token"]
    saved = [router.config for router in routers]
    try:
        for router in routers:
            config = router.config
            factor = config.eval_capacity_factor
            if dropless or not config.drop_tokens:
                factor = no_drop_capacity_factor(num_tokens, router.num_experts, config.k,
                                                 config.min_capacity)
            router.config = config.replace(drop_tokens=True, eval_capacity_factor=factor)
        yield model
    finally:
        for router, config in zip(routers, saved, strict=True):
            router.config = config


class StaticDecodeStep:
    """One decode step (one token per sequence) that reads everything from static buffers.

    ``token`` [B, 1] holds the current tokens and ``slot`` [1] the cache slot they go to; the
    step writes their keys and values at ``slot`` (``index_copy_``), attends over the whole
    preallocated ``cache`` under a mask built from ``slot`` and the cache's ``left_pad``, and
    returns the next-token logits [B, V]. Every call runs the same kernels on the same buffers,
    so the step can be captured in a CUDA graph (run it under `static_routing`, since dropless
    MoE routing is not static) and replayed after `load` fills the buffers.
    """

    def __init__(self, model: GPT, cache: KVCache) -> None:
        device = cache.k.device
        self.model, self.cache = model, cache
        self.token = torch.zeros((cache.batch_size, 1), dtype=torch.long,
                                 device=device)  # [B, 1]: any ids until load()
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # [1]

    def load(self, token: Tensor, slot: int) -> None:
        """Fill the input buffers for the step at cache slot ``slot`` (in place)."""
        self.token.copy_(token)  # [B, 1]
        self.slot.fill_(slot)

    def __call__(self) -> Tensor:
        out = self.model(self.token, cache=self.cache, cache_position=self.slot)
        return out.logits[:, -1]  # [B, V]


class DecodeGraph:
    """A `StaticDecodeStep` captured once in a ``torch.cuda.CUDAGraph``, replayed per step.

    The buffers must already hold the first step's real inputs: the warm-up runs (on a side
    stream, as capture requires) execute that step and write its keys and values, which the
    first replay then writes again, identically.
    """

    def __init__(self, step: StaticDecodeStep, warmup: int = 2) -> None:
        device = step.token.device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the decode step is on {device}")
        self.step = step
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.logits = step()  # [B, V]: a static output buffer, rewritten by every replay
        except RuntimeError as error:
            raise RuntimeError(
                "capturing the decode step in a CUDA graph failed: an operation in it waits for "
                "the device (.item(), bool(tensor), a boolean-mask selection) or takes a shape "
                "from the data; tests/test_inference.py's torch.compile(fullgraph=True) proxy "
                "names the line on a CPU") from error

    def __call__(self, token: Tensor, slot: int) -> Tensor:
        """Logits [B, V] for ``token`` [B, 1] at cache slot ``slot`` (a view of the static
        output: read it before the next call)."""
        self.step.load(token, slot)
        self.graph.replay()
        return self.logits


def check_cuda_graph(model: GPT, device: torch.device, use_cache: bool,
                      backend: str | None, cuda_graph) -> None:
    if not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph must be True or False; got {cuda_graph!r}")
    if not cuda_graph:
        return
    if device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device: CUDA graphs record GPU kernels, "
                         f"and the model is on {device}. Move the model to a GPU (model.cuda()) "
                         f"or leave cuda_graph=False")
    if not use_cache:
        raise ValueError("cuda_graph=True replays the cached decode step; use_cache=False "
                         "recomputes a prefix that grows every step, which a graph cannot "
                         "replay. Use use_cache=True")
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    backends = {backend or m.backend for m in layers}
    if backends - {"index"}:
        raise ValueError(f"cuda_graph=True needs the mapping-table dispatch, backend='index' "
                         f"(the others select by data-dependent masks); got "
                         f"{sorted(backends)}")
    if any(m.parallel is not None for m in layers):
        raise ValueError("cuda_graph=True does not support expert-parallel MoE layers (their "
                         "all-to-all sizes come from the routing); use cuda_graph=False")


def capture_decode(model: GPT, cache: KVCache, first_token: Tensor, slot: int,
             dropless: bool) -> DecodeGraph:
    """The decode step's graph, its buffers loaded with the first step's inputs (``first_token``
    [B, 1] at cache slot ``slot``), captured under `static_routing`."""
    step = StaticDecodeStep(model, cache)
    step.load(first_token, slot)
    with static_routing(model, cache.batch_size, dropless=dropless):
        return DecodeGraph(step)
