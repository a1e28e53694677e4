"""The key/value cache of generation: each attention layer's keys and values of every position
seen so far, so that a new token attends to them without recomputing the context.

Shape key: B batch, S new positions, P positions held (past and new), C capacity (the most
positions the cache can hold), N key/value heads (G of standard attention, H of MLA), Dk key
dims, Dv value dims.

Every layer's cache holds the same positions: the model writes S new positions into all of
them in one forward, then `KVCache.length` moves on by S (it is the next token's position).
Storage is allocated once per layer, at its first write, for C positions (bounded by the
model's max_seq_len: past it generation starts again from an empty cache, see
Transformer.generate), so a step copies only its own S positions.
"""

from __future__ import annotations

import torch


class LayerCache:
    """One attention layer's keys k_BNCDk and values v_BNCDv; positions [0, length) are filled."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.k_BNCDk: torch.Tensor | None = None
        self.v_BNCDv: torch.Tensor | None = None

    def extend(self, k_BNSDk: torch.Tensor, v_BNSDv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append S positions; returns the keys k_BNPDk and values v_BNPDv of all P held now
        (views into the cache: read them before the next extend)."""
        B, N, S, Dk = k_BNSDk.shape
        end = self.length + S
        if end > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} positions ({self.length} filled), no room for "
                             f"{S} more; build it with a larger capacity (at most model.max_seq_len)")  # fmt: skip
        if self.k_BNCDk is None:  # the first write fixes batch, heads, dims, dtype (autocast's) and device
            self.k_BNCDk = k_BNSDk.new_empty(B, N, self.capacity, Dk)
            self.v_BNCDv = v_BNSDv.new_empty(B, N, self.capacity, v_BNSDv.shape[-1])
        self.k_BNCDk[:, :, self.length : end] = k_BNSDk
        self.v_BNCDv[:, :, self.length : end] = v_BNSDv
        self.length = end
        return self.k_BNCDk[:, :, :end], self.v_BNCDv[:, :, :end]


class KVCache:
    """The caches of a model's attention layers, in block order, all holding the same positions."""

    def __init__(self, n_layers: int, capacity: int):
        if n_layers < 1 or capacity < 1:
            raise ValueError(f"a KV cache needs at least one layer and one position, got {n_layers} and {capacity}")
        self.layers = [LayerCache(capacity) for _ in range(n_layers)]

    @property
    def length(self) -> int:
        """Positions held: the position the next token takes."""
        return self.layers[0].length

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity
