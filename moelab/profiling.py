"""Where the time of a forward goes: a per-layer, per-component latency breakdown.

`LatencyProfiler` / `decode_latency` measure attention, gate, dispatch, exchange, expert FFN,
combine, dense FFN and embeddings + head with module hooks and ``time.perf_counter``
(``torch.cuda.synchronize`` first on a GPU). Every stage of an MoE layer is a module (router,
dispatch, experts, combine, residual MLP), so the profiler only observes: it registers hooks and
removes them, and changes nothing of the model or of any module's globals.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import check_int
from .cuda_graph import synchronize
from .generation import inference_mode
from .layer import MLP, MoE
from .model import GPT, KVCache

COMPONENTS = ("attention", "gate", "dispatch", "exchange", "experts", "combine", "dense_ffn",
              "embed_head")
COMPONENT_LABELS = {
    "attention": "attention", "gate": "gate", "dispatch": "dispatch",
    "exchange": "exchange (all-to-all)", "experts": "expert FFN", "combine": "combine",
    "dense_ffn": "dense FFN", "embed_head": "embeddings + LM head",
}
MOE_COMPONENTS = ("gate", "dispatch", "exchange", "experts", "combine")


@dataclass
class LatencyBreakdown:
    """Seconds per forward, per component and per block, as plain data.

    ``per_layer[c][i]``: component c in block i (attention includes its LayerNorm and residual
    add; "dense_ffn" is a dense block's MLP or the residual MLP beside the experts; "combine"
    includes mixing in that residual branch). ``embed_head_s``: token + position embeddings,
    the final LayerNorm and the LM head. ``measured_s``: the wall time of the forward, measured
    outside the hooks; the components tile the forward, so they sum to it up to hook overhead.
    """

    per_layer: dict[str, list[float]]
    embed_head_s: float
    measured_s: float
    steps: int
    batch_size: int
    backend: str
    phase: str = "decode"
    use_cache: bool = True
    context: int = 0  # positions the model attends over (prompt length for prefill)
    moe_layers: list[int] = field(default_factory=list)

    @property
    def totals(self) -> dict[str, float]:
        """Component -> seconds per forward, summed over blocks."""
        out = {c: sum(v) for c, v in self.per_layer.items()}
        out["embed_head"] = self.embed_head_s
        return out

    @property
    def total_s(self) -> float:
        return sum(self.totals.values())

    @property
    def moe_s(self) -> float:
        """The MoE part (gate + dispatch + exchange + expert FFN + combine)."""
        return sum(self.totals[c] for c in MOE_COMPONENTS)

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second (decode: one per sequence per forward)."""
        tokens = self.batch_size if self.phase == "decode" else self.batch_size * self.context
        return tokens / self.measured_s if self.measured_s > 0 else float("nan")

    def rows(self) -> list[dict]:
        """Long format, one dict per (block, component), for tables and views."""
        out = [{"layer": i, "component": c, "seconds": s}
               for c, values in self.per_layer.items() for i, s in enumerate(values)]
        out.append({"layer": None, "component": "embed_head", "seconds": self.embed_head_s})
        return out

    def label(self) -> str:
        cache = "" if self.use_cache else ", no cache"
        return f"{self.backend}{cache} · B={self.batch_size}"


