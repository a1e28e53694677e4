"""The single-device dispatcher: permute, run the experts, unpermute. No communication.

A dispatcher owns the whole exchange, `dispatcher(x_TD, routing, expert_fn) -> y_TD`, so
that expert parallelism can swap in an all-to-all dispatcher (epmoe.comm) from outside the
model without the model knowing. `expert_fn(x_ND, counts_E) -> y_ND` computes rows sorted
into contiguous per-expert segments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from epmoe.model.experts import GroupedExperts, compute_dtype
from epmoe.model.permute import make_permutation, permute, unpermute
from epmoe.model.router import Routing

ExpertFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Dispatcher(Protocol):
    def __call__(self, x_TD: torch.Tensor, routing: Routing, expert_fn: ExpertFn) -> torch.Tensor: ...


class LocalDispatcher:
    """All experts live here: sort pairs by expert, compute, weight and sum back per token.

    With `GroupedExperts` whose path fuses dispatch (on CPU by default once the sorted rows
    would be large), the experts gather, compute and scatter per expert themselves
    (fused_experts.py): no sorted rows at all.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def __call__(self, x_TD: torch.Tensor, routing: Routing, expert_fn: ExpertFn) -> torch.Tensor:
        perm = make_permutation(routing.topk_idx_TK, routing.keep_TK, self.num_experts)
        if isinstance(expert_fn, GroupedExperts) and expert_fn.fuses_dispatch(x_TD, routing.topk_idx_TK.shape[1]):
            return expert_fn.forward_fused(x_TD, perm, routing.topk_w_TK)
        # cast before the K-fold copy, not after: the experts compute in this dtype anyway
        x_TD = x_TD.to(compute_dtype(x_TD))
        y_ND = expert_fn(permute(x_TD, perm), perm.counts_E)
        return unpermute(y_ND, perm, routing.topk_w_TK)
