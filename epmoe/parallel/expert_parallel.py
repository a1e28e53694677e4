"""Apply expert parallelism to a single-device model from outside (the torchtitan way).

For every MoE layer y: keep only this rank's experts' weights (by layer y's placement map) and
install an exchanging dispatcher (plain all-to-all, or pipelined in chunks). The model's code
does not change. `apply_placement` is the one way dispatchers are pointed at a placement: at
set-up here, after a re-placement (migration.py) and after a checkpoint restores a saved map.
"""

from __future__ import annotations

import torch
from torch import nn

from epmoe.comm.communicator import Communicator, TorchCommunicator
from epmoe.comm.dispatch import AllToAllDispatcher
from epmoe.comm.parallel_dims import ParallelDims
from epmoe.comm.pipelined import PipelinedDispatcher
from epmoe.comm.slot_map import SlotMap
from epmoe.model.moe import moe_layers
from epmoe.placement.placement import Placement, RoutingStats
from epmoe.placement.policies import PLACEMENTS


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


def slot_map(placement: Placement, layer: int, ep_rank: int) -> SlotMap:
    """Where rank `ep_rank` sends each (token, choice) of MoE layer `layer` under `placement`."""
    return SlotMap(placement.expert_of_slot_YS[layer], placement.ep, ep_rank, placement.num_experts)


def apply_placement(model: nn.Module, placement: Placement, ep_rank: int) -> None:
    """Point every MoE layer's (exchanging) dispatcher at `placement`'s map for that layer.

    Only the routing changes: the expert weights must already be the placement's (sharded by
    `apply_expert_parallel`, moved by migration, or loaded by a checkpoint restore)."""
    for y, moe in enumerate(moe_layers(model)):
        moe.dispatcher.slot_map = slot_map(placement, y, ep_rank)


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
        moe.experts.keep_experts(placement.experts_on_rank(y, ep_rank))  # replicas are copies of their expert
        slots = slot_map(placement, y, ep_rank)
        moe.dispatcher = (
            AllToAllDispatcher(slots, comm, payload_dtype)
            if chunks is None
            else PipelinedDispatcher(slots, comm, chunks, payload_dtype)
        )
    return placement
