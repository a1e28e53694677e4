"""Apply expert parallelism to a single-device model from outside (the torchtitan way).

For every MoE layer: keep only this rank's experts' weights (by the placement map) and
install an all-to-all dispatcher (plain, or pipelined in chunks). The model's code does not change.
"""

from __future__ import annotations

import torch
from torch import nn

from epmoe.comm.communicator import Communicator, TorchCommunicator
from epmoe.comm.dispatch import AllToAllDispatcher
from epmoe.comm.parallel_dims import ParallelDims
from epmoe.comm.pipelined import PipelinedDispatcher
from epmoe.model.moe import MoE
from epmoe.placement.policies import POLICIES, experts_on_rank


def shard_experts(moe: MoE, local_ids_L: torch.Tensor) -> None:
    """Replace the stacked expert weights by the rows of `local_ids_L` (in that order)."""
    experts = moe.experts
    for name in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"):
        full = getattr(experts, name)
        if full is not None:
            setattr(experts, name, nn.Parameter(full.detach()[local_ids_L].clone()))
    experts.num_experts = len(local_ids_L)


def apply_expert_parallel(
    model: nn.Module,
    dims: ParallelDims,
    rank: int,
    placement: str = "contiguous",
    comm: Communicator | None = None,
    chunks: int | None = None,
) -> None:
    """Shard every MoE layer of `model` for `rank`. comm spans the EP group; by default the
    torch.distributed EP group (dims.build_groups must have run). chunks: None installs the
    plain AllToAllDispatcher, n the PipelinedDispatcher with n chunks."""
    comm = comm or TorchCommunicator(dims.ep_group)
    slot_of_expert_E = POLICIES[placement](dims.num_experts, dims.ep)
    local_ids_L = experts_on_rank(slot_of_expert_E, dims.ep, dims.ep_rank(rank))
    for module in model.modules():
        if isinstance(module, MoE):
            shard_experts(module, local_ids_L)
            module.dispatcher = (
                AllToAllDispatcher(slot_of_expert_E, comm)
                if chunks is None
                else PipelinedDispatcher(slot_of_expert_E, comm, chunks)
            )
