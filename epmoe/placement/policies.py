"""Expert placement policies: pure functions from (num_experts, ep) to a placement map.

A placement map is `slot_of_expert_E`: expert e lives in slot s = rank * L + local index,
with L = num_experts / ep experts per rank. Rows sent to rank r are sorted by slot, so a
rank's local experts compute in slot order.

`PLACEMENTS` holds the per-layer form (`placement.Placement`, which also allows replicas): every
policy, static or load-following, called as policy(num_experts, ep, slots_per_rank, stats, num_layers).
"""

from __future__ import annotations

import torch

from epmoe.config import PlacementName
from epmoe.placement.affinity import affinity_placement
from epmoe.placement.load_policies import balanced_placement, redundant_placement
from epmoe.placement.placement import Placement, PlacementPolicy, RoutingStats, check_policy_args


def contiguous(num_experts: int, ep: int) -> torch.Tensor:
    """Experts [r*L, (r+1)*L) on rank r."""
    return torch.arange(num_experts)


def round_robin(num_experts: int, ep: int) -> torch.Tensor:
    """Expert e on rank e % ep, as its (e // ep)-th local expert."""
    experts_per_rank = num_experts // ep
    e = torch.arange(num_experts)
    return (e % ep) * experts_per_rank + e // ep


POLICIES = {"contiguous": contiguous, "round_robin": round_robin}


def experts_on_rank(slot_of_expert_E: torch.Tensor, ep: int, ep_rank: int) -> torch.Tensor:
    """The global ids of rank `ep_rank`'s experts, in local (slot) order."""
    experts_per_rank = len(slot_of_expert_E) // ep
    expert_of_slot = torch.empty_like(slot_of_expert_E)
    expert_of_slot[slot_of_expert_E] = torch.arange(len(slot_of_expert_E))
    return expert_of_slot[ep_rank * experts_per_rank : (ep_rank + 1) * experts_per_rank]


def contiguous_placement(
    num_experts: int, ep: int, slots_per_rank: int, stats: RoutingStats | None, num_layers: int
) -> Placement:
    """`contiguous` in every MoE layer; reads no stats."""
    check_policy_args("contiguous", num_experts, ep, slots_per_rank, stats, num_layers, needs_stats=False)
    return Placement.from_slot_of_expert(contiguous(num_experts, ep), ep, num_layers, origin="contiguous")


def round_robin_placement(
    num_experts: int, ep: int, slots_per_rank: int, stats: RoutingStats | None, num_layers: int
) -> Placement:
    """`round_robin` in every MoE layer; reads no stats."""
    check_policy_args("round_robin", num_experts, ep, slots_per_rank, stats, num_layers, needs_stats=False)
    return Placement.from_slot_of_expert(round_robin(num_experts, ep), ep, num_layers, origin="round_robin")


# keyed by placement.policy's Enum (its members are their strings: PLACEMENTS["balanced"] works)
PLACEMENTS: dict[str, PlacementPolicy] = {
    PlacementName.contiguous: contiguous_placement,
    PlacementName.round_robin: round_robin_placement,
    PlacementName.balanced: balanced_placement,
    PlacementName.redundant: redundant_placement,
    PlacementName.affinity: affinity_placement,
}
# the names live once, in the Enum: no policy without a name there, no name there without a policy
if set(PLACEMENTS) != set(PlacementName):
    raise ImportError(
        f"PLACEMENTS ({', '.join(PLACEMENTS)}) must hold exactly PlacementName ({', '.join(PlacementName)})"
    )
