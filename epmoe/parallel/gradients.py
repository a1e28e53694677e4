"""Gradient reduction rules under expert parallelism, and the one global gradient norm.

Each rank's loss is the mean over its own tokens; the global loss is their mean over the
`world` ranks. So after backward:
- non-expert (replicated) gradients: sum over all ranks / world;
- expert gradients already hold every EP-group rank's contribution (the all-to-all
  backward brought them home): sum over the expert-data-parallel group (the replicas) / world.
The global norm counts every parameter once: the replicated part once, each expert once
(summed over the EP group, not over replicas).
"""

from __future__ import annotations

import torch
from torch import nn

from epmoe.comm.parallel_dims import ParallelDims
from epmoe.comm.process import all_reduce_sum_


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(replicated, expert) parameters; expert ones are the stacked `*_EDF`/`*_EFD` weights."""
    replicated, expert = [], []
    for name, p in model.named_parameters():
        (expert if ".experts.w_" in f".{name}" else replicated).append(p)
    return replicated, expert


def reduce_gradients(model: nn.Module, dims: ParallelDims) -> None:
    replicated, expert = split_params(model)
    for params, group in ((replicated, None), (expert, dims.expert_dp_group)):
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            all_reduce_sum_(p.grad, group).div_(dims.world)


def clip_global_norm_(
    model: nn.Module, dims: ParallelDims, max_norm: float, row_weights: dict[nn.Parameter, torch.Tensor] | None = None
) -> float:
    """Clip all gradients to one global norm (inf = only measure); returns the norm.
    row_weights: per-row weights of stacked expert weights holding replicas (replicas.py)."""
    replicated, expert = split_params(model)
    row_weights = row_weights or {}
    sq = torch.zeros(2, dtype=torch.float64)
    for i, params in enumerate((replicated, expert)):
        for p in params:
            if p.grad is None:
                continue
            sq_rows = p.grad.detach().double().square()
            if p in row_weights:  # [L, ...] rows of replicated experts count 1 / replicas each
                sq_rows = sq_rows.flatten(1).sum(1) * row_weights[p].to(sq_rows.device)
            sq[i] += sq_rows.sum().cpu()
    all_reduce_sum_(sq[1:], dims.ep_group)  # every expert once: across the EP group only
    total = sq.sum().sqrt().item()
    if total > max_norm:
        scale = max_norm / (total + 1e-6)
        for p in replicated + expert:
            if p.grad is not None:
                p.grad.mul_(scale)
    return total
