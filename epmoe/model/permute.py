"""Index math that sorts (token, choice) pairs into contiguous per-expert segments and back.

Shape key: T tokens, K choices per token, D model width, E experts (or any bins the rows are
grouped by), N = number of kept (token, choice) pairs (T*K when dropless).

No T x E x C masks: one stable argsort of the flattened expert ids gives the order, and its
inverse `inv_TK` (where each pair landed; N for a dropped pair) turns both directions into
gathers: permute's backward gathers each token's K row gradients and sums them, combine
gathers each token's K expert outputs and mixes them with one batched matmul, block by
block of tokens. Gathers with an inverse map beat scatters (`index_add_`) on CPU and keep
K-sums in fp32. Memory is O(T*K*D).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Permutation:
    """Where each sorted row came from, where each pair went, and how many rows each bin holds."""

    token_N: torch.Tensor  # int64 token id of sorted row n
    choice_N: torch.Tensor  # int64 flat (token*K + k) index of sorted row n
    inv_TK: torch.Tensor  # int64 sorted row of pair (t, k); N where the pair was dropped
    counts_E: torch.Tensor  # int64 rows per bin; rows of bin e are contiguous, in bin order

    @property
    def has_drops(self) -> bool:
        return self.choice_N.numel() < self.inv_TK.numel()


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
    N = choice_N.numel()
    inv = torch.full((T * K,), N, dtype=torch.long, device=bins_TK.device)
    inv[choice_N] = torch.arange(N, device=bins_TK.device)
    counts_E = torch.bincount(flat_bins[choice_N], minlength=num_bins)
    return Permutation(token_N=choice_N // K, choice_N=choice_N, inv_TK=inv.view(T, K), counts_E=counts_E)


CHUNK_BYTES = 8 << 20  # gathered (tokens, K, D) blocks stay this small (see _token_chunks)


def _token_chunks(perm: Permutation, row_bytes: int) -> list[tuple[int, int]]:
    """Token ranges whose K gathered rows take about CHUNK_BYTES.

    NOTE: working block by block keeps every temporary below glibc's mmap threshold (32 MB)
    and in cache; one (T, K, D) gather would be a fresh, page-faulted buffer every step.
    """
    T, K = perm.inv_TK.shape
    step = max(1, CHUNK_BYTES // max(1, K * row_bytes))
    return [(t, min(t + step, T)) for t in range(0, T, step)]


def _with_zero_row(rows_ND: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """Dropped pairs point at row N: append a zero row for them (only when there are drops)."""
    if not perm.has_drops:
        return rows_ND
    return torch.cat([rows_ND, rows_ND.new_zeros(1, rows_ND.shape[1])])


def _gather_pairs(rows_ND: torch.Tensor, perm: Permutation, t0: int, t1: int) -> torch.Tensor:
    """rows_tKD[t, k] = rows_ND[inv_TK[t0 + t, k]] for tokens t0..t1 (rows_ND from _with_zero_row)."""
    return rows_ND.index_select(0, perm.inv_TK[t0:t1].reshape(-1)).view(t1 - t0, perm.inv_TK.shape[1], -1)


class _Permute(torch.autograd.Function):
    """x_ND = x_TD[token_N]; backward: grad_x_TD = sum over k of grad rows, in fp32."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, perm: Permutation) -> torch.Tensor:  # noqa: D102
        ctx.perm = perm
        return x_TD.index_select(0, perm.token_N)

    @staticmethod
    def backward(ctx, g_ND: torch.Tensor):  # noqa: D102
        perm = ctx.perm
        g_rows = _with_zero_row(g_ND, perm)
        g_TD = g_ND.new_empty(perm.inv_TK.shape[0], g_ND.shape[1])
        for t0, t1 in _token_chunks(perm, g_ND.shape[1] * g_ND.element_size()):
            g_TD[t0:t1] = _gather_pairs(g_rows, perm, t0, t1).sum(1, dtype=torch.float32)
        return g_TD, None


class _Combine(torch.autograd.Function):
    """y_TD[t] = sum_k w_TK[t, k] * y_ND[inv_TK[t, k]] as one (1 x K) @ (K x D) matmul per token."""

    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, w_TK: torch.Tensor, perm: Permutation) -> torch.Tensor:  # noqa: D102
        w_T1K = w_TK.to(y_ND.dtype).unsqueeze(1)
        y_rows = _with_zero_row(y_ND, perm)
        y_TD = y_ND.new_empty(w_TK.shape[0], y_ND.shape[1])
        for t0, t1 in _token_chunks(perm, y_ND.shape[1] * y_ND.element_size()):
            # (t, 1, K) @ (t, K, D) -> (t, 1, D)
            torch.bmm(w_T1K[t0:t1], _gather_pairs(y_rows, perm, t0, t1), out=y_TD[t0:t1].unsqueeze(1))
        ctx.save_for_backward(y_ND, w_T1K)
        ctx.perm, ctx.w_dtype = perm, w_TK.dtype
        return y_TD

    @staticmethod
    def backward(ctx, g_TD: torch.Tensor):  # noqa: D102
        y_ND, w_T1K = ctx.saved_tensors
        perm = ctx.perm
        g_TD = g_TD.to(y_ND.dtype).contiguous()
        y_rows = _with_zero_row(y_ND, perm)
        gw_TK = g_TD.new_empty(perm.inv_TK.shape)
        for t0, t1 in _token_chunks(perm, y_ND.shape[1] * y_ND.element_size()):
            # (t, K, D) @ (t, D, 1) -> (t, K, 1): d loss / d w = <expert output, token grad>
            torch.bmm(_gather_pairs(y_rows, perm, t0, t1), g_TD[t0:t1].unsqueeze(2), out=gw_TK[t0:t1].unsqueeze(2))
        # grad of row n = w of its pair * grad of its token: one gather, scaled in place
        w_N = w_T1K.reshape(-1).index_select(0, perm.choice_N)
        g_ND = g_TD.index_select(0, perm.token_N).mul_(w_N.unsqueeze(1))
        return g_ND, gw_TK.to(ctx.w_dtype), None


def permute(x_TD: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """x_ND: row n is the token that sorted pair n came from."""
    return _Permute.apply(x_TD, perm)


def unpermute(y_ND: torch.Tensor, perm: Permutation, topk_w_TK: torch.Tensor) -> torch.Tensor:
    """y_TD = sum over each token's kept choices of weight * expert output (0 if all dropped).

    NOTE: returns y_ND's dtype. Under bf16 autocast the K-sum accumulates in fp32 inside the
    batched matmul and the result is rounded to bf16 once, like any autocast matmul output.
    """
    return _Combine.apply(y_ND, topk_w_TK, perm)
