"""Online re-placement: move experts between ranks, weights and optimizer state together.

Shape key: Y MoE layers, E experts, R ranks of the EP group, L experts per rank (local slots),
D model width, F expert hidden size.

Every `rebalance_every` steps the `Rebalancer`
1. takes the routing counts of the window since the last re-placement, summed over all ranks;
2. asks the policy for a new placement on rank 0 and broadcasts it, so that every rank installs
   the same map even where a solver is time-limited (affinity's HiGHS);
3. per MoE layer, sends each local expert's rows (weights, and the optimizer's per-parameter
   state such as AdamW's exp_avg / exp_avg_sq) to its new owner with one all-to-all per tensor,
   and installs dispatchers for the new map.
Placement never changes the math: a run with re-placement computes the same losses as one
without (tested). Maps with replicas (`redundant`) are not installed by this version.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epmoe.comm.communicator import Communicator
from epmoe.comm.process import all_reduce_sum_
from epmoe.model.moe import MoE
from epmoe.parallel.expert_parallel import EXPERT_WEIGHTS, install_dispatcher
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
    """Move `layer`'s experts from `old` to `new` placement on this rank; returns bytes sent away.

    Each rank sends its L old local experts sorted by destination slot (rank, then local index),
    so rank r receives, from each source rank in turn, its new experts in local order.
    """
    L, R = old.slots_per_rank, old.ep
    old_slot_E, new_slot_E = old.slot_of_expert_E(layer), new.slot_of_expert_E(layer)
    dest_slot_L = new_slot_E[old.experts_on_rank(layer, ep_rank)]  # where my old experts go
    send_order_L = dest_slot_L.argsort()
    input_splits = torch.bincount(dest_slot_L // L, minlength=R).tolist()
    src_rank_L = old_slot_E[new.experts_on_rank(layer, ep_rank)] // L  # where my new experts come from
    recv_local_L = (src_rank_L * L + torch.arange(L)).argsort()  # local index of each received row
    output_splits = torch.bincount(src_rank_L, minlength=R).tolist()

    moved_rows = L - input_splits[ep_rank]
    sent_bytes = 0
    for name in EXPERT_WEIGHTS:
        param = getattr(moe.experts, name)
        if param is None:
            continue
        state = optimizer.state.get(param, {})
        tensors = [param.data] + [t for t in state.values() if torch.is_tensor(t) and t.shape == param.shape]
        for t in tensors:  # the weight, then its per-expert optimizer state (same shape)
            rows_LX = t[send_order_L].reshape(L, -1)  # [L, D, F] -> [L, D*F]
            got_LX = comm.all_to_all_v(rows_LX, output_splits, input_splits).wait()
            t[recv_local_L] = got_LX.view_as(t)
            sent_bytes += moved_rows * rows_LX[0].numel() * rows_LX.element_size()
    previous = moe.dispatcher  # the new one keeps its communicator (and any timing wrapper around it)
    chunks, payload = getattr(previous, "chunks", None), getattr(previous, "payload_dtype", None)
    install_dispatcher(moe, new_slot_E, previous.comm, chunks, payload)
    return sent_bytes


@dataclass
class Rebalancer:
    """Recomputes the placement from recent routing statistics and migrates the experts."""

    policy: str
    every: int
    placement: Placement
    ep_rank: int
    is_rank0: bool
    comm: Communicator

    def due(self, completed_steps: int, last: bool) -> bool:
        return self.every > 0 and completed_steps % self.every == 0 and not last

    def rebalance(self, layers: list[MoE], stats: RoutingStats, optimizer: torch.optim.Optimizer) -> dict:
        """Collective: every rank calls it at the same step with the same (global) stats.
        Returns the metrics to log: imbalance under the old and new maps on this window, bytes."""
        old = self.placement
        E, R, Y = old.num_experts, old.ep, old.num_layers
        proposal = PLACEMENTS[self.policy](E, R, old.slots_per_rank, stats, Y) if self.is_rank0 else None
        new = Placement(broadcast_from_rank0(proposal, tuple(old.expert_of_slot_YS.shape), self.is_rank0), R, E,
                        origin=proposal.origin if proposal else self.policy)  # fmt: skip
        sent = sum(migrate_layer(moe, old, new, y, self.ep_rank, self.comm, optimizer) for y, moe in enumerate(layers))
        self.placement = new
        moved = torch.tensor([float(sent)], dtype=torch.float64)
        return {
            "placement_imbalance_old": old.imbalance(stats.load_YE),
            "placement_imbalance_new": new.imbalance(stats.load_YE),
            "placement_bytes_moved": all_reduce_sum_(moved)[0].item(),  # over all ranks
        }
