"""Apply expert parallelism to a single-device model from outside (the torchtitan way).

For every MoE layer y: keep only this rank's experts' weights (by layer y's placement map) and
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
from epmoe.placement.placement import Placement
from epmoe.placement.policies import PLACEMENTS

EXPERT_WEIGHTS = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def shard_experts(moe: MoE, local_ids_L: torch.Tensor) -> None:
    """Replace the stacked expert weights by the rows of `local_ids_L` (in that order)."""
    experts = moe.experts
    for name in EXPERT_WEIGHTS:
        full = getattr(experts, name)
        if full is not None:
            setattr(experts, name, nn.Parameter(full.detach()[local_ids_L].clone()))
    experts.num_experts = len(local_ids_L)


def static_placement(policy: str, num_experts: int, ep: int, num_layers: int) -> Placement:
    """The placement a run starts from: `policy` if it reads no routing statistics, else
    contiguous (load-following policies take over at the first re-placement)."""
    if policy not in ("contiguous", "round_robin"):
        policy = "contiguous"
    return PLACEMENTS[policy](num_experts, ep, num_experts // ep, None, num_layers)


def apply_expert_parallel(
    model: nn.Module,
    dims: ParallelDims,
    rank: int,
    placement: str | Placement = "contiguous",
    comm: Communicator | None = None,
    chunks: int | None = None,
    payload_dtype: torch.dtype | None = None,
) -> Placement:
    """Shard every MoE layer of `model` for `rank`; returns the placement installed.

    placement: a Placement (one map per MoE layer, no replicas) or a static policy name.
    comm spans the EP group; by default the torch.distributed EP group (dims.build_groups must
    have run). chunks: None installs the plain AllToAllDispatcher, n the PipelinedDispatcher.
    payload_dtype: the rows' dtype on the wire (None: as computed).
    """
    comm = comm or TorchCommunicator(dims.ep_group)
    layers = moe_layers(model)
    if isinstance(placement, str):
        placement = static_placement(placement, dims.num_experts, dims.ep, len(layers))
    for y, moe in enumerate(layers):
        shard_experts(moe, placement.experts_on_rank(y, dims.ep_rank(rank)))
        install_dispatcher(moe, placement.slot_of_expert_E(y), comm, chunks, payload_dtype)
    return placement


def install_dispatcher(
    moe: MoE,
    slot_of_expert_E: torch.Tensor,
    comm: Communicator,
    chunks: int | None,
    payload_dtype: torch.dtype | None = None,
) -> None:
    moe.dispatcher = (
        AllToAllDispatcher(slot_of_expert_E, comm, payload_dtype)
        if chunks is None
        else PipelinedDispatcher(slot_of_expert_E, comm, chunks, payload_dtype)
    )
