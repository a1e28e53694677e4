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
from epmoe.placement.placement import Placement, RoutingStats
from epmoe.placement.policies import PLACEMENTS
from epmoe.placement.slot_map import SlotMap

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


def static_placement(policy: str, num_experts: int, ep: int, num_layers: int, slots_per_rank: int = 0) -> Placement:
    """The placement a run starts from: `policy` if it reads no routing statistics; else, before
    any routing was seen, contiguous, or for `redundant` its layout under a uniform load (the
    load-following policies take over at the first re-placement).
    slots_per_rank: local slots (0 = num_experts / ep; more holds replicas, `redundant` only)."""
    slots = slots_per_rank or num_experts // ep
    if policy == "redundant":
        uniform = RoutingStats(torch.ones(num_layers, num_experts))
        return PLACEMENTS["redundant"](num_experts, ep, slots, uniform, num_layers)
    if policy not in ("contiguous", "round_robin"):
        policy = "contiguous"
    return PLACEMENTS[policy](num_experts, ep, slots, None, num_layers)


def apply_expert_parallel(
    model: nn.Module,
    dims: ParallelDims,
    rank: int,
    placement: str | Placement = "contiguous",
    comm: Communicator | None = None,
    chunks: int | None = None,
    payload_dtype: torch.dtype | None = None,
    slots_per_rank: int = 0,
) -> Placement:
    """Shard every MoE layer of `model` for `rank`; returns the placement installed.

    placement: a Placement (one map per MoE layer; replicas allowed) or a policy name (see
    `static_placement`, which also reads slots_per_rank).
    comm spans the EP group; by default the torch.distributed EP group (dims.build_groups must
    have run). chunks: None installs the plain AllToAllDispatcher, n the PipelinedDispatcher.
    payload_dtype: the rows' dtype on the wire (None: as computed).
    """
    comm = comm or TorchCommunicator(dims.ep_group)
    layers = moe_layers(model)
    if isinstance(placement, str):
        placement = static_placement(placement, dims.num_experts, dims.ep, len(layers), slots_per_rank)
    ep_rank = dims.ep_rank(rank)
    for y, moe in enumerate(layers):
        shard_experts(moe, placement.experts_on_rank(y, ep_rank))  # replicas are copies of their expert
        slots = SlotMap(placement.expert_of_slot_YS[y], dims.ep, ep_rank, dims.num_experts)
        install_dispatcher(moe, slots, comm, chunks, payload_dtype)
    return placement


def install_dispatcher(
    moe: MoE,
    slots: SlotMap | torch.Tensor,
    comm: Communicator,
    chunks: int | None,
    payload_dtype: torch.dtype | None = None,
) -> None:
    moe.dispatcher = (
        AllToAllDispatcher(slots, comm, payload_dtype)
        if chunks is None
        else PipelinedDispatcher(slots, comm, chunks, payload_dtype)
    )