class LatencyProfiler:
    """Times every forward of a moelab GPT by component and block, with module hooks.

    ``with LatencyProfiler(model) as profiler: model(idx)`` then ``profiler.breakdown()``. Each
    hook reads the clock (after ``torch.cuda.synchronize`` on a GPU) and charges the time since
    the previous hook to the component that was running. The hooks sit on the blocks, the
    attention, the FFN or MoE layer and its stages (router, dispatch, experts, combine, residual
    MLP) and the final LayerNorm; under expert parallelism the time between dispatch's end and
    the experts' start (and between the experts' end and combine's start) is the exchange.
    Leaving the ``with`` removes every hook: the model is never changed.
    """

    _active = False

    def __init__(self, model: GPT) -> None:
        if not isinstance(model, GPT):
            raise ValueError(f"LatencyProfiler takes a moelab GPT; got {type(model).__name__}")
        self.model = model
        self.device = next(model.parameters()).device
        self.num_layers = len(model.blocks)
        self._handles: list = []
        self.reset()

    def reset(self) -> None:
        self.seconds = {c: [0.0] * self.num_layers for c in COMPONENTS if c != "embed_head"}
        self.embed_head_s = 0.0
        self.calls = 0
        self._running = False
        self._label, self._layer, self._clock = "embed_head", -1, 0.0

    # ---------------------------------------------------------------------------- timeline
    def _now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def _mark(self, label: str, layer: int | None = None) -> None:
        """Charge the time since the last mark to the running component; start ``label``."""
        if not self._running:
            return
        now = self._now()
        elapsed = now - self._clock
        if self._label == "embed_head":
            self.embed_head_s += elapsed
        else:
            self.seconds[self._label][self._layer] += elapsed
        self._label = label
        if layer is not None:
            self._layer = layer
        self._clock = now  # hooks cost time too: it goes to the next component (marks tile)

    def _start(self, *_) -> None:
        self._running = True
        self._label, self._layer = "embed_head", -1
        self._clock = self._now()

    def _stop(self, *_) -> None:
        self._mark("embed_head")
        self._running = False
        self.calls += 1

    # -------------------------------------------------------------------------------- hooks
    def _hook(self, module: nn.Module, before: str | None, after: str | None,
              layer: int | None = None) -> None:
        if before is not None:
            self._handles.append(module.register_forward_pre_hook(
                lambda *_: self._mark(before, layer)))
        if after is not None:
            self._handles.append(module.register_forward_hook(
                lambda *_: self._mark(after, layer)))

    def _hook_moe(self, layer: MoE, i: int) -> None:
        # gate | dispatch | [exchange] | experts | [exchange] | combine | [dense_ffn | combine]
        exchange = layer.runner == "parallel"
        self._hook(layer, "gate", None, i)
        self._hook(layer.router, None, "experts" if layer.runner == "fused" else "dispatch", i)
        # after dispatch: the all-to-all, or (local) the experts' own padding, still dispatch
        self._hook(layer.dispatch, None, "exchange" if exchange else None, i)
        self._hook(layer.experts, "experts", "exchange" if exchange else "combine", i)
        self._hook(layer.combine, "combine", None, i)
        if layer.residual:
            self._hook(layer.mlp, "dense_ffn", "combine", i)

    def __enter__(self) -> LatencyProfiler:
        if LatencyProfiler._active:
            raise RuntimeError("another LatencyProfiler is active; profile one model at a time")
        LatencyProfiler._active = True
        model = self.model
        self._handles.append(model.register_forward_pre_hook(self._start))
        self._handles.append(model.register_forward_hook(self._stop))
        for i, block in enumerate(model.blocks):
            self._hook(block, "attention", None, i)
            if isinstance(block.ffn, MoE):
                self._hook_moe(block.ffn, i)
            elif isinstance(block.ffn, MLP):
                self._hook(block.ffn, "dense_ffn", None, i)
        self._hook(model.ln_f, "embed_head", None)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._running = False
        LatencyProfiler._active = False

    def breakdown(self, measured_s: float, batch_size: int, backend: str, phase: str = "decode",
                  use_cache: bool = True, context: int = 0) -> LatencyBreakdown:
        """Seconds per forward (averaged over the profiled calls)."""
        calls = max(self.calls, 1)
        moe_layers = [i for i, b in enumerate(self.model.blocks) if b.is_moe]
        return LatencyBreakdown(
            per_layer={c: [s / calls for s in v] for c, v in self.seconds.items()},
            embed_head_s=self.embed_head_s / calls, measured_s=measured_s / calls,
            steps=self.calls, batch_size=batch_size, backend=backend, phase=phase,
            use_cache=use_cache, context=context, moe_layers=moe_layers)


@torch.no_grad()
def decode_latency(model: GPT, batch_size: int = 1, prompt_length: int = 16, steps: int = 8,
                   backend: str | None = "index", dropless: bool = True, use_cache: bool = True,
                   warmup: int = 2, phase: str = "decode", seed: int = 0) -> LatencyBreakdown:
    """Where the time of one forward goes, per component and block, averaged over ``steps``.

    phase="decode": a prompt of random tokens is prefilled, ``warmup`` decode steps run
    unprofiled, then ``steps`` one-token decode steps are profiled (with ``use_cache=False``
    each step recomputes the whole prefix: the naive path). phase="prefill": the forward over
    the prompt itself, ``steps`` times.
    """
    if phase not in ("decode", "prefill"):
        raise ValueError(f"phase must be 'decode' or 'prefill'; got {phase!r}")
    for name, value, low in (("batch_size", batch_size, 1), ("prompt_length", prompt_length, 1),
                             ("steps", steps, 1), ("warmup", warmup, 0)):
        check_int(name, value, low)
    config = model.config
    decode_positions = (warmup + steps) if phase == "decode" else 0
    if prompt_length + decode_positions > config.block_size:
        raise ValueError(f"prompt_length {prompt_length} + warmup {warmup} + steps {steps} "
                         f"exceeds block_size={config.block_size}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (batch_size, prompt_length + decode_positions),
                           generator=gen).to(device)
    measured = 0.0
    with inference_mode(model, dropless=dropless, backend=backend):
        used_backend = next((m.backend for m in model.modules() if isinstance(m, MoE)),
                            backend or "dense")
        profiler = LatencyProfiler(model)

        def timed(fn) -> float:
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            return time.perf_counter() - start

        if phase == "prefill":
            for _ in range(warmup):
                model(tokens)
            with profiler:
                for _ in range(steps):
                    measured += timed(lambda: model(tokens))
            return profiler.breakdown(measured, batch_size, used_backend, "prefill",
                                      use_cache, prompt_length)

        cache = KVCache(config, batch_size, prompt_length + decode_positions, device=device,
                        dtype=dtype) if use_cache else None
        model(tokens[:, :prompt_length], cache=cache)  # prefill, not profiled

        def step(position: int) -> None:
            if cache is not None:
                model(tokens[:, position - 1:position], cache=cache)
            else:
                model(tokens[:, :position])

        position = prompt_length + 1
        for _ in range(warmup):
            step(position)
            position += 1
        with profiler:
            for _ in range(steps):
                measured += timed(lambda p=position: step(p))
                position += 1
    return profiler.breakdown(measured, batch_size, used_backend, "decode", use_cache,
                              prompt_length + warmup + steps // 2)


def decode_sweep(model: GPT, backends: Sequence[str] = ("einsum", "index"),
                 batch_sizes: Sequence[int] = (1, 8), use_cache: bool = True,
                 **kwargs) -> list[LatencyBreakdown]:
    """`decode_latency` for every (backend, batch size): the data of a LatencyView."""
    return [decode_latency(model, batch_size=b, backend=backend, use_cache=use_cache, **kwargs)
            for backend in backends for b in batch_sizes]
