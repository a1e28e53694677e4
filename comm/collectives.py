"""Collectives as small autograd Functions: backward is the transposed exchange.

Shape key: N rows this rank sends, M rows it receives, D row width, R ranks, L local experts.
"""

from __future__ import annotations

import torch

from epmoe.comm.communicator import Communicator


class AllToAllV(torch.autograd.Function):
    """Variable-size all-to-all of rows: send input_splits[r] rows to rank r, receive
    output_splits[r] from it. Backward sends the gradients back (splits swapped)."""

    @staticmethod
    def forward(ctx, x_ND, output_splits: list[int], input_splits: list[int], comm: Communicator):  # noqa: D102
        ctx.splits, ctx.comm = (output_splits, input_splits), comm
        return comm.all_to_all_v(x_ND, output_splits, input_splits).wait()

    @staticmethod
    def backward(ctx, g_MD):  # noqa: D102
        output_splits, input_splits = ctx.splits
        return ctx.comm.all_to_all_v(g_MD, input_splits, output_splits).wait(), None, None, None


def all_to_all_v(x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int], comm: Communicator):
    return AllToAllV.apply(x_ND, output_splits, input_splits, comm)


def exchange_counts(send_counts_RL: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """recv_counts_RL[r, l]: rows rank r sends to this rank's local expert l (no autograd)."""
    R = send_counts_RL.shape[0]
    return comm.all_to_all_v(send_counts_RL, [1] * R, [1] * R).wait()
