"""How a step's gradients become an update: the native engine, and the interface that the
DeepSpeed engine (deepspeed_engine.py, train.engine=deepspeed) provides as well.

One optimizer step, as `train_step` drives an engine:
1. per micro-batch: `forward(x_BS)`, then `backward(loss / grad_accum, last)`;
2. `prepare()`: gradients reduced over the ranks and clipped to one global norm; returns that
   norm, or None where the engine learns it only while updating (DeepSpeed's ZeRO);
3. `update()`: the optimizer step; returns (applied, gradient norm). An engine may discard a
   non-finite step itself (ZeRO does): applied is then False and nothing changed.
   Or `skip()`: drop the gradients, no update; returns the norm, where known.
Checkpoints read and write `portable()`: the optimizer and LR schedule laid out as the native
engine lays them out, whatever the engine, so a run can switch engine on resume.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Protocol

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from epmoe.config import TrainConfig
from epmoe.model.transformer import LMOutput, Transformer
from epmoe.parallel.parallelize import Parallel


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and stacked expert weights), none on norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    return LambdaLR(optimizer, lambda s: lr_factor(s, cfg))


def max_grad_norm(cfg: TrainConfig) -> float:
    """The norm gradients are clipped to (train.grad_clip; 0 = off: only measured)."""
    return cfg.grad_clip if cfg.grad_clip > 0 else float("inf")


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


class Engine(Protocol):
    model: Transformer

    @property
    def lr(self) -> float: ...
    def forward(self, x_BS: torch.Tensor, doc_ids_BS: torch.Tensor | None = None) -> LMOutput: ...
    def backward(self, loss: torch.Tensor, last: bool) -> None: ...
    def prepare(self) -> float | None: ...
    def update(self) -> tuple[bool, float]: ...
    def skip(self) -> float | None: ...
    def schedule_step(self) -> None: ...
    def portable(self) -> tuple[torch.optim.Optimizer, LRScheduler]: ...
    def load_portable(self, optimizer: torch.optim.Optimizer, scheduler: LRScheduler) -> None: ...


class NativeEngine:
    """Our reduction rules (parallel/gradients.py), one global gradient norm, torch AdamW."""

    def __init__(self, model: Transformer, cfg: TrainConfig, par: Parallel, device: torch.device) -> None:
        self.model, self.cfg, self.par, self.device = model, cfg, par, device
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_schedule(self.optimizer, cfg)
        self.reducer = par.gradient_reducer(model)  # sums the replicated gradients during the last backward
        self._norm = math.nan

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def forward(self, x_BS: torch.Tensor, doc_ids_BS: torch.Tensor | None = None) -> LMOutput:
        with autocast(self.device, self.cfg.precision):
            return self.model(x_BS, doc_ids_BS=doc_ids_BS)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        if last and self.reducer is not None:
            self.reducer.arm()
        self.par.gradient_sync(self.model, last)
        loss.backward()

    def prepare(self) -> float:
        self._norm = self.par.reduce_and_clip(self.model, max_grad_norm(self.cfg), self.reducer)
        return self._norm

    def update(self) -> tuple[bool, float]:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True, self._norm

    def skip(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        return self._norm

    def schedule_step(self) -> None:
        self.scheduler.step()

    def portable(self) -> tuple[torch.optim.Optimizer, LRScheduler]:
        return self.optimizer, self.scheduler  # already the native layout

    def load_portable(self, optimizer: torch.optim.Optimizer, scheduler: LRScheduler) -> None:
        pass  # checkpoint_state.restore loaded into our own optimizer and schedule
