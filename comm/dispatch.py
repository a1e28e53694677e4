"""The all-to-all dispatcher: tokens travel to the ranks holding their experts and back.

Shape key: T tokens, K choices, D width, E experts, R = ep ranks, L = E / R local experts,
N rows this rank sends, M rows it receives.

1. sort the kept (token, choice) pairs by destination slot (rank, local expert);
2. exchange the per-(rank, local expert) counts (NOTE: the one host sync per layer call);
3. all-to-all the rows; received rows come grouped by (source rank, local expert);
4. re-sort them by local expert, run the local experts, undo the re-sort;
5. all-to-all the outputs back (the transposed exchange), weight and sum per token.
Dropless: splits are variable. Dropped pairs (capacity) never leave their rank. The exchange
blocks, so a side computation (the shared experts) runs after it; the pipelined dispatcher is the
one that overlaps it.

Both exchanging dispatchers route by `slot_map` (where each (token, choice) goes: comm/slot_map.py);
re-placing experts re-points it (`epmoe/parallel/expert_parallel.py: apply_placement`), nothing else changes.

payload_dtype (e.g. bf16): rows are cast to it just for the exchanges and back to the compute
dtype on arrival; the casts sit outside the autograd all-to-all, so gradients cross in it too.
NOTE: here this rank's own rows take the same rounding (they pass through the same collective);
the pipelined dispatcher never exchanges them.
"""

from __future__ import annotations

import torch

from epmoe.comm.collectives import all_to_all_v, exchange_counts
from epmoe.comm.communicator import Communicator
from epmoe.comm.slot_map import SlotMap
from epmoe.model.dispatch import Side
from epmoe.model.experts import GroupedExperts, compute_dtype
from epmoe.model.permute import Permutation, make_permutation, permute, unpermute
from epmoe.model.router import Routing


def sort_by_slot(
    x_TD: torch.Tensor, routing: Routing, slot_map: SlotMap, comm: Communicator
) -> tuple[Permutation, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1-2, shared by the dispatchers: (perm, x_ND rows sorted by destination slot,
    send_counts_RL, recv_counts_RL). recv_counts_RL[r, l]: rows rank r sends to local slot l."""
    R, L = comm.size, slot_map.slots_per_rank
    perm = make_permutation(slot_map(routing.topk_idx_TK), routing.keep_TK, R * L)
    x_ND = permute(x_TD.to(compute_dtype(x_TD)), perm)
    send_counts_RL = perm.counts_E.view(R, L)
    return perm, x_ND, send_counts_RL, exchange_counts(send_counts_RL, comm)


class AllToAllDispatcher:
    def __init__(self, slots: SlotMap | torch.Tensor, comm: Communicator, payload_dtype: torch.dtype | None = None):
        """slots: where each (token, choice) goes (a SlotMap, or slot_of_expert_E[e] = rank * L +
        local index of expert e for a placement without replicas);
        comm spans the EP group (its size is ep); payload_dtype: the rows' dtype on the wire
        (None: the compute dtype, no cast)."""
        self.slot_map = SlotMap.of(slots, comm.size, comm.rank)
        self.ep, self.comm = comm.size, comm
        self.payload_dtype = payload_dtype

    @property
    def local_experts(self) -> int:
        """Local slots (replicas included)."""
        return self.slot_map.slots_per_rank

    @property
    def slot_of_expert_E(self) -> torch.Tensor:
        return self.slot_map.slot_of_expert_E

    def _exchange(self, rows: torch.Tensor, output_splits: list[int], input_splits: list[int]) -> torch.Tensor:
        """all_to_all_v in payload_dtype; the result (and, in backward, the gradient) in rows' dtype."""
        wire = self.payload_dtype or rows.dtype
        return all_to_all_v(rows.to(wire), output_splits, input_splits, self.comm).to(rows.dtype)

    def __call__(
        self, x_TD: torch.Tensor, routing: Routing, experts: GroupedExperts, side: Side | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        R, L = self.ep, self.local_experts
        perm, x_ND, send_counts_RL, recv_counts_RL = sort_by_slot(x_TD, routing, self.slot_map, self.comm)
        # NOTE: the one host sync per call: the splits and the received rows' experts derive from these
        send_RL, recv_RL = torch.stack((send_counts_RL, recv_counts_RL)).cpu()
        input_splits, output_splits = send_RL.sum(1).tolist(), recv_RL.sum(1).tolist()
        x_MD = self._exchange(x_ND, output_splits, input_splits)

        local_of_row_M = torch.arange(L).repeat(R).repeat_interleave(recv_RL.flatten())
        order_M = local_of_row_M.argsort(stable=True).to(x_MD.device)
        inverse_M = torch.empty_like(order_M)
        inverse_M[order_M] = torch.arange(len(order_M), device=order_M.device)
        y_sorted_MD = experts(x_MD.index_select(0, order_M), recv_counts_RL.sum(0))
        y_MD = y_sorted_MD.index_select(0, inverse_M)

        y_ND = self._exchange(y_MD, input_splits, output_splits)
        return unpermute(y_ND, perm, routing.topk_w_TK), side() if side is not None else None
