"""Document masking (data.document_mask): a packed window computes each of its documents as if it
ran alone (native model, Qwen3-MoE, DeepSeek-V3's MLA), and as `transformers` computes a packed
batch (its `position_ids` restarting per sequence); without the flag a document sees the one
before it; the document ids by hand; and training with the mask, in one process and under EP=2.

Shape key: B batch, S sequence length, V vocab.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from epmoe.config import ConfigError
from epmoe.model.documents import document_ids, document_mask, document_positions
from epmoe.model.transformer import Transformer
from epmoe.train.cli import load_config

from .conftest import TINY
from .ranks import spawn_jobs

EOS = 0  # the boundary token of byte-level data (NUL)
CONFIGS = {"native": [*TINY], "qwen3_moe": ["model=qwen3_moe_tiny"], "deepseek_v3": ["model=deepseek_v3_tiny"]}


def _packed_rows(vocab: int) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """tokens_BS (B 2, S 20) and each row's documents, each ended by EOS but a window's last.
    Row 0: three documents (5, 9, 6 tokens). Row 1 starts with a boundary (a document's end) and
    holds two boundaries in a row: documents of 1, 11, 1 and 7 tokens."""
    g = torch.Generator().manual_seed(0)

    def doc(n: int, ended: bool = True) -> torch.Tensor:
        body = torch.randint(1, vocab, (n - ended,), generator=g)  # no EOS inside a document
        return torch.cat([body, torch.tensor([EOS])]) if ended else body

    rows = [[doc(5), doc(9), doc(6, ended=False)], [doc(1), doc(11), doc(1), doc(7, ended=False)]]
    return torch.stack([torch.cat(r) for r in rows]), rows


def _model(overrides: list[str]) -> Transformer:
    cfg = load_config(overrides)
    torch.manual_seed(0)
    return Transformer(cfg.model, cfg.router).eval()


def _alone_logits(model: Transformer, docs: list[torch.Tensor]) -> torch.Tensor:
    """logits_SV of a row whose documents each ran by themselves."""
    return torch.cat([model(d[None]).logits_BSV[0] for d in docs])


def test_document_ids_and_positions_by_hand() -> None:
    a, b, c = 5, 6, 7
    cases = [  # tokens, document ids, positions
        ([a, b, EOS, c], [0, 0, 0, 1], [0, 1, 2, 0]),  # the boundary belongs to the document it ends
        ([a, b, c, EOS], [0, 0, 0, 0], [0, 1, 2, 3]),  # at the end: one document
        ([EOS, a, b, c], [0, 1, 1, 1], [0, 0, 1, 2]),  # at the start: the end of one, then the next
        ([a, EOS, EOS, b], [0, 0, 1, 2], [0, 1, 0, 0]),  # two in a row: a one-token document between
    ]
    tokens_BS = torch.tensor([t for t, _, _ in cases])  # each row on its own
    doc_ids_BS = document_ids(tokens_BS, EOS)
    assert doc_ids_BS.tolist() == [d for _, d, _ in cases]
    assert document_positions(doc_ids_BS).tolist() == [p for _, _, p in cases]
    # row 3 ([a, EOS, EOS, b]): query 1 sees 0..1, queries 2 and 3 only themselves
    assert document_mask(doc_ids_BS)[3, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_masked_window_equals_each_document_alone(name: str) -> None:
    model = _model(CONFIGS[name])
    tokens_BS, rows = _packed_rows(model.cfg.vocab_size)
    with torch.no_grad():
        packed_BSV = model(tokens_BS, doc_ids_BS=document_ids(tokens_BS, EOS)).logits_BSV
        plain_BSV = model(tokens_BS).logits_BSV
        for b, docs in enumerate(rows):
            alone_SV = _alone_logits(model, docs)
            assert (packed_BSV[b] - alone_SV).abs().max().item() <= 1e-5
            # without the mask the first document is the same, the later ones see those before them
            first = len(docs[0])
            assert (plain_BSV[b, :first] - alone_SV[:first]).abs().max().item() <= 1e-5
            assert (plain_BSV[b, first:] - alone_SV[first:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_masked_window_equals_transformers_packed_batch(family: str, tmp_path: Path) -> None:
    """transformers reads a packed batch from position_ids that restart per sequence (its
    masking_utils builds the block-diagonal mask from them): the reference of what we compute."""
    pytest.importorskip("transformers")
    from epmoe.hf import from_pretrained

    from .hf_tiny import save

    _, model = from_pretrained(save(family, tmp_path / family))
    reference = __import__("transformers").AutoModelForCausalLM.from_pretrained(tmp_path / family).eval()
    tokens_BS, _ = _packed_rows(96)
    doc_ids_BS = document_ids(tokens_BS, EOS)
    with torch.no_grad():
        ours_BSV = model.eval()(tokens_BS, doc_ids_BS=doc_ids_BS).logits_BSV
        theirs_BSV = reference(tokens_BS, position_ids=document_positions(doc_ids_BS), use_cache=False).logits
    assert (ours_BSV - theirs_BSV).abs().max().item() <= 1e-5


def test_a_forward_with_a_kv_cache_takes_no_document_ids() -> None:
    from epmoe.model.kv_cache import KVCache

    model = _model(CONFIGS["native"])
    tokens_BS = torch.tensor([[5, 6, EOS, 7]])
    with pytest.raises(ValueError, match="KV cache"):
        model(tokens_BS, KVCache(len(model.blocks), 8), doc_ids_BS=document_ids(tokens_BS, EOS))


def test_token_ids_without_a_boundary_refuse_the_mask() -> None:
    with pytest.raises(ConfigError, match="data.document_mask"):
        load_config(["data=bin", "data.path=tokens.bin", "data.document_mask=true"])


def _short_documents(path: Path) -> Path:
    """JSON lines of short documents (about 20 bytes): every 32-byte window crosses a boundary."""
    lines = [json.dumps({"text": f"x{i} = {i % 7} * y\n"}) for i in range(400)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_training_with_the_mask_trains_and_ep2_equals_one_process(tmp_path: Path) -> None:
    from epmoe.train.trainer import train

    base = [*TINY, "data=jsonl", f"data.path={_short_documents(tmp_path / 'docs.jsonl')}", "train.steps=6",
            "train.eval_every=0", "train.eval_batches=1", "train.sample_bytes=0", "router.aux_loss=batch"]  # fmt: skip
    ep = spawn_jobs(2, [([*base, "data.document_mask=true", "parallel.ep=2", "train.batch_size=2"], tmp_path / "ep")])
    masked = train(load_config([*base, "data.document_mask=true", "train.batch_size=4"]), tmp_path / "masked")
    plain = train(load_config([*base, "train.batch_size=4"]), tmp_path / "plain")

    assert len(masked.losses) == 6 and all(math.isfinite(x) for x in masked.losses)
    assert masked.losses[-1] < masked.losses[0]  # it trains
    assert all(abs(a - b) > 1e-4 for a, b in zip(masked.losses, plain.losses))  # the mask is on
    for step, (a, b) in enumerate(zip(masked.losses, ep[0]["losses"]), 1):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step}: one process {a} vs EP=2 {b}"
    assert ep[0]["val"] == pytest.approx(masked.val_loss, rel=1e-5)
