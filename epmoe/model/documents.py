"""Packed documents in a window: which document each position belongs to, its position within
that document, and the attention mask that keeps each document to itself (data.document_mask).

Shape key: B batch, S sequence length (queries), P positions attended to (keys; P = S here).

A training window is cut from a stream of documents joined by one boundary token (NUL in
byte-level data, the tokenizer's EOS otherwise: epmoe/data/tokenizer.py; token shards end every
document with EOS), so one window can hold the end of a document, whole documents and the start
of another. With the mask, a query attends only to the keys of its own document, causally (a
block-diagonal causal mask), and RoPE positions restart at 0 at each document's first token, so
every document is computed as if it were run alone (tests/test_document_mask.py).

Positions restart in every family epmoe implements: it is what Hugging Face packing does (the
`position_ids` of a flattened batch restart per sequence, and `transformers` derives its packed
mask from those restarts) and what Llama 3's packing does. With the plain RoPE that epmoe
implements (no scaling type is accepted: epmoe/hf/families.py) a score depends only on the
difference of two positions, so within one document restarting changes no score in exact
arithmetic; it keeps the rotations' angles as small as a document alone would have them, which
is what float rounding (bf16 most) sees.

The boundary token ends its document and belongs to it; the token after it starts the next one.
Everything here is index math on the batch, on the batch's device, with no host sync.
"""

from __future__ import annotations

import torch


def document_ids(tokens_BS: torch.Tensor, boundary_id: int) -> torch.Tensor:
    """doc_ids_BS (int64): per row, 0 for the window's first document, +1 after each boundary.

    The boundary token keeps the id of the document it ends: [a, b, EOS, c] -> [0, 0, 0, 1];
    a window that starts with a boundary ends a document there: [EOS, a] -> [0, 1]; two
    boundaries in a row make a one-token document: [a, EOS, EOS, b] -> [0, 0, 1, 2].
    """
    ends_BS = (tokens_BS == boundary_id).long()
    return ends_BS.cumsum(dim=1) - ends_BS  # boundaries strictly before each position


def document_positions(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """positions_BS (int64): each position's offset from the first position of its document (a
    document being a run of equal ids along S): [0, 0, 0, 1, 1] -> [0, 1, 2, 0, 1]."""
    S = doc_ids_BS.shape[1]
    index_BS = torch.arange(S, device=doc_ids_BS.device).expand_as(doc_ids_BS)
    starts_BS = torch.ones_like(doc_ids_BS, dtype=torch.bool)
    starts_BS[:, 1:] = doc_ids_BS[:, 1:] != doc_ids_BS[:, :-1]
    # the latest document start at or before each position: a running maximum of start indices
    first_BS = torch.where(starts_BS, index_BS, 0).cummax(dim=1).values
    return index_BS - first_BS


def document_mask(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """mask_B1SP (bool, P = S): query s may attend key p iff p <= s and both are in one document;
    the head dim is 1, for SDPA to broadcast over heads. Every query sees at least itself.
    NOTE: "one document" is equal ids, so ids must not repeat after a change (document_ids' never
    do); a repeated id would let a later document see an earlier one."""
    S = doc_ids_BS.shape[1]
    causal_SP = torch.ones(S, S, dtype=torch.bool, device=doc_ids_BS.device).tril()
    same_BSP = doc_ids_BS[:, :, None] == doc_ids_BS[:, None, :]
    return (same_BSP & causal_SP).unsqueeze(1)
