"""`python -m epmoe.data prepare | train-tokenizer`: the shards hold exactly the tokenizer's own
encoding of each document with one EOS after it (uint16 and uint32 ids), the train/val split is by
document, deterministic and independent of the number of workers, the bytes behind bits/byte are
the documents' own, and bad input is one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from epmoe.data import documents
from epmoe.data.__main__ import main
from epmoe.data.documents import is_val
from epmoe.data.shards import SPLITS, Metadata, document, open_split, read_metadata
from epmoe.data.tokenizer import load_tokenizer

tokenizers = pytest.importorskip("tokenizers")
VAL_FRACTION = 0.25
TEXTS = [f"def f_{i}(x):\n    return x * {i} + {i % 7}  # é, ü and 字 too\n" * (1 + i % 3) for i in range(40)]
LINES = [f"line {i}: the quick brown fox {'jumps ' * (i % 4)}over the lazy dog" for i in range(40)]


def _corpus(root: Path) -> tuple[Path, Path]:
    """A folder of 40 text files (one hidden, one empty) and a JSON-lines file of 40 documents."""
    folder = root / "corpus"
    folder.mkdir()
    for i, text in enumerate(TEXTS):
        (folder / f"doc_{i:02d}.txt").write_text(text)
    (folder / ".hidden.txt").write_text("never read")
    (folder / "empty.txt").write_text("")  # no document
    jsonl = root / "lines.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(LINES)) + "\n")
    return folder, jsonl


def _named_docs(folder: Path, jsonl: Path) -> list[tuple[str, str]]:
    """(name, text) of every document in prepare's order: the folder's files sorted, then the lines,
    each named by its byte offset."""
    docs = [(f"doc_{i:02d}.txt", t) for i, t in enumerate(TEXTS)]
    offset = 0
    for line in jsonl.read_bytes().split(b"\n"):
        if line:
            docs.append((f"{jsonl.name}@{offset}", json.loads(line)["body"]))
        offset += len(line) + 1
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _corpus(tmp_path_factory.mktemp("c"))


@pytest.fixture(scope="module")
def bpe(corpus: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    assert main(["train-tokenizer", "--vocab", "500", "--out", str(out), "--no-progress", *map(str, corpus),
                 "--field", "body"]) == 0  # fmt: skip
    return out


def _prepare(tokenizer: Path | str, out: Path, inputs: list[Path], *extra: str) -> Metadata:
    args = ["prepare", "--tokenizer", str(tokenizer), "--out", str(out), "--no-progress", "--field", "body",
            "--val-fraction", str(VAL_FRACTION), *extra, *map(str, inputs)]  # fmt: skip
    assert main(args) == 0
    return read_metadata(out)


def _expected(lib, named_docs: list[tuple[str, str]], eos: int) -> dict[str, list[int]]:
    """Each split's stream as the tokenizers library encodes it: each document's ids, then EOS."""
    out = {s: [] for s in SPLITS}
    for name, text in named_docs:
        out["val" if is_val(name, VAL_FRACTION) else "train"] += [*lib.encode(text, add_special_tokens=False).ids, eos]
    return out


def test_bpe_round_trip_is_the_tokenizers_own_encoding_in_uint16(bpe: Path, corpus: tuple[Path, Path],
                                                                 tmp_path: Path, monkeypatch) -> None:  # fmt: skip
    monkeypatch.setattr(documents, "TASK_BYTES", 2_000)  # many tasks: the pool's order is the files' order
    lib = tokenizers.Tokenizer.from_file(str(bpe))
    eos = lib.token_to_id("<|endoftext|>")
    assert load_tokenizer(str(bpe)).eos_id == eos  # train-tokenizer's EOS is the one epmoe's loader picks
    out = tmp_path / "shards"
    meta = _prepare(bpe, out, list(corpus), "--workers", "2", "--shard-tokens", "1500")
    assert meta.dtype == "uint16" and meta.tokenizer.vocab_size == lib.get_vocab_size() <= 500
    named = _named_docs(*corpus)
    expected = _expected(lib, named, eos)
    for split in SPLITS:
        stream = open_split(out, meta, split)
        assert stream[:].tolist() == expected[split]
        assert len(stream) == meta.splits[split].tokens == len(expected[split])
    assert len(meta.splits["train"].shards) > 1  # several shards, concatenated without a seam
    # document boundaries: the offsets find each document whole, EOS last
    first_val = next(t for n, t in named if is_val(n, VAL_FRACTION))
    assert document(out, meta, "val", 0, 0).tolist() == [*lib.encode(first_val, add_special_tokens=False).ids, eos]
    # the same shards from one worker (the split depends on names, not on the pool)
    again = _prepare(bpe, tmp_path / "again", list(corpus), "--workers", "1", "--shard-tokens", "1500")
    assert [s.sha256 for s in again.splits["train"].shards] == [s.sha256 for s in meta.splits["train"].shards]


def test_the_split_is_by_document_and_its_bytes_are_the_documents_own(bpe: Path, corpus: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:  # fmt: skip
    meta = _prepare(bpe, tmp_path / "shards", list(corpus))
    named = _named_docs(*corpus)
    val = [t for n, t in named if is_val(n, VAL_FRACTION)]
    train = [t for n, t in named if not is_val(n, VAL_FRACTION)]
    assert val and train and len(val) + len(train) == len(named) == 80  # the hidden and the empty file: no documents
    assert (meta.splits["val"].documents, meta.splits["train"].documents) == (len(val), len(train))
    # bits/byte's bytes: each document's UTF-8 bytes and one per EOS, by hand
    val_bytes = sum(len(t.encode()) + 1 for t in val)
    assert meta.splits["val"].bytes == val_bytes
    assert meta.splits["val"].bytes_per_token == val_bytes / meta.splits["val"].tokens
    assert meta.splits["train"].bytes == sum(len(t.encode()) + 1 for t in train)


def test_a_vocabulary_beyond_uint16_is_written_as_uint32(tmp_path: Path) -> None:
    from tokenizers import models, pre_tokenizers

    words = {"[UNK]": 0, "<|endoftext|>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tok = tokenizers.Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (corpus := tmp_path / "c").mkdir()
    texts = [" ".join(f"w{(i * 7919 + j * 104_729) % 70_000}" for j in range(50)) + " unknown" for i in range(30)]
    for i, text in enumerate(texts):
        (corpus / f"{i:02d}.txt").write_text(text)
    meta = _prepare(tmp_path / "tokenizer.json", tmp_path / "shards", [corpus], "--workers", "1")
    assert meta.dtype == "uint32" and meta.tokenizer.vocab_size == 70_002
    expected = _expected(tok, [(f"{i:02d}.txt", t) for i, t in enumerate(texts)], eos=1)
    streams = {s: open_split(tmp_path / "shards", meta, s)[:].tolist() for s in SPLITS}
    assert streams == expected and max(expected["train"]) > 65_535


def test_bytes_shards_are_uint8_and_the_documents_bytes(corpus: tuple[Path, Path], tmp_path: Path) -> None:
    meta = _prepare("bytes", tmp_path / "shards", [corpus[0]], "--workers", "1")
    assert meta.dtype == "uint8" and (meta.tokenizer.vocab_size, meta.tokenizer.eos_id) == (256, 0)
    train = [t.encode() + b"\0" for i, t in enumerate(TEXTS) if not is_val(f"doc_{i:02d}.txt", VAL_FRACTION)]
    assert bytes(open_split(tmp_path / "shards", meta, "train")[:].numpy().astype(np.uint8)) == b"".join(train)


def test_help_of_every_command(capsys) -> None:
    for argv in ([], ["prepare"], ["train-tokenizer"], ["verify"]):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--help"])
        assert exit_.value.code == 0 and "usage: python -m epmoe.data" in capsys.readouterr().out


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err.strip()


def test_bad_input_is_one_line_and_exit_2(bpe: Path, corpus: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    prepare = ["prepare", "--tokenizer", str(bpe), "--out", str(out), "--no-progress"]
    (empty := tmp_path / "empty").mkdir()
    (empty / "a.txt").write_text("")
    assert _error(capsys, [*prepare, str(empty)]) == (
        f"error: {empty} hold no documents (1 file(s), none with text); "
        "name the corpus's text or JSON-lines files or folders"
    )
    assert _error(capsys, [*prepare, str(tmp_path / "absent")]) == f"error: INPUT {tmp_path / 'absent'} does not exist"
    assert "is not a JSON object with a 'text' field; choose the field with --field" in _error(
        capsys, [*prepare, str(corpus[1])]
    )
    (binary := tmp_path / "bin").mkdir()
    (binary / "x.dat").write_bytes(b"ab\0cd")
    assert "x.dat is binary, not text (a NUL byte at byte 2)" in _error(capsys, [*prepare, str(binary)])
    (table := tmp_path / "table").mkdir()
    (table / "train.parquet").write_bytes(b"PAR1")
    assert "train.parquet is not a readable parquet file (" in _error(capsys, [*prepare, str(table)])
    (one := tmp_path / "one").mkdir()
    (one / "a.txt").write_text("only one document")
    assert "none of the 1 document(s) falls in the" in _error(capsys, [*prepare, str(one)])
    assert "--val-fraction 1.0 is not between 0 and 1" in _error(capsys, [*prepare, "--val-fraction", "1", str(one)])
    assert not out.exists() and not (tmp_path / "out.tmp").exists()  # nothing half-written is left
    (out / "keep").mkdir(parents=True)
    assert _error(capsys, [*prepare, str(corpus[0])]) == (
        f"error: --out {out} exists and is not an empty folder; remove it or choose another --out"
    )
    assert "holds no tokenizer.json" in _error(capsys, ["prepare", "--tokenizer", str(tmp_path), "--out",
                                                        str(tmp_path / "o2"), str(corpus[0])])  # fmt: skip
    assert "--vocab 100 is below 257" in _error(capsys, ["train-tokenizer", "--vocab", "100", "--out",
                                                         str(tmp_path / "t.json"), str(corpus[0])])  # fmt: skip
    assert "hold no documents" in _error(capsys, ["train-tokenizer", "--vocab", "300", "--out",
                                                  str(tmp_path / "t.json"), str(empty)])  # fmt: skip
    assert not (tmp_path / "t.json").exists()
