"""The placement map: which expert sits in which (rank, slot) of every MoE layer, and the routing
statistics that the load-following policies read.

A placement gives each MoE layer its own map, because routing load differs per layer. Slot s of the
EP group lives on rank s // L, as local expert s % L. With S == E every expert has one slot (a
permutation, the layout `policies.contiguous` and `policies.round_robin` describe with one map for
all layers); with S > E the spare slots hold replicas of hot experts, and an expert's tokens are
split evenly among its replicas.

Shape key:
  Y  MoE layers
  E  experts (global ids)
  S  slots in the EP group, S = R * L; slot s lives on rank s // L
  R  ranks in the EP group (ep)
  L  slots per rank (local experts, replicas included)
  M  most replicas any one expert has in a layer
  N  items (experts or replicas) handed to `Placement.from_ranks`
  T  tokens, K  experts chosen per token (top-k)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)  # eq=False: `==` on a tensor field is elementwise, not a bool
class Placement:
    """Per-layer expert placement: `expert_of_slot_YS[y, s]` is the expert in slot s of MoE layer y.

    `origin` says which policy (and, for `affinity`, which solver path) produced the map, e.g.
    "balanced" or "affinity:greedy (...)"; nothing falls back silently.
    NOTE: the dataclass is frozen but the tensor is not; treat it as read-only once built.
    """

    expert_of_slot_YS: torch.Tensor
    ep: int
    num_experts: int
    origin: str = "given"

    def __post_init__(self) -> None:
        self.validate()

    # -- shape ------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.expert_of_slot_YS.shape[0]

    @property
    def num_slots(self) -> int:
        return self.expert_of_slot_YS.shape[1]

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.ep

    @property
    def has_replicas(self) -> bool:
        return self.num_slots > self.num_experts

    @property
    def rank_of_slot_S(self) -> torch.Tensor:
        return torch.arange(self.num_slots) // self.slots_per_rank

    def validate(self) -> None:
        """Raise ValueError (one line, quoting the values) unless this is a usable map: int64
        [Y, S], S a multiple of ep and at least num_experts, ids in range, and every expert in at
        least one slot of every layer."""
        m = self.expert_of_slot_YS
        if not isinstance(m, torch.Tensor) or m.dtype != torch.int64 or m.dim() != 2 or m.shape[0] < 1:
            got = f"{m.dtype} of shape {tuple(m.shape)}" if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"expert_of_slot_YS must be an int64 tensor [layers, slots], got {got}")
        if self.ep < 1 or self.num_experts < 1:
            raise ValueError(f"ep ({self.ep}) and num_experts ({self.num_experts}) must be >= 1")
        num_slots = m.shape[1]
        if num_slots % self.ep:
            raise ValueError(f"slots ({num_slots}) must be a multiple of ep ({self.ep}): every rank holds as many")
        if num_slots < self.num_experts:
            raise ValueError(
                f"{num_slots} slots cannot hold {self.num_experts} experts; "
                f"need slots_per_rank >= {-(-self.num_experts // self.ep)} with ep {self.ep}"
            )
        if m.min() < 0 or m.max() >= self.num_experts:
            raise ValueError(f"expert ids must lie in [0, {self.num_experts}), got [{m.min()}, {m.max()}]")
        for y in range(m.shape[0]):
            missing = (torch.bincount(m[y], minlength=self.num_experts) == 0).nonzero().flatten()
            if len(missing):
                raise ValueError(f"layer {y} places no slot for experts {missing.tolist()}; every expert needs one")

    # -- who is where -----------------------------------------------------------------------------

    def experts_on_rank(self, layer: int, rank: int) -> torch.Tensor:
        """[L] the expert ids in rank `rank`'s slots of `layer`, in slot (local) order."""
        L = self.slots_per_rank
        return self.expert_of_slot_YS[layer, rank * L : (rank + 1) * L]

    @property
    def replica_count_YE(self) -> torch.Tensor:
        """[Y, E] int64: slots each expert holds in each layer (1 without replicas)."""
        return torch.stack([torch.bincount(row, minlength=self.num_experts) for row in self.expert_of_slot_YS])

    def replica_slots_EM(self, layer: int) -> torch.Tensor:
        """[E, M] int64: the slots of each expert in `layer`, ascending, padded with -1."""
        expert_of_slot_S = self.expert_of_slot_YS[layer]
        count_E = torch.bincount(expert_of_slot_S, minlength=self.num_experts)
        slot_by_expert_S = torch.argsort(expert_of_slot_S, stable=True)  # slots grouped by expert, ascending
        expert_sorted_S = expert_of_slot_S[slot_by_expert_S]
        first_E = torch.cumsum(count_E, 0) - count_E  # where each expert's group starts
        position_S = torch.arange(self.num_slots) - first_E[expert_sorted_S]
        out_EM = torch.full((self.num_experts, int(count_E.max())), -1, dtype=torch.int64)
        out_EM[expert_sorted_S, position_S] = slot_by_expert_S
        return out_EM

    def slot_of_expert_E(self, layer: int) -> torch.Tensor:
        """[E] the slot of each expert in `layer`: the one-map form `AllToAllDispatcher` takes.
        Only for maps without replicas."""
        if self.has_replicas:
            raise ValueError(
                f"layer {layer} has {self.num_slots} slots for {self.num_experts} experts (replicas): "
                "an expert has several slots; use replica_slots_EM"
            )
        slot_of_expert_E = torch.empty_like(self.expert_of_slot_YS[layer])
        slot_of_expert_E[self.expert_of_slot_YS[layer]] = torch.arange(self.num_slots)
        return slot_of_expert_E

    @property
    def rank_share_YER(self) -> torch.Tensor:
        """[Y, E, R] float64: the share of expert e's tokens that rank r computes in layer y (its
        replicas on r over its replicas), assuming tokens split evenly among replicas."""
        Y, E, R = self.num_layers, self.num_experts, self.ep
        flat_YS = self.expert_of_slot_YS * R + self.rank_of_slot_S  # (expert, rank) pair of each slot
        count_YER = torch.zeros(Y, E * R, dtype=torch.float64)
        count_YER.scatter_add_(1, flat_YS, torch.ones(flat_YS.shape, dtype=torch.float64))
        count_YER = count_YER.view(Y, E, R)
        return count_YER / count_YER.sum(-1, keepdim=True)

    # -- what it costs ----------------------------------------------------------------------------

    def rank_load_YR(self, load_YE: torch.Tensor) -> torch.Tensor:
        """[Y, R] float64 tokens each rank computes per layer, given tokens per expert `load_YE`
        [Y, E]; a replicated expert's load splits evenly among its replicas."""
        return torch.einsum("ye,yer->yr", load_YE.double(), self.rank_share_YER)

    def rank_load_R(self, layer: int, load_E: torch.Tensor) -> torch.Tensor:
        """[R] float64 tokens each rank computes in `layer`, given tokens per expert `load_E` [E]."""
        return load_E.double() @ self.rank_share_YER[layer]

    def imbalance_Y(self, load_YE: torch.Tensor) -> torch.Tensor:
        """[Y] max / mean rank load of each layer (1.0 is perfect; a layer without tokens counts 1.0)."""
        rank_load_YR = self.rank_load_YR(load_YE)
        mean_Y = rank_load_YR.mean(-1)
        return torch.where(mean_Y > 0, rank_load_YR.max(-1).values / mean_Y.clamp_min(1e-300), 1.0)

    def imbalance(self, load_YE: torch.Tensor) -> float:
        """sum_y max_r load / sum_y mean_r load over the layers of `load_YE` [Y, E].

        Why this aggregate: every MoE layer waits for its slowest rank, so a step's expert time goes
        as the sum over layers of the max rank load, and the ideal as the sum of the means. It is the
        load-weighted mean of `imbalance_Y`; 1.0 is perfect."""
        rank_load_YR = self.rank_load_YR(load_YE)
        ideal = float(rank_load_YR.mean(-1).sum())
        return float(rank_load_YR.max(-1).values.sum()) / ideal if ideal > 0 else 1.0

    def colocation(self, cooc_YEE: torch.Tensor) -> float:
        """The fraction of consecutive-layer token transitions that stay on one rank, given
        `cooc_YEE` [Y-1, E, E] (cooc[y, i, j]: tokens that chose i in layer y and j in layer y+1).
        Replicas count by their share of the expert's tokens, as if each token picked one at random."""
        total = float(cooc_YEE.sum())
        if total == 0:
            return 1.0
        share_YER = self.rank_share_YER
        same_rank_YEE = share_YER[:-1] @ share_YER[1:].transpose(1, 2)  # [Y-1, E, E] P(i and j on one rank)
        return float((cooc_YEE.double() * same_rank_YEE).sum()) / total

    # -- building ---------------------------------------------------------------------------------

    @classmethod
    def from_slot_of_expert(
        cls, slot_of_expert_E: torch.Tensor, ep: int, num_layers: int, origin: str = "given"
    ) -> Placement:
        """The one-map-for-all-layers form (`policies.contiguous` / `round_robin`), for every layer."""
        E = len(slot_of_expert_E)
        if not torch.equal(torch.sort(slot_of_expert_E).values, torch.arange(E)):
            raise ValueError(f"slot_of_expert_E must be a permutation of 0..{E - 1}, got {slot_of_expert_E.tolist()}")
        expert_of_slot_S = torch.empty_like(slot_of_expert_E)
        expert_of_slot_S[slot_of_expert_E] = torch.arange(E)
        return cls(expert_of_slot_S.repeat(num_layers, 1), ep, E, origin)  # [Y, S]

    @classmethod
    def from_ranks(
        cls,
        rank_of_item_YN: torch.Tensor,
        expert_of_item_YN: torch.Tensor,
        ep: int,
        num_experts: int,
        origin: str = "given",
    ) -> Placement:
        """Slots from a rank per item (expert or replica) per layer; each rank must get N / ep items.
        Within a rank, slots follow ascending expert id, so the layout is deterministic."""
        Y, N = rank_of_item_YN.shape
        if N % ep:
            raise ValueError(f"{N} items per layer cannot fill {ep} ranks equally")
        per_rank_YR = torch.stack([torch.bincount(row, minlength=ep) for row in rank_of_item_YN])
        if (per_rank_YR != N // ep).any() or rank_of_item_YN.max() >= ep:
            raise ValueError(f"every rank needs {N // ep} items per layer, got {per_rank_YR.tolist()}")
        key_YN = rank_of_item_YN * num_experts + expert_of_item_YN  # sort by rank, then expert id
        order_YN = torch.argsort(key_YN, dim=1, stable=True)
        return cls(torch.gather(expert_of_item_YN, 1, order_YN), ep, num_experts, origin)


@dataclass
class RoutingStats:
    """What the load-following policies read, accumulated over some training steps.

    load_YE:  [Y, E] tokens routed to each expert in each MoE layer (int64 or float).
    cooc_YEE: [Y-1, E, E] tokens that chose expert i in MoE layer y and expert j in MoE layer y+1;
              optional, only `affinity` reads it. With top-k routing a token counts in k * k pairs.
    """

    load_YE: torch.Tensor
    cooc_YEE: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.load_YE.dim() != 2:
            raise ValueError(f"load_YE must be [layers, experts], got shape {tuple(self.load_YE.shape)}")
        if (self.load_YE < 0).any():
            raise ValueError("load_YE counts tokens and cannot be negative")
        Y, E = self.load_YE.shape
        if self.cooc_YEE is not None and tuple(self.cooc_YEE.shape) != (Y - 1, E, E):
            raise ValueError(
                f"cooc_YEE must be [{Y - 1}, {E}, {E}] for load_YE {[Y, E]}, got {list(self.cooc_YEE.shape)}"
            )

    @property
    def num_layers(self) -> int:
        return self.load_YE.shape[0]

    @property
    def num_experts(self) -> int:
        return self.load_YE.shape[1]

    @classmethod
    def from_topk(cls, topk_idx_YTK: torch.Tensor, num_experts: int) -> RoutingStats:
        """Counts from the routers' choices: `topk_idx_YTK` [Y, T, K] holds the experts token t chose
        in MoE layer y (the same T tokens in every layer, as they flow through the model)."""
        Y, T, K = topk_idx_YTK.shape
        E = num_experts
        load_YE = torch.stack([torch.bincount(row.flatten(), minlength=E) for row in topk_idx_YTK])
        # pair id i * E + j for every (choice in layer y, choice in layer y+1) of each token
        pair_YTKK = topk_idx_YTK[:-1, :, :, None] * E + topk_idx_YTK[1:, :, None, :]
        cooc_YEE = torch.zeros(Y - 1, E * E, dtype=torch.int64)
        for y in range(Y - 1):
            cooc_YEE[y] = torch.bincount(pair_YTKK[y].flatten(), minlength=E * E)
        return cls(load_YE, cooc_YEE.view(Y - 1, E, E))  # [Y-1, E*E] -> [Y-1, E, E]

    def __add__(self, other: RoutingStats) -> RoutingStats:
        """Counts of both (e.g. two steps); co-occurrence only if both have it."""
        both = self.cooc_YEE is not None and other.cooc_YEE is not None
        return RoutingStats(self.load_YE + other.load_YE, self.cooc_YEE + other.cooc_YEE if both else None)


# A placement policy: (num_experts, ep, slots_per_rank, stats, num_layers) -> Placement.
PlacementPolicy = Callable[[int, int, int, RoutingStats | None, int], Placement]


def check_policy_args(
    policy: str,
    num_experts: int,
    ep: int,
    slots_per_rank: int,
    stats: RoutingStats | None,
    num_layers: int,
    *,
    needs_stats: bool,
    replicas: bool = False,
) -> None:
    """The checks every policy shares; raises ValueError naming the value and what would work.
    replicas: whether the policy may use spare slots (slots_per_rank > num_experts / ep)."""
    if num_experts < 1 or ep < 1 or num_layers < 1:
        raise ValueError(f"num_experts ({num_experts}), ep ({ep}) and num_layers ({num_layers}) must be >= 1")
    if replicas:
        if slots_per_rank * ep < num_experts:
            raise ValueError(
                f"slots_per_rank ({slots_per_rank}) * ep ({ep}) slots cannot hold {num_experts} experts; "
                f"use slots_per_rank >= {-(-num_experts // ep)}"
            )
    else:
        if num_experts % ep:
            divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
            raise ValueError(f"ep ({ep}) must divide num_experts ({num_experts}) for '{policy}'; use ep in {divisors}")
        if slots_per_rank != num_experts // ep:
            raise ValueError(
                f"'{policy}' places each expert once: slots_per_rank ({slots_per_rank}) must be "
                f"num_experts / ep ({num_experts // ep}); use 'redundant' for spare slots"
            )
    if stats is None:
        if needs_stats:
            raise ValueError(
                f"'{policy}' placement needs RoutingStats (tokens per expert); got None, or use 'contiguous'"
            )
        return
    if tuple(stats.load_YE.shape) != (num_layers, num_experts):
        raise ValueError(
            f"stats cover {stats.num_layers} layers x {stats.num_experts} experts, "
            f"but the model has {num_layers} MoE layers x {num_experts} experts"
        )
