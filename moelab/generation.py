"""Generation with a KV cache, and the MoE inference path it runs on.

- `generate(model, prompt, max_new_tokens)`: greedy / temperature / top-k sampling with a KV cache
  allocated once for the whole generation; prefill (the prompt, one forward) and decode (one token
  per step) are timed separately. Prompts of different lengths share one batch, padded on the
  left (see below); ``cuda_graph=True`` replays the decode step from a captured CUDA graph
  (`moelab.cuda_graph`).
- `inference_mode(model)`: the paper's MoE inference path (§5): eval routing (no noise, no RTS,
  no sampled second expert), the mapping-table dispatch (backend "index") and, beyond the paper,
  dropless routing (every route kept; FastGen / DeepSpeed inference v2 serve this way).

Why generation is dropless by default. With capacity C = max(⌈S/E · cf · k⌉, min_capacity), the
routes an expert keeps depend on *which other tokens are in the same forward*: S is B tokens in a
decode step but B·T when the whole prefix is recomputed, so C differs, and a token competes for
its expert's C slots with the other sequences' current tokens in one case and with every earlier
token of every sequence in the other. A route kept in one is dropped in the other, and a cached
decode no longer equals running the model on the prefix. Dropless, each token's output depends
on that token alone, so both agree (tested). ``dropless=False`` keeps the model's capacity.

Prompts of different lengths. Every prompt is padded on the left to the longest (pad id 0), so
all sequences write their new tokens at the same cache slot. Sequence b's pads fill slots
[0, pad_b); its real tokens take positions 0, 1, ... from slot pad_b on (the learned position
embeddings never see the padding), and a key mask keeps every query off the pad slots, in the
prefill and in every decode step. Dropless, a pad token changes no real token's routing either, so
each sequence generates exactly what it would alone (tested). With capacity (``dropless=False``)
or expert-choice routing, pads would compete with real tokens for expert slots: refused.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import check_int, check_number
from .cuda_graph import capture_decode, check_cuda_graph, synchronize
from .dispatch import check_backend
from .layer import MoE
from .model import GPT, KVCache

PAD_ID = 0  # the token id left padding writes (masked out; any id would do)

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
    saved = [(layer.backend, layer.router.config) for layer in layers]
    model.eval()
    try:
        for layer in layers:
            if backend is not None and backend != layer.backend:
                layer.set_backend(backend)
            if dropless and layer.router.config.drop_tokens:
                layer.router.config = layer.router.config.replace(drop_tokens=False)
        yield model
    finally:
        for layer, (layer_backend, router_config) in zip(layers, saved, strict=True):
            if layer.backend != layer_backend:
                layer.set_backend(layer_backend)
            layer.router.config = router_config
        model.train(was_training)


def _as_batch(prompt, device: torch.device) -> tuple[Tensor, list[int]]:
    """A prompt as [B, T] long, left-padded with PAD_ID, and each sequence's real length.

    Accepts a [T] or [B, T] tensor, a list of ids, or a list of sequences (lists or 1-D tensors,
    of any lengths >= 1; shorter ones are padded on the left to the longest)."""
    lengths = None
    if isinstance(prompt, Tensor):
        idx = prompt
    elif isinstance(prompt, Sequence) and prompt and all(
            isinstance(p, (Sequence, Tensor)) and not isinstance(p, str) for p in prompt):
        rows = [torch.as_tensor(p) for p in prompt]
        if any(row.dim() != 1 or row.numel() < 1 for row in rows):
            raise ValueError(f"each prompt in a list must be a non-empty sequence of token ids; "
                             f"got shapes {[tuple(row.shape) for row in rows]}")
        longest = max(row.numel() for row in rows)
        idx = torch.stack([F.pad(row, (longest - row.numel(), 0), value=PAD_ID) for row in rows])
        lengths = [row.numel() for row in rows]
    elif isinstance(prompt, Sequence) and not isinstance(prompt, str):
        idx = torch.as_tensor(list(prompt))
    else:
        raise ValueError(f"prompt must be token ids (a tensor, a list of ints or a list of "
                         f"lists); got {type(prompt).__name__}")
    if idx.dim() == 1:
        idx = idx[None, :]
    if idx.dim() != 2 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"prompt must be integer token ids of shape [T] or [B, T]; got "
                         f"dtype {idx.dtype} and shape {tuple(idx.shape)}")
    if idx.shape[0] < 1 or idx.shape[1] < 1:
        raise ValueError(f"prompt must hold at least one token; got shape {tuple(idx.shape)}")
    if lengths is None:
        lengths = [idx.shape[1]] * idx.shape[0]
    return idx.to(device=device, dtype=torch.long), lengths


def _check_ragged(model: GPT, lengths: list[int], dropless: bool) -> None:
    """Left padding is exact only if no pad token can change a real token's routing."""
    if len(set(lengths)) == 1:
        return
    if not dropless:
        raise ValueError(
            f"prompts of different lengths {lengths} need dropless=True (the default): with "
            "expert capacity (dropless=False) the pad tokens would compete with real tokens "
            "for expert slots and change their outputs. Use dropless routing, or call "
            "generate() for each prompt (or each group of equal-length prompts) separately")
    if any(m.router.config.choice == "expert" for m in model.modules()
           if isinstance(m, MoE)):
        raise ValueError(
            f"prompts of different lengths {lengths} cannot share a batch in a model with "
            "expert-choice routing: each expert picks its top tokens among all tokens of the "
            "forward, pads included. Call generate() for each prompt separately")


