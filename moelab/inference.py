"""Generation with a KV cache, the MoE inference path, and where the time of a forward goes.

- `generate(model, prompt, max_new_tokens)`: greedy / temperature / top-k sampling with a KV cache
  allocated once for the whole generation; prefill (the prompt, one forward) and decode (one token
  per step) are timed separately.
- `inference_mode(model)`: the paper's MoE inference path (§5): eval routing (no noise, no RTS,
  no sampled second expert), the mapping-table dispatch (backend "index") and, beyond the paper,
  dropless routing (every route kept; FastGen / DeepSpeed inference v2 serve this way).
- `LatencyProfiler` / `decode_latency`: a per-layer, per-component latency breakdown (attention,
  gate, dispatch, exchange, expert FFN, combine, dense FFN, embeddings + head) measured with
  module hooks and ``time.perf_counter`` (``torch.cuda.synchronize`` first on a GPU).

Why generation is dropless by default. With capacity C = max(⌈S/E · cf · k⌉, min_capacity), the
routes an expert keeps depend on *which other tokens are in the same forward*: S is B tokens in a
decode step but B·T when the whole prefix is recomputed, so C differs, and a token competes for
its expert's C slots with the other sequences' current tokens in one case and with every earlier
token of every sequence in the other. A route kept in one is dropped in the other, and a cached
decode no longer equals running the model on the prefix. Dropless, each token's output depends
on that token alone, so both agree (tested). ``dropless=False`` keeps the model's capacity.

CUDA graphs for decode are not used: dropless routing has data-dependent shapes (each expert's
load), which a captured graph cannot replay.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import check_backend
from .layer import MLP, MoE
from .model import GPT, KVCache

# ------------------------------------------------------------------------ the inference path


@contextmanager
def inference_mode(model: nn.Module, dropless: bool = True,
                   backend: str | None = "index") -> Iterator[nn.Module]:
    """Run ``model`` the way it is served, and put it back as it was afterwards.

    eval() (routing without noise, RTS or sampling), every MoE layer's ``backend`` ("index", the
    mapping table, by default; None keeps each layer's own) and, with ``dropless=True``, routing
    without capacity (see the module docstring for why generation needs it).
    """
    if backend is not None:
        check_backend(backend)
    was_training = model.training
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    saved = [(layer.backend, layer.router.drop_tokens) for layer in layers]
    model.eval()
    try:
        for layer in layers:
            if backend is not None:
                layer.set_backend(backend)
            if dropless:
                layer.router.drop_tokens = False
        yield model
    finally:
        for layer, (layer_backend, drop_tokens) in zip(layers, saved, strict=True):
            layer.backend = layer_backend
            layer.router.drop_tokens = drop_tokens
        model.train(was_training)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _as_batch(prompt, device: torch.device) -> Tensor:
    """A prompt as [B, T] long: a [T] or [B, T] tensor, a list of ids, or a list of sequences."""
    if isinstance(prompt, Tensor):
        idx = prompt
    elif isinstance(prompt, Sequence) and prompt and all(
            isinstance(p, (Sequence, Tensor)) and not isinstance(p, str) for p in prompt):
        lengths = [len(p) for p in prompt]
        if len(set(lengths)) > 1:
            raise ValueError(
                f"prompts of different lengths {lengths}: generate() runs every sequence at the "
                "same positions (one KV cache, no padding mask); pad the prompts to one length "
                "or call generate() for each prompt separately")
        idx = torch.stack([torch.as_tensor(p) for p in prompt])
    elif isinstance(prompt, Sequence) and not isinstance(prompt, str):
        idx = torch.as_tensor(list(prompt))
    else:
        raise ValueError(f"prompt must be token ids (a tensor, a list of ints or a list of "
                         f"equal-length lists); got {type(prompt).__name__}")
    if idx.dim() == 1:
        idx = idx[None, :]
    if idx.dim() != 2 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"prompt must be integer token ids of shape [T] or [B, T]; got "
                         f"dtype {idx.dtype} and shape {tuple(idx.shape)}")
    if idx.shape[0] < 1 or idx.shape[1] < 1:
        raise ValueError(f"prompt must hold at least one token; got shape {tuple(idx.shape)}")
    return idx.to(device=device, dtype=torch.long)


def _check_sampling(max_new_tokens, temperature, top_k, greedy) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0; got {max_new_tokens!r}")
    if not greedy and not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                           and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}. For "
                         "the most likely token at every step use greedy=True")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        raise ValueError(f"top_k must be None (the whole vocabulary) or an integer >= 1; "
                         f"got {top_k!r}")


def next_token(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
               greedy: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """[B, V] logits -> [B] token ids: argmax, or a draw from softmax(logits / T) over the top-k."""
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@dataclass
class Generation:
    """What `generate` returns. ``tokens`` [B, T + N] holds the prompt and the N new tokens."""

    tokens: Tensor
    prompt_length: int
    prefill_s: float  # the forward over the prompt (and the first token's sampling)
    decode_s: float  # the N - 1 one-token steps after it
    logits: Tensor | None = None  # [B, N, V]: the logits each new token was drawn from

    @property
    def new_tokens(self) -> Tensor:
        return self.tokens[:, self.prompt_length:]

    @property
    def decode_steps(self) -> int:
        return max(self.new_tokens.shape[1] - 1, 0)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens the decode phase made per second, over the whole batch."""
        if not self.decode_steps or self.decode_s <= 0:
            return float("nan")
        return self.tokens.shape[0] * self.decode_steps / self.decode_s

    @property
    def decode_ms_per_token(self) -> float:
        """Latency of one decode step (one new token for every sequence)."""
        return 1e3 * self.decode_s / self.decode_steps if self.decode_steps else float("nan")


