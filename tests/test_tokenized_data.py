"""Text tokenized by a Hugging Face tokenizer.json (an imported model's own): the token streams
equal the `tokenizers` library's own encoding of the documents, held-out bits are per byte of
text whatever the vocabulary, and a tokenizer that cannot serve the model is refused in one line."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from epmoe.config import ConfigError, DataConfig
from epmoe.train.cli import load_config
from epmoe.train.data import DataError, fingerprint, load_splits
from epmoe.train.manifest import data_source_changes
from tests.conftest import REPO, TINY
from tests.hf_tiny import save, save_tokenizer

tokenizers = pytest.importorskip("tokenizers")
VOCAB = 300  # byte-level BPE: 256 bytes, the EOS and 43 merges
DOCS = [f"def f_{i}(x):\n    return x * {i} + {i % 7}  # é, ü and 字 too\n" * (1 + i % 3) for i in range(60)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tokenizer(tmp_path_factory.mktemp("tok"), DOCS, VOCAB)


def _jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _documents(stream: torch.Tensor, eos: int) -> list[tuple[int, ...]]:
    ids, docs, cur = stream.tolist(), [], []
    for i in ids:
        if i == eos:
            docs.append(tuple(cur))
            cur = []
        else:
            cur.append(i)
    return [*docs, tuple(cur)]


def test_jsonl_documents_are_the_tokenizers_own_encoding_joined_by_eos(tok_dir: Path, tmp_path: Path) -> None:
    lib = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eos = lib.token_to_id("<|endoftext|>")
    splits = load_splits(DataConfig(kind="jsonl", path=str(_jsonl(tmp_path / "c.jsonl", DOCS)),
                                    tokenizer=str(tok_dir), seq_len=16, val_fraction=0.2), VOCAB)  # fmt: skip
    train, val = _documents(splits.train, eos), _documents(splits.val, eos)
    assert train and val  # split by document, every document whole in one split
    expected = Counter(tuple(lib.encode(d, add_special_tokens=False).ids) for d in DOCS)
    assert Counter(train) + Counter(val) == expected
    val_bytes = sum(len(d.encode()) for d in DOCS if tuple(lib.encode(d, add_special_tokens=False).ids) in set(val))
    # the bytes of the held-out text per token, a document boundary counting as one byte (NUL)
    assert splits.val_bytes_per_token == pytest.approx((val_bytes + len(val) - 1) / len(splits.val), rel=1e-12)
    assert lib.decode(list(val[0])) in DOCS and splits.tokenizer.decode(list(val[0])) == lib.decode(list(val[0]))


def test_eos_comes_from_tokenizer_config_json_before_known_names(tok_dir: Path, tmp_path: Path) -> None:
    folder = save_tokenizer(tmp_path / "t", DOCS, VOCAB, eos="<|im_end|>")  # not a known EOS name
    corpus = _jsonl(tmp_path / "c.jsonl", DOCS)
    cfg = DataConfig(kind="jsonl", path=str(corpus), tokenizer=str(folder), seq_len=16, val_fraction=0.2)
    with pytest.raises(DataError, match=r"names no end-of-document token .* add a tokenizer_config.json"):
        load_splits(cfg, VOCAB)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    eos = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id("<|im_end|>")
    assert (load_splits(cfg, VOCAB).val == eos).sum() >= 1


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("small_vocab", r"has token ids up to 299, beyond model.vocab_size \(280\); raise model.vocab_size to >= 300"),
        ("no_file", r"holds no tokenizer.json; give a tokenizer.json or a folder that holds one"),
        ("not_json", r"is not a tokenizer.json the tokenizers library reads"),
    ],
)
def test_a_tokenizer_that_cannot_serve_the_model_is_one_line(tok_dir: Path, tmp_path: Path, setup: str,
                                                             expected: str) -> None:  # fmt: skip
    tokenizer = {"small_vocab": tok_dir, "no_file": tmp_path}.get(setup)
    if setup == "not_json":
        (tokenizer := tmp_path / "tokenizer.json").write_text("{not json")
    cfg = DataConfig(kind="jsonl", path=str(_jsonl(tmp_path / "c.jsonl", DOCS)), tokenizer=str(tokenizer))
    with pytest.raises(DataError, match=expected) as e:
        load_splits(cfg, 280 if setup == "small_vocab" else VOCAB)
    assert "\n" not in str(e.value)


def test_config_rules_for_tokenizers(tok_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.kind=bin holds token ids already, so drop data.tokenizer"):
        load_config(["data=bin", "data.path=/x.bin", f"data.tokenizer={tok_dir}"])
    # a vocabulary below 256 is refused for bytes only: a tokenizer brings its own ids
    with pytest.raises(ConfigError, match=r"must be >= 256 for byte-level"):
        load_config(["model.vocab_size=200"])
    assert load_config(["model.vocab_size=200", f"data.tokenizer={tok_dir}"]).data.tokenizer == str(tok_dir)


def test_an_imported_folders_tokenizer_is_the_default_and_a_resume_notices_another(tmp_path: Path) -> None:
    hf_dir = save_tokenizer(save("qwen3_moe", tmp_path / "q", vocab_size=VOCAB), DOCS, VOCAB)
    cfg = load_config([f"train.init_from={hf_dir}", "data=text", f"data.path={tmp_path}"])
    assert cfg.data.tokenizer == str(hf_dir)
    assert load_config([f"train.init_from={hf_dir}", "data.tokenizer=null"]).data.tokenizer is None  # bytes, asked
    corpus = _jsonl(tmp_path / "c.jsonl", DOCS)
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(hf_dir / "tokenizer.json", copy / "tokenizer.json")
    imported, copied, as_bytes = (fingerprint(DataConfig(kind="jsonl", path=str(corpus), tokenizer=t))
                                  for t in (str(hf_dir), str(copy), None))  # fmt: skip
    assert data_source_changes(imported, imported) == []
    (change,) = data_source_changes(imported, as_bytes)
    assert change.startswith(f"data.tokenizer {hf_dir.resolve() / 'tokenizer.json'} (sha256 ")
    assert change.endswith("-> bytes (now)")
    # the same content at another path: the path is named, the hashes agree
    assert data_source_changes(imported, copied) and imported["tokenizer"]["sha256"] == copied["tokenizer"]["sha256"]


def test_an_imported_model_trains_on_its_tokenizer_and_reports_bits_per_byte(tmp_path: Path) -> None:
    text = "".join(DOCS)
    hf_dir = save_tokenizer(save("qwen3_moe", tmp_path / "q", vocab_size=VOCAB), DOCS, VOCAB)
    (tmp_path / "book.txt").write_text(text)  # one document: split by position
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true", "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "epmoe.train", f"train.init_from={hf_dir}", "data=text",
         f"data.path={tmp_path / 'book.txt'}", "data.seq_len=32", "train=smoke", "train.steps=2",
         "train.precision=fp32", "train.eval_batches=1", "train.sample_bytes=8", "logger.progress=false",
         "logger.plots=false", f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lib = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    bytes_per_token = len(text.encode()) / len(lib.encode(text, add_special_tokens=False).ids)
    assert bytes_per_token > 1.5  # BPE merges: a token is more than a byte, so per token != per byte
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["val_bpb"] == pytest.approx(final["val_loss"] / math.log(2) / bytes_per_token, rel=1e-9)
    assert f"{final['val_bpb']:.4f} bits/byte" in proc.stdout + proc.stderr


def test_a_tokenizer_too_big_for_the_model_is_refused_before_ranks_start(tok_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "epmoe.launch", *TINY, "model.vocab_size=260", f"data.tokenizer={tok_dir}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, env={**os.environ, "WANDB_SILENT": "true"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "beyond model.vocab_size (260)" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_bytes_that_are_not_utf8_are_encoded_as_replacement_characters(tok_dir: Path) -> None:
    from epmoe.data.tokenizer import load_tokenizer

    lib = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    encoded = load_tokenizer(str(tok_dir)).encode_docs([b"caf\xe9 au lait", b"x = 1"])  # latin-1, as in the stdlib
    eos = lib.token_to_id("<|endoftext|>")
    expected = [*lib.encode("caf\ufffd au lait", add_special_tokens=False).ids, eos, *lib.encode("x = 1").ids]
    assert encoded.tokens.tolist() == expected and encoded.n_bytes == 12 + 1 + 5  # raw bytes, the boundary one
