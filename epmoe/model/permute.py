"""Index math that sorts (token, choice) pairs into contiguous per-expert segments and back.

Shape key: T tokens, K choices per token, D model width, E experts (or any bins the rows are
grouped by), N = number of kept (token, choice) pairs (T*K when dropless).

No T x E x C masks: one stable argsort of the flattened expert ids gives the order; the
inverse is an `index_add_` over token ids, whose backward is a gather. Memory is O(T*K*D).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Permutation:
    """Where each sorted row came from and how many rows each bin holds."""

    token_N: torch.Tensor  # int64 token id of sorted row n
    choice_N: torch.Tensor  # int64 flat (token*K + k) index of sorted row n
    counts_E: torch.Tensor  # int64 rows per bin; rows of bin e are contiguous, in bin order


def make_permutation(bins_TK: torch.Tensor, keep_TK: torch.Tensor | None, num_bins: int) -> Permutation:
    """Sort the kept (token, choice) pairs by bin, stably (ties keep token order).

    bins_TK: int64 bin of each pair (an expert id locally; a (rank, local expert) slot once
    experts are spread over ranks). keep_TK: bool, False for pairs dropped by capacity.
    """
    T, K = bins_TK.shape
    flat_bins = bins_TK.reshape(-1)  # (T*K,), index = token*K + k
    if keep_TK is None:
        choice_N = flat_bins.argsort(stable=True)
    else:
        kept = keep_TK.reshape(-1).nonzero().squeeze(1)
        choice_N = kept[flat_bins[kept].argsort(stable=True)]
    counts_E = torch.bincount(flat_bins[choice_N], minlength=num_bins)
    return Permutation(token_N=choice_N // K, choice_N=choice_N, counts_E=counts_E)


def permute(x_TD: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """x_ND: row n is the token that sorted pair n came from."""
    return x_TD.index_select(0, perm.token_N)


def unpermute(y_ND: torch.Tensor, perm: Permutation, topk_w_TK: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """y_TD = sum over each token's kept choices of weight * expert output (0 if all dropped).

    NOTE: accumulates and returns in the weights' dtype (fp32 from the router), so bf16
    expert outputs are summed over K in fp32 and the residual stream stays fp32.
    """
    w_N = topk_w_TK.reshape(-1).index_select(0, perm.choice_N)
    weighted_ND = y_ND.to(w_N.dtype) * w_N.unsqueeze(1)
    y_TD = weighted_ND.new_zeros(num_tokens, y_ND.shape[1])
    return y_TD.index_add_(0, perm.token_N, weighted_ND)