@torch.no_grad()
def generate(model: GPT, prompt, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, greedy: bool = False, use_cache: bool = True,
             generator: torch.Generator | None = None, dropless: bool = True,
             backend: str | None = "index", return_logits: bool = False) -> Generation:
    """Continue ``prompt`` by ``max_new_tokens`` tokens.

    Args:
        prompt: token ids, [T] or [B, T] (a tensor, a list, or a list of equal-length lists).
            Prompts of different lengths are refused: pad them or generate one at a time.
        temperature, top_k, greedy: sampling; ``greedy=True`` takes the argmax.
        use_cache: keep every layer's keys and values (one KVCache, allocated once) and feed one
            token per step; False recomputes the whole prefix each step (the reference).
        generator: a torch.Generator for the draws, for reproducible samples.
        dropless, backend: the MoE inference path, see `inference_mode`.
        return_logits: keep the logits of every step in ``Generation.logits``.

    The prompt plus the new tokens must fit in the model's block_size (its position embeddings).
    """
    config = model.config
    _check_sampling(max_new_tokens, temperature, top_k, greedy)
    device = next(model.parameters()).device
    idx = _as_batch(prompt, device)
    batch, prompt_length = idx.shape
    total = prompt_length + max_new_tokens
    if total > config.block_size:
        raise ValueError(
            f"prompt length {prompt_length} + max_new_tokens {max_new_tokens} = {total} exceeds "
            f"the model's block_size={config.block_size} (its learned positions); shorten the "
            f"prompt or ask for fewer tokens")
    if int(idx.max()) >= config.vocab_size or int(idx.min()) < 0:
        raise ValueError(f"prompt token ids must be in [0, vocab_size={config.vocab_size})")
    tokens = torch.empty(batch, total, dtype=torch.long, device=device)
    tokens[:, :prompt_length] = idx
    if max_new_tokens == 0:
        return Generation(tokens, prompt_length, 0.0, 0.0,
                          idx.new_zeros(batch, 0, config.vocab_size, dtype=torch.float)
                          if return_logits else None)
    dtype = next(model.parameters()).dtype
    step_logits = torch.empty(batch, max_new_tokens, config.vocab_size, device=device,
                              dtype=dtype) if return_logits else None
    # Positions fed to the model: the prompt, then every new token but the last.
    cache = KVCache(config, batch, total - 1 if max_new_tokens > 1 else prompt_length,
                    device=device, dtype=dtype) if use_cache else None

    def sample(logits: Tensor, step: int) -> None:
        if step_logits is not None:
            step_logits[:, step] = logits
        tokens[:, prompt_length + step] = next_token(logits, temperature, top_k, greedy,
                                                     generator)

    with inference_mode(model, dropless=dropless, backend=backend):
        _synchronize(device)
        start = time.perf_counter()
        sample(model(idx, cache=cache).logits[:, -1], 0)  # prefill
        _synchronize(device)
        prefill_s = time.perf_counter() - start
        for step in range(1, max_new_tokens):  # decode
            position = prompt_length + step
            if cache is not None:
                logits = model(tokens[:, position - 1:position], cache=cache).logits[:, -1]
            else:
                logits = model(tokens[:, :position]).logits[:, -1]
            sample(logits, step)
        _synchronize(device)
        decode_s = time.perf_counter() - start - prefill_s
    return Generation(tokens, prompt_length, prefill_s, decode_s, step_logits)


