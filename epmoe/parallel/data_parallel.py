"""Apply data parallelism's one forward-time rule to a built model from outside.

Gradients are reduced after backward (gradients.py). The forward pass needs one thing
too: the batch-level balancing loss (Switch/GShard) must see the routing fractions of the
*global* batch, or a world-N run would optimise a different loss than one process on the
same global batch. Each router gets a `rank_mean` that averages its per-rank fractions
over all ranks (a tiny all-reduce of E values per MoE layer call, only with aux_loss=batch).
"""

from __future__ import annotations

import torch
from torch import nn

from epmoe.comm.parallel_dims import ParallelDims
from epmoe.comm.process import all_reduce_sum_
from epmoe.model.moe import moe_layers


def apply_data_parallel(model: nn.Module, dims: ParallelDims) -> None:
    """Make every router's batch statistics global over the `dims.world` ranks."""
    if dims.world == 1:
        return

    def rank_mean(stat: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum_(stat.detach().clone()) / dims.world

    for moe in moe_layers(model):
        if moe.router.cfg.aux_loss == "batch":
            moe.router.rank_mean = rank_mean
