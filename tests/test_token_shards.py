"""data=tokens: prepared shards are memory-mapped and read a window at a time (memory stays flat
on a shard larger than what may be resident), batches are the same pure function of (seed, step)
as for every source, bits/byte comes from the metadata's bytes, and shards that do not match their
metadata, their tokenizer or the model are refused in one line — before ranks start."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from epmoe.config import DataConfig
from epmoe.data.__main__ import main
from epmoe.data.errors import DataError
from epmoe.data.shards import METADATA, Metadata, ShardWriter, TokenizerInfo, read_metadata
from epmoe.launch.__main__ import check as launch_check
from epmoe.train.cli import load_config
from epmoe.train.data import check_source, fingerprint, load_splits, sample_batch
from epmoe.train.trainer import train
from tests.conftest import REPO, TINY

pytest.importorskip("tokenizers")
DOCS = [f"class C{i}:\n    value = {i} * {i % 5}  # données, 字\n" * (1 + i % 4) for i in range(60)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a BPE tokenizer.json, the shard folder prepared with it)."""
    root = tmp_path_factory.mktemp("p")
    (corpus := root / "corpus").mkdir()
    for i, text in enumerate(DOCS):
        (corpus / f"{i:02d}.py").write_text(text)
    tok = root / "tokenizer.json"
    assert main(["train-tokenizer", "--vocab", "400", "--out", str(tok), "--no-progress", str(corpus)]) == 0
    assert main(["prepare", "--tokenizer", str(tok), "--out", str(root / "shards"), "--val-fraction", "0.2",
                 "--workers", "1", "--no-progress", str(corpus)]) == 0  # fmt: skip
    return tok, root / "shards"


def _copy(shards: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(shards, tmp_path / "copy"))


def _cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(kind="tokens", path=str(path), seq_len=16, **kw)


def test_reading_is_lazy_and_sampling_is_deterministic(prepared: tuple[Path, Path]) -> None:
    tok, shards = prepared
    meta = read_metadata(shards)
    splits = load_splits(_cfg(shards), meta.tokenizer.vocab_size)
    assert isinstance(splits.train.maps[0], np.memmap)  # mapped, never widened whole
    assert splits.val_bytes_per_token == meta.splits["val"].bytes / meta.splits["val"].tokens
    x_BS, y_BS = sample_batch(splits.train, 4, 16, seed=3, stream=0, step=7)
    again = sample_batch(load_splits(_cfg(shards), 400).train, 4, 16, seed=3, stream=0, step=7)
    assert torch.equal(x_BS, again[0]) and torch.equal(y_BS, again[1]) and x_BS.dtype == torch.int64
    assert torch.equal(x_BS[:, 1:], y_BS[:, :-1])
    # a window is a slice of the split's stream
    whole = splits.train[:]
    start = next(s for s in range(len(whole) - 16) if torch.equal(whole[s : s + 16], x_BS[0]))
    assert torch.equal(whole[start + 1 : start + 17], y_BS[0])
    assert splits.tokenizer is None  # no data.tokenizer: ids without text
    fp = fingerprint(_cfg(shards))
    assert set(fp["files"]) == {p.name for p in shards.iterdir()}


LAZY_SCRIPT = """
import sys
from pathlib import Path
import numpy as np
from epmoe.config import DataConfig
from epmoe.train.data import load_splits, sample_batch

def anon_kib():  # this process's private resident memory (RssAnon): what reading allocates
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssAnon:"))
    return int(line.split()[1])

before = anon_kib()
splits = load_splits(DataConfig(kind="tokens", path=sys.argv[1], seq_len=256), 1000)
for step in range(50):
    x, y = sample_batch(splits.train, 16, 256, seed=0, stream=0, step=step)
    assert int(x.max()) < 1000
grown = anon_kib() - before
whole = np.array(splits.train.maps[0])  # the control: what reading the shard whole costs
print(len(splits.train), grown, anon_kib() - before - grown)
"""


