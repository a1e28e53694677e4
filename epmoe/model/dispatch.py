"""The dispatcher contract, and the single-device dispatcher: permute, run the experts, unpermute.

A dispatcher owns the whole exchange, so that expert parallelism can swap in an exchanging
dispatcher (epmoe.comm: all-to-all, pipelined) from outside the model without the model knowing.
Every dispatcher implements one call:

    y_TD, side_out = dispatcher(x_TD, routing, experts, side=None)

`experts` (GroupedExperts) computes rows sorted into contiguous per-expert segments,
`experts(x_ND, counts_E) -> y_ND`; whatever else a dispatcher needs from them (a fused path, the
stacked weights) is a method of the experts. `side` is a computation that does not depend on the
routed output (the shared experts on their own input): a dispatcher that exchanges runs it while
tokens travel; the local one runs it plainly. side_out is None without a side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from epmoe.model.experts import GroupedExperts, compute_dtype
from epmoe.model.permute import make_permutation, permute, unpermute
from epmoe.model.router import Routing


@dataclass
class Side:
    """A module applied to its own input beside the routed experts: side() = module(x_TD)."""

    module: nn.Module
    x_TD: torch.Tensor

    def __call__(self) -> torch.Tensor:
        return self.module(self.x_TD)


class Dispatcher(Protocol):
    def __call__(
        self, x_TD: torch.Tensor, routing: Routing, experts: GroupedExperts, side: Side | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class LocalDispatcher:
    """All experts live here: sort pairs by expert, compute, weight and sum back per token.

    Where the experts' path fuses dispatch (on CPU by default once the sorted rows would be
    large), they gather, compute and scatter per expert themselves (fused_experts.py): no
    sorted rows at all.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def __call__(
        self, x_TD: torch.Tensor, routing: Routing, experts: GroupedExperts, side: Side | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        perm = make_permutation(routing.topk_idx_TK, routing.keep_TK, self.num_experts)
        if experts.fuses_dispatch(x_TD, routing.topk_idx_TK.shape[1]):
            y_TD = experts.forward_fused(x_TD, perm, routing.topk_w_TK)
        else:
            # cast before the K-fold copy, not after: the experts compute in this dtype anyway
            x_TD = x_TD.to(compute_dtype(x_TD))
            y_TD = unpermute(experts(permute(x_TD, perm), perm.counts_E), perm, routing.topk_w_TK)
        return y_TD, side() if side is not None else None
