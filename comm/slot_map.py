"""Which slot of the EP group each (token, choice) goes to, from one rank's point of view.

Shape key: T tokens on this rank, K choices per token, E experts, S = R * L slots of the EP
group (R ranks, L slots per rank), M most replicas of one expert.

Without replicas a slot map is the placement's `slot_of_expert_E`. With replicas (the
`redundant` policy) an expert has several slots, and a choice of expert e goes to
1. e's replica on this rank, if it has one (no exchange at all);
2. otherwise one of e's replicas, spread evenly by the pair's position (t * K + k) mod
   (number of replicas), so every replica gets an even share of this rank's tokens.
Either way the expert's weights are the same on every replica, so the math is unchanged.
"""

from __future__ import annotations

import torch


class SlotMap:
    def __init__(self, expert_of_slot_S: torch.Tensor, ep: int, rank: int, num_experts: int | None = None):
        """expert_of_slot_S: the expert in each slot of one MoE layer (slot s on rank s // L);
        rank: this rank's index in the EP group."""
        S = len(expert_of_slot_S)
        if S % ep:
            raise ValueError(f"{S} slots cannot be split over ep ({ep}) ranks")
        E = num_experts or int(expert_of_slot_S.max()) + 1
        self.num_slots, self.slots_per_rank, self.ep = S, S // ep, ep
        self.expert_of_slot_S = expert_of_slot_S.clone()
        self.replicas_E = torch.bincount(expert_of_slot_S, minlength=E)
        if int(self.replicas_E.min()) == 0:
            missing = (self.replicas_E == 0).nonzero().flatten().tolist()
            raise ValueError(f"experts {missing} have no slot")
        # replica_slots_EM[e, j]: e's j-th slot (ascending); -1 pads experts with fewer replicas
        M = int(self.replicas_E.max())
        self.replica_slots_EM = torch.full((E, M), -1, dtype=torch.int64)
        order_S = expert_of_slot_S.argsort(stable=True)
        first_of_E = torch.cumsum(self.replicas_E, 0) - self.replicas_E  # where e's run starts in order_S
        rank_in_expert_S = torch.arange(S) - first_of_E[expert_of_slot_S[order_S]]
        self.replica_slots_EM[expert_of_slot_S[order_S], rank_in_expert_S] = order_S
        # own_slot_E[e]: e's (first) slot on this rank, -1 if none
        L = self.slots_per_rank
        self.own_slot_E = torch.full((E,), -1, dtype=torch.int64)
        for s in reversed(range(rank * L, (rank + 1) * L)):
            self.own_slot_E[expert_of_slot_S[s]] = s

    @classmethod
    def from_slot_of_expert(cls, slot_of_expert_E: torch.Tensor, ep: int, rank: int) -> SlotMap:
        """The map of a placement without replicas: expert e lives in slot slot_of_expert_E[e]."""
        expert_of_slot_S = torch.empty_like(slot_of_expert_E)
        expert_of_slot_S[slot_of_expert_E] = torch.arange(len(slot_of_expert_E))
        return cls(expert_of_slot_S, ep, rank)

    @classmethod
    def of(cls, slots: SlotMap | torch.Tensor, ep: int, rank: int) -> SlotMap:
        """`slots` itself, or the map of a slot_of_expert_E tensor."""
        return slots if isinstance(slots, SlotMap) else cls.from_slot_of_expert(slots, ep, rank)

    @property
    def has_replicas(self) -> bool:
        return self.num_slots > len(self.replicas_E)

    @property
    def slot_of_expert_E(self) -> torch.Tensor:
        """Each expert's slot (maps without replicas only)."""
        if self.has_replicas:
            raise ValueError("this slot map has replicas: an expert has several slots")
        return self.replica_slots_EM[:, 0]

    def __call__(self, topk_idx_TK: torch.Tensor) -> torch.Tensor:
        """slots_TK: the slot each (token, choice) is sent to."""
        device = topk_idx_TK.device
        if not self.has_replicas:
            return self.replica_slots_EM[:, 0].to(device)[topk_idx_TK]
        T, K = topk_idx_TK.shape
        spread_TK = torch.arange(T * K, device=device).view(T, K)  # the pair's position t * K + k
        replica_TK = spread_TK % self.replicas_E.to(device)[topk_idx_TK]
        spread_slot_TK = self.replica_slots_EM.to(device)[topk_idx_TK, replica_TK]
        own_TK = self.own_slot_E.to(device)[topk_idx_TK]
        return torch.where(own_TK >= 0, own_TK, spread_slot_TK)
