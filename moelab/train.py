"""Trainer: AdamW with expert and shared parameter groups, clipping, warmup + cosine LR, a
per-step metrics history that views subscribe to, and bit-identical checkpoint resume."""

from __future__ import annotations

import math
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import Config, documented, option
from .data import Corpus
from .experts import expert_banks

LossFn = Callable[[nn.Module, Tensor, Tensor, int], tuple[Tensor, object, dict]]


@documented
@dataclass(frozen=True)
class TrainConfig(Config):
    """Defaults follow the paper's scripts where they carry over to a laptop: AdamW β=(0.9,
    0.95), weight decay 0.1, gradient clipping at 1.0, warmup then cosine decay to lr/10."""

    steps: int = option(200, "optimizer steps of a full `train()`", low=1)
    batch_size: int = option(16, "sequences per step", low=1)
    lr: float = option(1e-3, "peak learning rate", above=0)
    min_lr: float | None = option(None, "the cosine's final learning rate; None = lr / 10",
                                  kind="float", low=0)
    warmup_steps: int = option(20, "linear warmup steps", low=0)
    weight_decay: float = option(0.1, "AdamW weight decay (not on biases and norms)", low=0)
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas", kind="any")
    grad_clip: float = option(1.0, "clip the global gradient norm at this; 0 = no clipping",
                              low=0)
    eval_every: int = option(50, "validate every this many steps; 0 = never", low=0)
    eval_batches: int = option(4, "validation batches per evaluation", low=1)
    seed: int = option(0, "seed of the batches (and of the validation batches, seed + 1)",
                       low=0)
    progress: bool = option(True, "show a progress bar (tqdm, from the lab extra)")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: expert vs shared parameters (expert parallelism reduces their gradients over
    different groups), each with and without weight decay. Experts are found by module type,
    never by a substring of a parameter's name."""
    expert_ids = {id(p) for _, bank in expert_banks(model) for p in bank.parameters()}
    norm_ids = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm)
                for p in m.parameters()}
    groups = {(moe, decay): [] for moe in (False, True) for decay in (True, False)}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_bias = name.endswith(("bias", ".b_in", ".b_out"))
        decay = not (is_bias or id(param) in norm_ids)
        groups[(id(param) in expert_ids, decay)].append(param)
    return [
        {"name": ("expert" if moe else "shared") + ("" if decay else "_no_decay"),
         "moe": moe, "params": params, "weight_decay": weight_decay if decay else 0.0}
        for (moe, decay), params in groups.items() if params
    ]


def lm_loss_fn(model: nn.Module, x: Tensor, y: Tensor, step: int):
    """The default objective: the model's own loss (LM + weighted MoE losses)."""
    output = model(x, y)
    return output.loss, output, {}


