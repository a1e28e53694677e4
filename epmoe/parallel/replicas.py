"""Replicated experts (placement=redundant) stay identical copies of one expert.

Shape key: L local slots of a MoE layer (replicas included), E experts, D width, F hidden.

A replica computes only the tokens sent to it, so after backward the replicas of expert e
hold different gradients. Summing them over the EP group (after the usual expert-data-parallel
reduction) gives every replica the gradient of the whole expert, so the identical optimizer
steps keep the copies identical. The global gradient norm counts each expert once: a row of
an expert with n replicas weighs 1/n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from epmoe.comm.parallel_dims import ParallelDims
from epmoe.comm.process import all_reduce_sum_
from epmoe.model.moe import moe_layers
from epmoe.placement.placement import Placement


@dataclass
class ReplicaRows:
    """One stacked expert weight of one MoE layer: which expert each local row is a copy of."""

    param: nn.Parameter  # [L, ...]
    expert_of_row_L: torch.Tensor
    weight_L: torch.Tensor  # 1 / replicas of that expert: its share in the global norm


def replica_rows(model: nn.Module, placement: Placement, ep_rank: int) -> list[ReplicaRows]:
    """The stacked expert weights of every MoE layer whose map has replicas."""
    rows = []
    layers = moe_layers(model)
    replicas_YE = placement.replica_count_YE
    for y, moe in enumerate(layers):
        if int(replicas_YE[y].max()) == 1:
            continue
        expert_of_row_L = placement.experts_on_rank(y, ep_rank)
        weight_L = 1.0 / replicas_YE[y][expert_of_row_L].double()
        for param in moe.experts.stacked_weights().values():
            rows.append(ReplicaRows(param, expert_of_row_L, weight_L))
    return rows


def reduce_replica_grads(rows: list[ReplicaRows], num_experts: int, dims: ParallelDims) -> None:
    """Give every replica the sum of its expert's replicas' gradients (over the EP group).

    NOTE: sums a [E, ...] buffer per weight: simple, and E / L times the bytes of the rows
    themselves; fine while replicated layers are few."""
    for r in rows:
        grad = r.param.grad if r.param.grad is not None else torch.zeros_like(r.param)
        per_expert = grad.new_zeros(num_experts, *grad.shape[1:])
        per_expert.index_add_(0, r.expert_of_row_L.to(grad.device), grad)
        all_reduce_sum_(per_expert, dims.ep_group)
        r.param.grad = per_expert[r.expert_of_row_L.to(grad.device)]


def norm_weights(rows: list[ReplicaRows]) -> dict[nn.Parameter, torch.Tensor]:
    """{param: weight_L} for `clip_global_norm_`: each expert counted once."""
    return {r.param: r.weight_L for r in rows}
