"""A tiny model saved as an epmoe checkpoint by one process, nothing trained: what the command
lines over checkpoints (generate, eval) are tested on."""

from __future__ import annotations

from pathlib import Path

import torch

from epmoe.config import Config
from epmoe.model.transformer import Transformer
from epmoe.parallel.parallelize import Parallel
from epmoe.train import checkpoint_state
from epmoe.train.engine import build_optimizer, build_schedule


def random_model(cfg: Config, seed: int = 0) -> Transformer:
    """cfg's model with every weight drawn from N(0, 0.3^2) (norm weights around 1), in eval
    mode: far from the init's near-uniform logits, so greedy choices are clear-cut."""
    torch.manual_seed(seed)
    model = Transformer(cfg.model, cfg.router)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def save_checkpoint(run_dir: Path, cfg: Config, model: Transformer) -> Path:
    """`model` as the step-0 checkpoint of `run_dir` (as `python -m epmoe.hf import` writes one)."""
    optimizer = build_optimizer(model, cfg.train)
    par = Parallel.single(cfg.model.num_experts)
    return checkpoint_state.save(run_dir, 0, model=model, optimizer=optimizer,
                                 scheduler=build_schedule(optimizer, cfg.train), cfg=cfg, rank=0, dims=par.dims,
                                 placement=None)  # fmt: skip
