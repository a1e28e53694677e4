"""Materialise a model that was built on the `meta` device and parallelised: each rank allocates
and initialises only what it holds (its experts' rows; under FSDP2 its shards of every weight).

1. storage for this rank's tensors (`to_empty`, ties kept: epmoe/model/init.py);
2. per tensor, its initial value (InitPlan: a pure function of seed, name and expert id, the same
   values in every layout), drawn only for this rank's experts, and for a tensor FSDP2 shards
   whole then cut to this rank's shard (NOTE: the largest such tensor, typically the embedding,
   is drawn whole, one at a time: the peak is one tensor, not the model).
`set_full` is also how a Hugging Face import writes a tensor it read whole into a sharded one.
`parallelize.allocate_parallel` is step 1 alone, for a start that reads every tensor from files
(train.init_from).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from epmoe.model.init import InitPlan, to_empty
from epmoe.model.moe import expert_weight_names, named_moe_layers


def is_sharded(t: torch.Tensor) -> bool:
    """Whether `t` is this rank's shard of a larger tensor (FSDP2's DTensor) rather than the tensor."""
    # DTensor is torch's type, not ours: asking it is the one way to tell a shard from a tensor.
    # NOTE: until FSDP2 imports torch.distributed.tensor (~0.8 s) no tensor can be a DTensor, so
    # a run without FSDP does not import it here either
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def cut_like(full: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`full` cut as `t` is: a DTensor of `t`'s mesh and placements holding this rank's shard
    (no communication: every rank has `full`), or `full` itself where `t` is a plain tensor."""
    if not is_sharded(t):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(t.device), t.device_mesh, t.placements, src_data_rank=None)


@torch.no_grad()
def set_full(t: torch.Tensor, full: torch.Tensor) -> None:
    """Set `t` (a plain tensor, or a DTensor shard of it) to the whole value `full` (no communication)."""
    if is_sharded(t):
        t.to_local().copy_(cut_like(full, t).to_local())
    else:
        t.copy_(full)


@torch.no_grad()
def materialize(model: nn.Module, plan: InitPlan, expert_ids: dict[str, list[int]], device: torch.device) -> None:
    """Allocate and initialise this rank's part of `model` on `device` (see the module docstring).
    expert_ids: {MoE layer name: the global expert id of each local row} (Parallel.local_expert_ids)."""
    to_empty(model, device)
    experts, layers = expert_weight_names(model), [name for name, _ in named_moe_layers(model)]
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        ids = expert_ids[layers[experts[name][0]]] if name in experts else None
        set_full(t, plan.value(name, tuple(t.shape), t.dtype, ids))  # a DTensor's shape is the whole one