# ----------------------------------------------------------------------- latency breakdown

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
    the previous hook to the component that was running; the hooks sit on the blocks, the
    attention, the FFN or MoE layer, its router, experts and residual MLP, and the final
    LayerNorm. Dispatch and combine are plain functions: while profiling, ``moelab.layer``'s
    references to them are wrapped so that their ends are marked too (this is what separates the
    all-to-all of an expert-parallel layer from the dispatch and combine around it).
    """

    _active = False

    def __init__(self, model: GPT) -> None:
        if not isinstance(model, GPT):
            raise ValueError(f"LatencyProfiler takes a moelab GPT; got {type(model).__name__}")
        self.model = model
        self.device = next(model.parameters()).device
        self.num_layers = len(model.blocks)
        self._handles: list = []
        self._patched: list[tuple[object, str, object]] = []
        self.reset()

    def reset(self) -> None:
        self.seconds = {c: [0.0] * self.num_layers for c in COMPONENTS if c != "embed_head"}
        self.embed_head_s = 0.0
        self.calls = 0
        self._running = False
        self._label, self._layer, self._clock = "embed_head", -1, 0.0

    # ---------------------------------------------------------------------------- timeline
    def _now(self) -> float:
        _synchronize(self.device)
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

    def _after_experts(self) -> None:
        self._mark("exchange" if self._parallel[self._layer] else "combine")

    def __enter__(self) -> LatencyProfiler:
        if LatencyProfiler._active:
            raise RuntimeError("another LatencyProfiler is active; profile one model at a time")
        LatencyProfiler._active = True
        model = self.model
        self._parallel = [getattr(b.ffn, "parallel", None) is not None for b in model.blocks]
        self._handles.append(model.register_forward_pre_hook(self._start))
        self._handles.append(model.register_forward_hook(self._stop))
        for i, block in enumerate(model.blocks):
            self._hook(block, "attention", None, i)
            ffn = block.ffn
            if isinstance(ffn, MoE):
                fused = ffn.backend == "triton" and ffn.parallel is None
                self._hook(ffn, "gate", None, i)
                self._hook(ffn.router, None, "experts" if fused else "dispatch", i)
                self._hook(ffn.experts, "experts", None, i)
                self._handles.append(ffn.experts.register_forward_hook(
                    lambda *_: self._after_experts()))
                if ffn.residual:
                    self._hook(ffn.mlp, "dense_ffn", "combine", i)
            elif isinstance(ffn, MLP):
                self._hook(ffn, "dense_ffn", None, i)
        self._hook(model.ln_f, "embed_head", None)
        self._wrap_dispatch_and_combine()
        return self

    def _wrap_dispatch_and_combine(self) -> None:
        from . import layer as layer_module

        profiler = self
        original_dispatch = getattr(layer_module, "dispatch", None)
        original_combine = getattr(layer_module, "combine", None)
        if original_dispatch is not None:
            def dispatch(*args, **kwargs):
                out = original_dispatch(*args, **kwargs)
                # next: the all-to-all (expert parallel) or the experts' own padding (local)
                profiler._mark("exchange" if profiler._parallel[profiler._layer] else "dispatch")
                return out
            self._patched.append((layer_module, "dispatch", original_dispatch))
            layer_module.dispatch = dispatch
        if original_combine is not None:
            def combine(*args, **kwargs):
                profiler._mark("combine")
                return original_combine(*args, **kwargs)
            self._patched.append((layer_module, "combine", original_combine))
            layer_module.combine = combine

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, name, original in self._patched:
            setattr(module, name, original)
        self._patched.clear()
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
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
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
            _synchronize(device)
            start = time.perf_counter()
            fn()
            _synchronize(device)
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
