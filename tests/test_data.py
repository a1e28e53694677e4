"""Data sources and batch sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from epmoe.config import DataConfig
from epmoe.train.data import DataError, _read_stdlib, load_splits, sample_batch


def test_stdlib_corpus_is_real_python_split_by_file_deterministically() -> None:
    cfg = DataConfig(kind="stdlib", val_fraction=0.05)
    a, b = load_splits(cfg, 256), load_splits(cfg, 256)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    n_files = len(_read_stdlib())
    assert n_files > 500
    total = len(a.train) + len(a.val)
    assert 0.01 < len(a.val) / total < 0.15  # about val_fraction of the bytes, whole files
    assert b"import " in bytes(a.train[:200_000].tolist())


def test_text_folder_splits_by_file(text_corpus: Path) -> None:
    splits = load_splits(DataConfig(kind="text", path=str(text_corpus), val_fraction=0.2), 256)
    val_text = bytes(splits.val.tolist()).decode()
    train_text = bytes(splits.train.tolist()).decode()
    val_names = {line.split("(")[0].rsplit("_", 1)[0] for line in val_text.split("\0")[0].splitlines()[:1]}
    assert val_names and all(name not in train_text for name in val_names)


def test_single_text_file_splits_by_position(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_bytes(bytes(range(32, 127)) * 10)  # 950 bytes
    splits = load_splits(DataConfig(kind="text", path=str(f), seq_len=32, val_fraction=0.1), 256)
    assert (len(splits.train), len(splits.val)) == (855, 95)
    assert bytes(splits.val.tolist()) == (bytes(range(32, 127)) * 10)[855:]


def test_jsonl_reads_the_text_field(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"doc {i} é"}) for i in range(50)))
    splits = load_splits(DataConfig(kind="jsonl", path=str(f), seq_len=8, val_fraction=0.2), 256)
    joined = bytes(torch.cat([splits.train, splits.val]).tolist())
    assert joined.count("é".encode()) == 50
    assert len(splits.train) + len(splits.val) == sum(len(f"doc {i} é".encode()) for i in range(50)) + 48


def test_bin_memmap_tokens_and_vocab_check(tmp_path: Path) -> None:
    f = tmp_path / "t.bin"
    np.arange(1000, dtype=np.uint16).tofile(f)
    splits = load_splits(DataConfig(kind="bin", path=str(f), seq_len=32, val_fraction=0.1), 1000)
    assert splits.train[-1].item() == 899 and splits.val[0].item() == 900
    with pytest.raises(DataError, match="token id 999 >= model.vocab_size \\(512\\)"):
        load_splits(DataConfig(kind="bin", path=str(f), seq_len=32, val_fraction=0.1), 512)


@pytest.mark.parametrize(
    ("kind", "content", "expected"),
    [
        ("text", b"\xff\xfe\x00bad", "is binary, not text (a NUL byte at byte 2)"),
        ("text", b"caf\xe9 au lait", "is not UTF-8 text (invalid continuation byte at byte 3)"),
        ("text", b"", "holds no text"),
        ("text", b"short", "has 5 tokens, too few to split into train and val with data.val_fraction=0.05"),
        ("text", b"x" * 400, "the val split has 20 tokens, fewer than data.seq_len + 1 (33) for one window; "
                             "add data, lower data.seq_len or raise data.val_fraction"),
        ("jsonl", b'{"text": "ok"}\n{"body": "x"}\n', ":2 is not a JSON object with a 'text' field"),
        ("jsonl", b'{"text": "ok"}\n\n{"text": "ok"\n', ":3 is not a JSON object with a 'text' field"),
        ("jsonl", b'["text"]\n', ":1 is not a JSON object with a 'text' field"),
        ("jsonl", b'{"text": 7}\n', ":1: the 'text' field is a int, not a string"),
        ("jsonl", b'{"text": "\\ud800"}\n', ":1: the 'text' field is not valid Unicode (surrogates not allowed)"),
        ("jsonl", b'{"text": "caf\xe9"}\n', ":1 is not UTF-8 text"),
        ("jsonl", b"\n\n", "holds no text"),
        ("bin", b"", "is empty; data.kind=bin needs a file of uint16 token ids"),
        ("bin", b"\x01\x00\x02", "has 3 bytes, an odd number: data.kind=bin reads uint16 token ids (2 bytes each)"),
        ("bin", np.full(500, 300, dtype=np.uint16).tobytes(), "holds token id 300 >= model.vocab_size (256)"),
        ("bin", np.ones(30, dtype=np.uint16).tobytes(), "the train split has 29 tokens, fewer than data.seq_len + 1"),
    ],
)  # fmt: skip
def test_bad_sources_are_clear_errors(tmp_path: Path, kind: str, content: bytes, expected: str) -> None:
    f = tmp_path / "f"
    f.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_splits(DataConfig(kind=kind, path=str(f), seq_len=32), 256)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_a_binary_file_in_a_text_folder_is_named(text_corpus: Path) -> None:
    (text_corpus / "sub").mkdir()
    (text_corpus / "sub" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(DataError, match=f"^{text_corpus / 'sub' / 'image.png'} is binary, not text"):
        load_splits(DataConfig(kind="text", path=str(text_corpus), seq_len=32), 256)


@pytest.mark.parametrize(
    ("kind", "make", "expected"),
    [
        ("text", lambda p: p.mkdir(), "is a folder without files; data.kind=text needs text files"),
        ("jsonl", lambda p: p.mkdir(), "data.kind=jsonl needs a file of JSON lines; "),
        ("bin", lambda p: p.mkdir(), "data.kind=bin needs a file of uint16 tokens; "),
    ],
)
def test_a_folder_where_a_file_is_needed_or_an_empty_folder(tmp_path: Path, kind: str, make, expected: str) -> None:
    make(tmp_path / "d")
    with pytest.raises(DataError, match=expected):
        load_splits(DataConfig(kind=kind, path=str(tmp_path / "d"), seq_len=32), 256)


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_splits(DataConfig(kind="text", path=str(tmp_path / "nope")), 256)


def test_sample_batch_is_deterministic_and_targets_are_shifted_inputs() -> None:
    tokens = torch.arange(10_000) % 251
    x1, y1 = sample_batch(tokens, 4, 16, seed=3, stream=0, step=7)
    x2, y2 = sample_batch(tokens, 4, 16, seed=3, stream=0, step=7)
    x3, _ = sample_batch(tokens, 4, 16, seed=3, stream=0, step=8)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert x1.shape == (4, 16) and torch.equal(x1[:, 1:], y1[:, :-1])
    assert torch.equal(y1, (x1 + 1) % 251)  # the corpus counts up, so each target is input + 1
