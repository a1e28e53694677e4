"""Collectives as small autograd Functions: backward is the transposed exchange.

Shape key: N rows this rank sends, M rows it receives, D row width.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class AllToAllV(torch.autograd.Function):
    """Variable-size all-to-all of rows: send input_splits[r] rows to rank r, receive
    output_splits[r] from it. Backward sends the gradients back (splits swapped)."""

    @staticmethod
    def forward(ctx, x_ND, output_splits: list[int], input_splits: list[int], group):  # noqa: D102
        ctx.splits, ctx.group = (output_splits, input_splits), group
        y_MD = x_ND.new_empty(sum(output_splits), *x_ND.shape[1:])
        dist.all_to_all_single(y_MD, x_ND.contiguous(), output_splits, input_splits, group=group)
        return y_MD

    @staticmethod
    def backward(ctx, g_MD):  # noqa: D102
        output_splits, input_splits = ctx.splits
        g_ND = g_MD.new_empty(sum(input_splits), *g_MD.shape[1:])
        dist.all_to_all_single(g_ND, g_MD.contiguous(), input_splits, output_splits, group=ctx.group)
        return g_ND, None, None, None


def all_to_all_v(x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    return AllToAllV.apply(x_ND, output_splits, input_splits, group)


def exchange_counts(send_counts_RL: torch.Tensor, group) -> torch.Tensor:
    """recv_counts_RL[r, l]: rows rank r sends to this rank's local expert l (no autograd)."""
    recv_counts_RL = torch.empty_like(send_counts_RL)
    dist.all_to_all_single(recv_counts_RL, send_counts_RL.contiguous(), group=group)
    return recv_counts_RL