def _check_sampling(max_new_tokens, temperature, top_k, greedy) -> None:
    check_int("max_new_tokens", max_new_tokens, 0)
    if not greedy:
        try:
            check_number("temperature", temperature, above=0)
        except ValueError as error:
            raise ValueError(f"{error}. For the most likely token at every step use "
                             "greedy=True") from None
    if top_k is not None:
        check_int("top_k (None: the whole vocabulary)", top_k)


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
    """What `generate` returns. ``tokens`` [B, T + N] holds the prompts and the N new tokens.

    T (``prompt_length``) is the longest prompt: shorter prompts are padded on the left with
    PAD_ID, so every sequence's new tokens start at column T. ``prompt_lengths[b]`` is sequence
    b's real prompt length; `sequences()` gives each sequence without its pads.
    """

    tokens: Tensor
    prompt_length: int
    prefill_s: float  # the forward over the prompt (and the first token's sampling)
    decode_s: float  # the N - 1 one-token steps after it
    logits: Tensor | None = None  # [B, N, V]: the logits each new token was drawn from
    prompt_lengths: list[int] | None = None  # real prompt length per sequence (None: all T)
    capture_s: float = 0.0  # cuda_graph=True: warm-up and capture of the step, not in decode_s

    def __post_init__(self) -> None:
        if self.prompt_lengths is None:
            self.prompt_lengths = [self.prompt_length] * self.tokens.shape[0]

    @property
    def left_pad(self) -> list[int]:
        """Pad tokens at the start of each sequence."""
        return [self.prompt_length - n for n in self.prompt_lengths]

    def sequences(self) -> list[Tensor]:
        """Each sequence's prompt and new tokens, without its left padding: B 1-D tensors."""
        return [row[pad:] for row, pad in zip(self.tokens, self.left_pad, strict=True)]

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
             backend: str | None = "index", return_logits: bool = False,
             cuda_graph: bool = False) -> Generation:
    """Continue ``prompt`` by ``max_new_tokens`` tokens.

    Args:
        prompt: token ids, [T] or [B, T] (a tensor, a list, or a list of sequences). Prompts
            of different lengths are padded on the left to the longest and masked out, with or
            without the cache: each sequence generates what it would alone (needs dropless
            routing and token-choice MoE layers; see the module docstring).
            ``Generation.prompt_lengths`` / ``sequences()`` tell the pads apart.
        temperature, top_k, greedy: sampling; ``greedy=True`` takes the argmax.
        use_cache: keep every layer's keys and values (one KVCache, allocated once) and feed one
            token per step; False recomputes the whole prefix each step (the reference).
        generator: a torch.Generator for the draws, for reproducible samples.
        dropless, backend: the MoE inference path, see `inference_mode`.
        return_logits: keep the logits of every step in ``Generation.logits``.
        cuda_graph: capture the decode step once in a CUDA graph and replay it for every step
            (CUDA only; needs use_cache=True and backend "index"). While captured, the MoE
            layers route in the capacity layout at a capacity that drops nothing
            (`static_routing`), so the tokens equal the eager cached decode's. The prefill
            runs eagerly; the capture's time is ``Generation.capture_s``, not ``decode_s``.

    The longest prompt plus the new tokens must fit in the model's block_size.
    """
    config = model.config
    _check_sampling(max_new_tokens, temperature, top_k, greedy)
    device = next(model.parameters()).device
    check_cuda_graph(model, device, use_cache, backend, cuda_graph)
    idx, prompt_lengths = _as_batch(prompt, device)
    _check_ragged(model, prompt_lengths, dropless)
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
                          if return_logits else None, prompt_lengths)
    dtype = next(model.parameters()).dtype
    step_logits = torch.empty(batch, max_new_tokens, config.vocab_size, device=device,
                              dtype=dtype) if return_logits else None
    pads = [prompt_length - n for n in prompt_lengths]
    left_pad = torch.tensor(pads, device=device) if any(pads) else None  # [B]
    # Slots fed to the model: the prompt, then every new token but the last.
    cache = KVCache(config, batch, total - 1 if max_new_tokens > 1 else prompt_length,
                    device=device, dtype=dtype,
                    left_pad=pads if any(pads) else None) if use_cache else None

    def forward(ids: Tensor) -> Tensor:  # [B, t] -> [B, V], eagerly
        if cache is not None:
            return model(ids, cache=cache).logits[:, -1]
        return model(ids, left_pad=left_pad).logits[:, -1]

    def sample(logits: Tensor, step: int) -> None:
        if step_logits is not None:
            step_logits[:, step] = logits
        tokens[:, prompt_length + step] = next_token(logits, temperature, top_k, greedy,
                                                     generator)

    graph, capture_s = None, 0.0
    with inference_mode(model, dropless=dropless, backend=backend):
        synchronize(device)
        start = time.perf_counter()
        sample(forward(idx), 0)  # prefill
        synchronize(device)
        prefill_s = time.perf_counter() - start
        if cuda_graph and max_new_tokens > 1:
            graph = capture_decode(model, cache, tokens[:, prompt_length:prompt_length + 1],
                             prompt_length, dropless)
            synchronize(device)
            capture_s = time.perf_counter() - start - prefill_s
        for step in range(1, max_new_tokens):  # decode
            position = prompt_length + step
            if graph is not None:
                logits = graph(tokens[:, position - 1:position], position - 1)
            elif cache is not None:
                logits = forward(tokens[:, position - 1:position])
            else:
                logits = forward(tokens[:, :position])
            sample(logits, step)
        synchronize(device)
        decode_s = time.perf_counter() - start - prefill_s - capture_s
    return Generation(tokens, prompt_length, prefill_s, decode_s, step_logits, prompt_lengths,
                      capture_s)
