"""Expert placement policies: pure functions from (num_experts, ep) to a placement map.

A placement map is `slot_of_expert_E`: expert e lives in slot s = rank * L + local index,
with L = num_experts / ep experts per rank. Rows sent to rank r are sorted by slot, so a
rank's local experts compute in slot order.
"""

from __future__ import annotations

import torch


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
