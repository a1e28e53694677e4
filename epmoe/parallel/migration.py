"""Online re-placement: move experts between ranks, weights and optimizer state together.

Shape key: Y MoE layers, E experts, R ranks of the EP group, L experts per rank (local slots),
D model width, F expert hidden size.

Every `rebalance_every` steps the `Rebalancer`
1. takes the routing counts of the window since the last re-placement, summed over all ranks;
2. asks the policy for a new placement on rank 0 and broadcasts it, so that every rank installs
   the same map even where a solver is time-limited (affinity's HiGHS);
3. per MoE layer, sends each local expert's rows (weights, and the optimizer's per-parameter
   state such as AdamW's exp_avg / exp_avg_sq) to its new owner with one all-to-all per tensor;
and the caller points the dispatchers at the new map (`Parallel.rebalance` does both).
Placement never changes the math: a run with re-placement computes the same losses as one
without (tested). With replicas (`redundant`) every copy of an expert starts as a copy of the
same old slot, so replicas stay identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from epmoe.comm.communicator import Communicator
from epmoe.comm.process import all_reduce_sum_
from epmoe.model.moe import MoE, moe_layers
from epmoe.placement.placement import Placement, RoutingStats
from epmoe.placement.policies import PLACEMENTS


def broadcast_from_rank0(placement: Placement | None, shape: tuple[int, int], is_rank0: bool) -> torch.Tensor:
    """Rank 0's expert_of_slot_YS on every rank of the world (a sum where the others add 0)."""
    expert_of_slot_YS = placement.expert_of_slot_YS.clone() if is_rank0 else torch.zeros(shape, dtype=torch.int64)
    return all_reduce_sum_(expert_of_slot_YS)


def migrate_layer(
    moe: MoE,
    old: Placement,
    new: Placement,
    layer: int,
    ep_rank: int,
    comm: Communicator,
    optimizer: torch.optim.Optimizer,
) -> int:
    """Move `layer`'s expert weights and their optimizer state from `old` to `new` placement on
    this rank; returns bytes sent away. The dispatchers still route by `old` (see apply_placement).

    Every new slot copies its expert from one old slot, the expert's first (a replica is a copy,
    so any would do). Each rank sends the rows that its old slots source, in new-slot order, so
    rank r receives, from each source rank in turn, its new slots in local order.
    """
    L, R, E = old.slots_per_rank, old.ep, old.num_experts
    if new.slots_per_rank != L:
        raise ValueError(f"re-placement keeps slots per rank ({L}), got a map with {new.slots_per_rank}")
    old_S, new_S = old.expert_of_slot_YS[layer], new.expert_of_slot_YS[layer]
    S = len(old_S)
    first_slot_E = torch.full((E,), S, dtype=torch.int64).scatter_reduce_(0, old_S, torch.arange(S), "amin")
    source_S = first_slot_E[new_S]  # the old slot each new slot copies
    sent_to_S = (source_S // L == ep_rank).nonzero().flatten()  # new slots my old slots source, ascending
    send_rows = source_S[sent_to_S] - ep_rank * L  # ... and my local row for each
    input_splits = torch.bincount(sent_to_S // L, minlength=R).tolist()
    src_rank_L = source_S[ep_rank * L : (ep_rank + 1) * L] // L  # where each of my new slots comes from
    recv_local_L = (src_rank_L * L + torch.arange(L)).argsort()  # local index of each received row
    output_splits = torch.bincount(src_rank_L, minlength=R).tolist()

    moved_rows = len(sent_to_S) - input_splits[ep_rank]
    sent_bytes = 0
    for param in moe.experts.stacked_weights().values():
        state = optimizer.state.get(param, {})
        tensors = [param.data] + [t for t in state.values() if torch.is_tensor(t) and t.shape == param.shape]
        for t in tensors:  # the weight, then its per-expert optimizer state (same shape)
            rows_NX = t[send_rows].reshape(len(send_rows), t[0].numel())  # [N, D, F] -> [N, D*F]
            got_LX = comm.all_to_all_v(rows_NX, output_splits, input_splits).wait()
            t[recv_local_L] = got_LX.view(L, *t.shape[1:])
            sent_bytes += moved_rows * t[0].numel() * t.element_size()
    return sent_bytes


@dataclass
class Rebalancer:
    """Recomputes the placement from recent routing statistics and migrates the experts."""

    policy: str
    every: int
    ep_rank: int
    is_rank0: bool
    comm: Communicator  # the EP group's, untimed: migration is not a training step's exchange

    def due(self, completed_steps: int, last: bool) -> bool:
        return self.every > 0 and completed_steps % self.every == 0 and not last

    def rebalance(
        self, model: nn.Module, old: Placement, stats: RoutingStats, optimizer: torch.optim.Optimizer
    ) -> tuple[Placement, dict]:
        """Collective: every rank calls it at the same step with the same (global) stats.
        Moves the experts (weights and optimizer state) from `old` to the policy's new map; the
        dispatchers still route by `old` until the caller applies the new one. Returns (new
        placement, metrics: imbalance under the old and new maps on this window, bytes)."""
        E, R, Y = old.num_experts, old.ep, old.num_layers
        proposal = PLACEMENTS[self.policy](E, R, old.slots_per_rank, stats, Y) if self.is_rank0 else None
        new = Placement(broadcast_from_rank0(proposal, tuple(old.expert_of_slot_YS.shape), self.is_rank0), R, E,
                        origin=proposal.origin if proposal else str(self.policy))  # fmt: skip
        layers = moe_layers(model)
        sent = sum(migrate_layer(moe, old, new, y, self.ep_rank, self.comm, optimizer) for y, moe in enumerate(layers))
        moved = torch.tensor([float(sent)], dtype=torch.float64)
        return new, {
            "placement_imbalance_old": old.imbalance(stats.load_YE),
            "placement_imbalance_new": new.imbalance(stats.load_YE),
            "placement_bytes_moved": all_reduce_sum_(moved)[0].item(),  # over all ranks
        }