class Trainer:
    """Trains a GPT on a Corpus; ``history`` holds one record (a dict) per step.

    ``subscribe(fn)`` registers ``fn(record)``, called after every step (views use it to draw the
    load live). ``loss_fn(model, x, y, step) -> (loss, output, extras)`` replaces the objective
    (the Mixture-of-Students KD loss plugs in here); extras land in the record.
    """

    def __init__(self, model: nn.Module, train_data: Corpus, val_data: Corpus | None = None,
                 config: TrainConfig | None = None, loss_fn: LossFn | None = None) -> None:
        self.model, self.train_data, self.val_data = model, train_data, val_data
        self.config = config or TrainConfig()
        self.loss_fn = loss_fn or lm_loss_fn
        self.block_size = model.config.block_size
        self.optimizer = torch.optim.AdamW(param_groups(model, self.config.weight_decay),
                                           lr=self.config.lr, betas=self.config.betas)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.step_count = 0
        self.history: list[dict] = []
        self._subscribers: list[Callable[[dict], None]] = []
        self._end_callbacks: list[Callable[[], None]] = []
        train_data._starts(1, self.block_size, None)  # fails early if the corpus is too small
        if val_data is not None:
            val_data._starts(1, self.block_size, None)

    def subscribe(self, fn: Callable[[dict], None],
                  on_end: Callable[[], None] | None = None) -> Callable[[dict], None]:
        """Call ``fn(record)`` after every step, and ``on_end()`` when `train` returns (a view
        that throttles its redraws uses it to draw the last steps)."""
        self._subscribers.append(fn)
        if on_end is not None:
            self._end_callbacks.append(on_end)
        return fn

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine decay from lr to min_lr over the remaining steps."""
        cfg = self.config
        min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))

    def step(self) -> dict:
        """One optimizer step; returns (and records) its metrics."""
        cfg, model = self.config, self.model
        model.train()
        start = time.perf_counter()
        x, y = self.train_data.batch(cfg.batch_size, self.block_size, self.generator)
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, output, extras = self.loss_fn(model, x, y, self.step_count)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # every parameter counted once in the norm (tied embeddings are one parameter)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                   cfg.grad_clip or float("inf"))
        self.optimizer.step()
        elapsed = time.perf_counter() - start
        self.step_count += 1
        moe = [r for r in output.routings if r is not None]
        record = {
            "step": self.step_count, "lr": lr, "loss": loss.item(),
            "lm_loss": output.lm_loss.item(), "aux_loss": output.aux_loss.item(),
            "z_loss": output.z_loss.item(), "grad_norm": float(grad_norm),
            "tokens_per_s": x.numel() / elapsed,
            "counts": [r.counts.tolist() for r in moe],
            "load": [r.load.tolist() for r in moe],
            "capacity": [r.capacity for r in moe],
            "drop_fraction": [r.drop_fraction for r in moe],
            "val_loss": None, **extras,
        }
        if cfg.eval_every and self.val_data is not None and (
                self.step_count % cfg.eval_every == 0 or self.step_count == cfg.steps):
            record["val_loss"] = self.evaluate()
        self.history.append(record)
        for fn in self._subscribers:
            fn(record)
        return record

    @torch.no_grad()
    def evaluate(self, data: Corpus | None = None) -> float:
        """Mean LM loss over eval_batches fixed validation batches (the same ones every time)."""
        data = data or self.val_data
        if data is None:
            raise ValueError("no validation data: pass val_data to Trainer or data here")
        was_training = self.model.training
        self.model.eval()
        generator = torch.Generator().manual_seed(self.config.seed + 1)
        losses = []
        for _ in range(self.config.eval_batches):
            x, y = data.batch(self.config.batch_size, self.block_size, generator)
            losses.append(self.model(x, y).lm_loss.item())
        self.model.train(was_training)
        return sum(losses) / len(losses)

    def train(self, steps: int | None = None) -> list[dict]:
        """Run until ``steps`` more steps (default: up to config.steps in all)."""
        target = self.step_count + steps if steps is not None else self.config.steps
        bar = None
        if self.config.progress:
            try:
                from tqdm.auto import tqdm
                bar = tqdm(total=target - self.step_count, desc="training", leave=False)
            except ImportError:  # tqdm is in the lab extra; training works without it
                bar = None
        while self.step_count < target:
            record = self.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
        if bar is not None:
            bar.close()
        for on_end in self._end_callbacks:
            on_end()
        return self.history

    # ------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "step": self.step_count, "history": self.history,
            "config": self.config.to_dict(), "model_config": self.model.config.to_dict(),
            "rng": {"torch": torch.get_rng_state(), "data": self.generator.get_state()},
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), path)
        return path

    def load(self, path: str | Path) -> None:
        """Restore model, optimizer, step, history and every RNG: the run continues exactly as
        if it had never stopped."""
        try:
            state = torch.load(path, weights_only=False)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
            raise ValueError(f"could not read the checkpoint {path}: {error}. The file may be "
                             "truncated (a save that did not finish) or not a moelab Trainer "
                             "checkpoint") from None
        if not isinstance(state, dict) or not {"model", "optimizer", "model_config"} <= set(state):
            raise ValueError(f"{path} is not a moelab Trainer checkpoint (Trainer.save writes "
                             "'model', 'optimizer', 'model_config', ...)")
        if type(self.model.config).from_dict(state["model_config"]) != self.model.config:
            raise ValueError("checkpoint was saved from a different model config; build the "
                             "model from the checkpoint's 'model_config'")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = state["step"]
        self.history = list(state["history"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["data"])
