"""Local Hugging Face datasets (the `datasets` library) as data: `prepare` reads parquet, arrow and
save_to_disk INPUTs into the same shards whatever the format, each split the `datasets` library's
own reading of the rows; data=hf draws the same token streams as data=jsonl over the same
documents; a path, folder or column that cannot be read is one line, exit 2, before ranks start."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from epmoe.config import DataConfig
from epmoe.data.__main__ import main as data_main
from epmoe.data.documents import is_val
from epmoe.data.prepare import PrepareOptions, prepare
from epmoe.data.shards import METADATA, open_split, read_metadata
from epmoe.train.cli import load_config
from epmoe.train.data import DataError, check_source, fingerprint, load_splits
from epmoe.train.trainer import train
from tests.conftest import REPO, TINY, run_cli
from tests.hf_tiny import save_tokenizer

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")

# an empty document is left out by prepare and kept (as in jsonl) by data=hf
DOCS = [f"def f_{i}(x):\n    return x * {i} + {i % 7}  # é, ü and 字\n" * (1 + i % 4) for i in range(47)] + [""]
VAL = 0.2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """DOCS as jsonl, parquet, arrow (an IPC stream, as datasets writes), a save_to_disk folder, a
    DatasetDict folder (train = DOCS) and a folder of two parquet shards; datasets' cache in the test's
    own folder."""
    root = tmp_path_factory.mktemp("hf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(root / "cache"))
        ds = datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))})
        (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
        ds.to_parquet(str(root / "corpus.parquet"))
        with pa.OSFile(str(root / "corpus.arrow"), "wb") as f, pa.ipc.new_stream(f, ds.data.schema) as w:
            w.write_table(ds.data.table)
        ds.save_to_disk(str(root / "saved" / "corpus"))
        other = datasets.Dataset.from_dict({"text": ["held out by the dataset itself"], "n": [0]})
        datasets.DatasetDict({"train": ds, "validation": other}).save_to_disk(str(root / "dict" / "corpus"))
        (root / "shards").mkdir()
        ds.select(range(20)).to_parquet(str(root / "shards" / "part-0.parquet"))
        ds.select(range(20, len(DOCS))).to_parquet(str(root / "shards" / "part-1.parquet"))
        yield {p.name if p.parent == root else p.parent.name: p for p in
               [root / "corpus.jsonl", root / "corpus.parquet", root / "corpus.arrow", root / "saved" / "corpus",
                root / "dict" / "corpus", root / "shards"]}  # fmt: skip


@pytest.fixture(autouse=True)
def _cache(corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(corpus["corpus.jsonl"].parent / "cache"))


def _prepare(inputs: list[Path], out: Path, **kw) -> Path:
    prepare(PrepareOptions(tokenizer="bytes", out=out, inputs=inputs, val_fraction=VAL, progress=False, **kw))
    return out


def _shard_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != METADATA}


def _split_counts(folder: Path) -> dict:
    return json.loads((folder / METADATA).read_text())["splits"]


FORMATS = ["corpus.parquet", "corpus.arrow", "saved", "dict"]


def test_prepare_reads_every_format_into_the_same_shards(corpus: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    reference = _prepare([corpus["corpus.parquet"]], tmp_path / "reference")
    monkeypatch.setattr("epmoe.data.documents.TASK_BYTES", 300)  # many row ranges, over two worker processes
    for name in FORMATS:
        out = _prepare([corpus[name]], tmp_path / name, workers=2)
        assert _shard_files(out) == _shard_files(reference), name  # byte for byte
        assert _split_counts(out) == _split_counts(reference), name
    # the same documents as JSON lines: named by byte offset, so split otherwise, but the same
    # documents, tokens and bytes in all
    lines = _prepare([corpus["corpus.jsonl"]], tmp_path / "jsonl")
    totals = [{k: sum(s[k] for s in _split_counts(f).values()) for k in ("documents", "tokens", "bytes")}
              for f in (lines, reference)]  # fmt: skip
    assert totals[0] == totals[1] and totals[0]["documents"] == len(DOCS) - 1  # the empty document is left out
    assert Counter(_documents(lines)) == Counter(_documents(reference))


def _documents(folder: Path) -> list[bytes]:
    meta = read_metadata(folder)
    docs = []
    for split in ("train", "val"):
        raw = bytes(open_split(folder, meta, split)[:].numpy().astype(np.uint8))
        docs += raw.split(b"\0")[:-1]  # bytes-level shards: NUL after every document
    return docs


def test_each_split_is_the_datasets_librarys_own_rows_named_by_row(corpus: dict[str, Path], tmp_path: Path) -> None:
    out = _prepare([corpus["corpus.parquet"]], tmp_path / "out")
    texts = datasets.load_dataset("parquet", data_files=[str(corpus["corpus.parquet"])], split="train")["text"]
    meta = read_metadata(out)
    for split in ("train", "val"):
        chosen = [t.encode() for i, t in enumerate(texts) if t and is_val(f"corpus@{i}", VAL) == (split == "val")]
        assert chosen  # both splits hold documents
        assert bytes(open_split(out, meta, split)[:].numpy().astype(np.uint8)) == b"".join(d + b"\0" for d in chosen)


def test_a_folder_holding_a_saved_dataset_reads_it_once_beside_its_text(corpus: dict[str, Path],
                                                                         tmp_path: Path) -> None:  # fmt: skip
    # the saved folder's own files (its .arrow, state.json) are read through the dataset, never as text
    out = _prepare([corpus["saved"].parent], tmp_path / "out")
    assert sum(s["documents"] for s in _split_counts(out).values()) == len(DOCS) - 1


def _cfg(kind: str, path: Path, **kw) -> DataConfig:
    return DataConfig(kind=kind, path=str(path), seq_len=16, val_fraction=VAL, **kw)


@pytest.mark.parametrize("name", ["corpus.parquet", "corpus.arrow", "saved", "dict", "shards"])
def test_data_hf_draws_the_same_streams_as_jsonl(corpus: dict[str, Path], name: str) -> None:
    lines = load_splits(_cfg("jsonl", corpus["corpus.jsonl"]), 256)
    table = load_splits(_cfg("hf", corpus[name]), 256)
    assert torch.equal(table.train, lines.train) and torch.equal(table.val, lines.val)
    assert len(table.val) and table.val_bytes_per_token == lines.val_bytes_per_token
    assert table.boundary_id == lines.boundary_id == 0


def test_data_hf_reads_the_field_column_through_a_tokenizer(corpus: dict[str, Path], tmp_path: Path) -> None:
    tok = save_tokenizer(tmp_path / "tok", DOCS, 300)
    body = tmp_path / "body.parquet"
    datasets.Dataset.from_dict({"body": DOCS}).to_parquet(str(body))
    (lines_path := tmp_path / "body.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    lines = load_splits(_cfg("jsonl", lines_path, field="body", tokenizer=str(tok)), 300)
    table = load_splits(_cfg("hf", body, field="body", tokenizer=str(tok)), 300)
    assert torch.equal(table.train, lines.train) and torch.equal(table.val, lines.val)
    assert table.val_bytes_per_token == lines.val_bytes_per_token


def test_data_hf_trains_as_data_jsonl_does(corpus: dict[str, Path], tmp_path: Path) -> None:
    run = [*TINY, "train.steps=3", "train.eval_every=0", "train.sample_bytes=0", "logger.console=false",
           "train.precision=fp32", "data.seq_len=16"]  # fmt: skip
    lines = train(load_config([*run, "data=jsonl", f"data.path={corpus['corpus.jsonl']}"]), tmp_path / "jsonl")
    table = train(load_config([*run, "data=hf", f"data.path={corpus['saved']}"]), tmp_path / "hf")
    assert len(table.losses) == 3 and table.losses == lines.losses


def test_the_fingerprint_covers_the_datasets_files(corpus: dict[str, Path]) -> None:
    assert set(fingerprint(_cfg("hf", corpus["shards"]))["files"]) == {"part-0.parquet", "part-1.parquet"}
    assert {"state.json", "dataset_info.json"} <= set(fingerprint(_cfg("hf", corpus["saved"]))["files"])


def test_unusable_datasets_are_one_line(corpus: dict[str, Path], tmp_path: Path) -> None:
    (plain := tmp_path / "plain").mkdir()
    (plain / "notes.txt").write_text("not a dataset")
    (both := tmp_path / "both").mkdir()
    for f in ("corpus.parquet", "corpus.arrow"):
        (both / f).write_bytes(corpus[f].read_bytes())
    (torn := tmp_path / "torn.parquet").write_bytes(b"PAR1")
    cases = [
        (tmp_path / "absent", "text", f"data.path {tmp_path / 'absent'} does not exist"),
        (plain, "text", f"data.path {plain} is not a dataset: no dataset_info.json and state.json (a save_to_disk "
                        "folder) and no .parquet or .arrow files under it; point data.path at one"),
        (plain / "notes.txt", "text", "data.kind=hf reads .parquet or .arrow files or save_to_disk folders; "
                                      f"{plain / 'notes.txt'} is neither (data=text and data=jsonl read other files)"),
        (corpus["saved"], "body", f"no 'body' column in the saved dataset {corpus['saved']} (its columns: text, n); "
                                  "choose the text column with data.field"),
        (corpus["corpus.parquet"], "n", f"column 'n' of {corpus['corpus.parquet']} holds int64, not text; choose a "
                                        "string column with data.field"),
        (both, "text", f"data.path {both} holds both .parquet and .arrow files; data.kind=hf reads one table of one "
                       "format: point data.path at a file or a folder of one format"),
        (torn, "text", f"{torn} is not a readable parquet file ("),
    ]  # fmt: skip
    for path, field, expected in cases:
        with pytest.raises(DataError) as e:
            check_source(_cfg("hf", path, field=field))
        assert str(e.value).startswith(expected) and "\n" not in str(e.value), str(e.value)


def test_prepare_refuses_unusable_datasets_in_one_line(corpus: dict[str, Path], tmp_path: Path, capsys) -> None:
    (no_train := tmp_path / "no_train").mkdir()
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(no_train))
    datasets.Dataset.from_dict({"text": ["a", None]}).to_parquet(str(nulls := tmp_path / "nulls.parquet"))
    base = ["prepare", "--tokenizer", "bytes", "--out", str(tmp_path / "out"), "--no-progress"]
    cases = [
        ([*base, "--field", "body", str(corpus["corpus.arrow"])],
         f"error: no 'body' column in {corpus['corpus.arrow']} (its columns: text, n); choose the text column "
         "with --field"),
        ([*base, str(no_train)], f"error: {no_train} is a DatasetDict without a 'train' split (its splits: "
                                 f"validation); name one split's folder, e.g. {no_train / 'validation'}"),
        ([*base, str(nulls)], f"error: {nulls}: the 'text' column of row 1 is null, not text; drop or fill such rows"),
    ]  # fmt: skip
    capsys.readouterr()  # save_to_disk's progress bar
    for argv, expected in cases:
        assert data_main(argv) == 2
        assert capsys.readouterr().err.splitlines() == [expected]
    assert not (tmp_path / "out").exists()


def test_the_command_line_refuses_a_missing_column_before_training(corpus: dict[str, Path], tmp_path: Path) -> None:
    proc = run_cli(*TINY, "data=hf", f"data.path={corpus['shards']}", "data.field=body",
                   f"hydra.run.dir={tmp_path}/run", cwd=REPO, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [f"error: no 'body' column in the 2 parquet files of {corpus['shards']} "
                                        "(its columns: text, n); choose the text column with data.field"]  # fmt: skip