def test_a_shard_larger_than_the_allowed_resident_memory_is_sampled_within_it(tmp_path: Path) -> None:
    """96 MiB of uint16 tokens (384 MiB widened to int64, as data=bin reads its file); 50 batches of
    16 x 257 tokens copy 800 windows (under 2 MiB as int64). The bound, 16 MiB of growth of the
    private resident memory, leaves room for allocator noise and fails for any read of the whole
    shard (the control copies it once and must exceed it). Private memory (RssAnon), because the
    mapped file's pages are page cache that the kernel shares between ranks and drops under
    pressure; a fault maps a whole cached folio (here ~128 KiB each), so RssFile says little about
    what was read."""
    n_tokens, chunk = 48 << 20, 4 << 20
    writer = ShardWriter(tmp_path, "train", np.dtype(np.uint16), "ab" * 32, shard_tokens=n_tokens)
    for start in range(0, n_tokens, chunk):
        writer.add((np.arange(start, start + chunk) % 1000).astype(np.uint16), np.array([chunk]), np.array([chunk]))
    val = ShardWriter(tmp_path, "val", np.dtype(np.uint16), "ab" * 32, shard_tokens=n_tokens)
    val.add(np.arange(4096, dtype=np.uint16) % 1000, np.array([4096]), np.array([4096]))
    meta = Metadata(TokenizerInfo("synthetic", "ab" * 32, 1000, 999), "uint16", 0.05,
                    {"train": writer.finish(), "val": val.finish()})  # fmt: skip
    (tmp_path / METADATA).write_text(meta.to_json())
    proc = subprocess.run([sys.executable, "-c", LAZY_SCRIPT, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    tokens, growth_kib, control_kib = map(int, proc.stdout.split())
    assert tokens == n_tokens and (tmp_path / "train-00000.bin").stat().st_size > 96 << 20
    assert growth_kib < 16 << 10 < control_kib, f"sampling grew private memory by {growth_kib} KiB"


def test_three_steps_train_on_shards_and_report_bits_per_byte_from_the_metadata(prepared: tuple[Path, Path],
                                                                                tmp_path: Path) -> None:  # fmt: skip
    tok, shards = prepared
    meta = read_metadata(shards)
    cfg = load_config([*TINY, "data=tokens", f"data.path={shards}", f"data.tokenizer={tok}", "train.steps=3",
                       f"model.vocab_size={meta.tokenizer.vocab_size}", "train.eval_batches=1"])  # fmt: skip
    result = train(cfg, tmp_path / "run")
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    bytes_per_token = meta.splits["val"].bytes / meta.splits["val"].tokens  # by hand, from the metadata
    assert bytes_per_token > 1.5  # BPE merges: per token is not per byte
    assert result.val_bpb == pytest.approx(result.val_loss / math.log(2) / bytes_per_token, rel=1e-12)
    final = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["val_bpb"] == pytest.approx(result.val_bpb, rel=1e-9)


def _one_line(error: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_model_vocab_below_the_tokenizers_is_refused_before_ranks_start(prepared: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:  # fmt: skip
    shards = prepared[1]
    vocab = read_metadata(shards).tokenizer.vocab_size
    with pytest.raises(DataError) as e:
        launch_check([*TINY, "data=tokens", f"data.path={shards}", "model.vocab_size=300",
                      f"hydra.run.dir={tmp_path / 'run'}"])  # fmt: skip
    assert _one_line(e).endswith(f"(vocab {vocab}), beyond model.vocab_size (300); set model.vocab_size={vocab}")
    assert not (tmp_path / "run").exists()


def test_a_data_tokenizer_other_than_the_shards_is_refused(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text(prepared[0].read_text().replace('"<|endoftext|>"', '"<|end|>"'))
    with pytest.raises(DataError, match=r"is not the tokenizer .* was prepared with .* name that one or drop"):
        load_splits(_cfg(prepared[1], tokenizer=str(other)), 400)


def test_shards_of_another_tokenizer_in_the_folder_are_refused(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    shards = _copy(prepared[1], tmp_path)
    (corpus := tmp_path / "c").mkdir()
    for i in range(20):
        (corpus / f"{i}.txt").write_text(DOCS[i])
    assert main(["prepare", "--tokenizer", "bytes", "--out", str(tmp_path / "b"), "--workers", "1", "--no-progress",
                 "--val-fraction", "0.3", str(corpus)]) == 0  # fmt: skip
    shutil.copy(tmp_path / "b" / "train-00000.bin", shards / "train-00001.bin")  # an extra shard
    with pytest.raises(DataError) as e:
        launch_check([*TINY, "data=tokens", f"data.path={shards}", "model.vocab_size=400",
                      f"hydra.run.dir={tmp_path / 'run'}"])  # fmt: skip
    assert f"{shards} mixes shards of different tokenizers: train-00001.bin was written with tokenizer sha256 " \
           f"000000000000, {METADATA} says" in _one_line(e)  # fmt: skip
    (shards / "train-00001.bin").replace(shards / "train-00000.bin")  # a listed shard replaced
    with pytest.raises(DataError, match=r"mixes shards of different tokenizers: train-00000.bin"):
        check_source(_cfg(shards))


@pytest.mark.parametrize("damage", ["truncated", "flipped", "unlisted", "offsets", "no_metadata", "not_metadata"])
def test_shards_that_do_not_match_their_metadata_are_one_line(prepared: tuple[Path, Path], tmp_path: Path,
                                                              damage: str) -> None:  # fmt: skip
    shards = _copy(prepared[1], tmp_path)
    shard = shards / "train-00000.bin"
    raw = bytearray(shard.read_bytes())
    if damage == "truncated":
        shard.write_bytes(raw[:-2])
        expected = rf"{shard} does not match {METADATA}: {len(raw) - 2:,} bytes holding"
    elif damage == "flipped":  # the sizes agree: only the sha256 (hashed at load for small shards) sees it
        raw[100] ^= 1
        shard.write_bytes(raw)
        check_source(_cfg(shards))  # the cheap check passes
        expected = rf"{shard} does not match {METADATA}: sha256 \w+, the metadata says \w+ \(a corrupt or replaced"
    elif damage == "unlisted":
        shutil.copy(shard, shards / "train-00009.bin")
        expected = rf"{shards / 'train-00009.bin'} is not listed in {METADATA}: the metadata does not match"
    elif damage == "offsets":
        np.save(shards / "train-00000.docs.npy", np.zeros(3, dtype=np.uint64))
        expected = r"train-00000.docs.npy does not match metadata.json: \(3,\) offsets, for"
    elif damage == "no_metadata":
        (shards / METADATA).unlink()
        expected = rf"data.path {shards} holds no {METADATA}: point it at the --out folder of"
    else:
        (shards / METADATA).write_text('{"format": "epmoe-token-shards", "version": 1}')
        expected = r"cannot be read as token-shard metadata \(KeyError: 'splits'\); prepare the corpus again"
    with pytest.raises(DataError, match=expected) as e:
        load_splits(_cfg(shards), 400)
    _one_line(e)
    assert main(["verify", str(shards)]) == 2  # the CLI agrees: exit 2


def test_config_rules_for_tokens(prepared: tuple[Path, Path]) -> None:
    from epmoe.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.kind=tokens needs data.path"):
        load_config(["data=tokens"])
    cfg = load_config(["data=tokens", f"data.path={prepared[1]}", "model.vocab_size=200"])  # no byte-level minimum
    assert (cfg.data.kind, cfg.model.vocab_size) == ("tokens", 200)
    with pytest.raises(DataError, match=r"data.kind=tokens needs the folder `python -m epmoe.data prepare --out`"):
        check_source(_cfg(prepared[1] / METADATA))
