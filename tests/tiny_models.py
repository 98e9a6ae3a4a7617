"""Tiny GPTs and prompts shared by the generation, CUDA-graph and profiling tests."""

from __future__ import annotations

import torch

from moelab.model import GPT, GPTConfig

VOCAB = 64


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    options = dict(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, d_model=16, experts=4)
    options.update(overrides)
    model = GPT(GPTConfig.create(**options))
    # GPT-2 init leaves a tiny model's next-token distribution nearly flat; widen it so that
    # greedy choices are well separated.
    with torch.no_grad():
        model.wte.weight.mul_(20)
    return model


def prompts(batch: int = 2, length: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


MODELS = {
    "top1": dict(),
    "top2_residual": dict(k=2, residual=True, experts="2/4", n_layer=4),
    "dense": dict(experts=0),
    "swiglu": dict(activation="swiglu", k=2),
}

RAGGED = [[5, 6, 7, 8, 9, 10, 11], [1, 2], [3, 4, 12, 13]]  # prompts of different lengths
