"""Token streams for training and validation, and deterministic batch sampling.

Byte-level by default (vocab 256, nothing downloaded), or tokenized by `data.tokenizer` (a
Hugging Face tokenizer.json; an imported model's own by default). Sources:
- `stdlib`: the `.py` files of the running Python's standard library (real text that every
  machine has), split into train/val by file;
- `text`: a text file (split by position) or a folder of text files (split by file);
- `jsonl`: one JSON object per line, its text in the `data.field` field (split by document);
- `hf`: a local Hugging Face dataset through the `datasets` library (epmoe/data/hf_datasets.py): a
  save_to_disk folder (a DatasetDict's train split), a .parquet or .arrow file, or a folder of such
  files of one format read as one table; a document per row, its text in the `data.field` column
  (split by document, a row named as its line in a JSON-lines export, so that the same documents
  as data=jsonl split alike and give the same streams);
- `bin`: a flat uint16 token memmap (split by position; vocab taken from the model);
- `tokens`: the token shards of `python -m epmoe.data prepare` (epmoe/data/shards.py), split by
  document when they were prepared; memory-mapped and read a window at a time.

Documents are joined by one boundary token (NUL; the tokenizer's EOS; token shards' EOS ends
every document), which `TokenSplits.boundary_id` names for data.document_mask
(epmoe/model/documents.py). The validation split's bytes per token turns its loss per token into
bits per byte (epmoe.data.tokenizer).

A batch depends only on (seed, split, step, micro-step), so a resumed run draws the same
batches as an uninterrupted one without storing a data position.

Shape key: B sequences, S sequence length.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from epmoe.config import DataConfig
from epmoe.data import shards
from epmoe.data.documents import is_val as _is_val
from epmoe.data.errors import DataError
from epmoe.data.hf_datasets import LocalDataset, is_dataset_file, is_saved_dataset
from epmoe.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_identity

# 1-D tokens that `len()` and `[a:b]` read: a tensor (uint8 bytes, int32 tokenizer ids, uint16 ids),
# or token shards' memory maps (data.kind=tokens); sample_batch widens only the windows it takes
Tokens = torch.Tensor | shards.TokenStream


@dataclass
class TokenSplits:
    train: Tokens
    val: Tokens
    description: str
    tokenizer: Tokenizer | None  # None for token ids without a known tokenizer (bin; tokens without data.tokenizer)
    val_bytes_per_token: float | None  # of the val split; None where the bytes are unknown (bin)
    boundary_id: int | None = None  # the token that ends a document; None where unknown (bin)


def _split_docs(
    named_docs: list[tuple[str, bytes]], val_fraction: float, what: str, tokenizer: Tokenizer
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """train tokens, val tokens and the val split's bytes per token; documents joined by the
    boundary token so that a window can see where one ends."""
    train = [d for n, d in named_docs if not _is_val(n, val_fraction)]
    val = [d for n, d in named_docs if _is_val(n, val_fraction)]
    if not val or not train:  # too few documents to split by name: split the stream by position
        every = tokenizer.encode_docs([d for _, d in named_docs])
        return *_split_position(every.tokens, val_fraction, what), every.n_bytes / len(every.tokens)
    held_out = tokenizer.encode_docs(val)
    return tokenizer.encode_docs(train).tokens, held_out.tokens, held_out.n_bytes / max(len(held_out.tokens), 1)


def _split_position(tokens: torch.Tensor, val_fraction: float, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    n_val = int(len(tokens) * val_fraction)
    if n_val == 0 or n_val == len(tokens):
        raise DataError(
            f"{what} has {len(tokens)} tokens, too few to split into train and val "
            f"with data.val_fraction={val_fraction}"
        )
    return tokens[:-n_val], tokens[-n_val:]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(root: Path) -> list[Path]:
    """The files `stdlib` reads: the standard library's `.py` files, site-packages left out."""
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def _read_stdlib() -> list[tuple[str, bytes]]:
    root = stdlib_root()
    return [(str(p.relative_to(root)), p.read_bytes()) for p in _stdlib_files(root)]


def _read_bytes(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except OSError as e:
        raise DataError(f"{p} cannot be read ({e.strerror or e})") from None


def _text_files(path: Path) -> list[Path]:
    """The files `text` reads: `path` itself, or every file under the folder `path`."""
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def _read_text(path: Path) -> list[tuple[str, bytes]]:
    try:
        files = _text_files(path)
    except OSError as e:
        raise DataError(f"data.path {path} cannot be listed ({e.strerror or e})") from None
    if not files:
        raise DataError(f"data.path {path} is a folder without files; data.kind=text needs text files")
    docs = []
    for p in files:
        raw = _read_bytes(p)
        if (nul := raw.find(b"\0")) >= 0:  # NUL also separates documents: text must not hold one
            raise DataError(f"{p} is binary, not text (a NUL byte at byte {nul}); data.kind=text reads text files only")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{p} is not UTF-8 text ({e.reason} at byte {e.start}); data.kind=text reads text files"
            ) from None
        docs.append((str(p.relative_to(path)) if path.is_dir() else p.name, raw))
    return docs


def _read_jsonl(path: Path, field: str) -> list[tuple[str, bytes]]:
    docs = []
    for line_no, line in enumerate(_read_bytes(path).split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)[field]
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{line_no} is not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
        except (ValueError, KeyError, TypeError, IndexError):  # not JSON, or not an object with the field
            raise DataError(f"{path}:{line_no} is not a JSON object with a {field!r} field") from None
        if not isinstance(text, str):
            raise DataError(f"{path}:{line_no}: the {field!r} field is a {type(text).__name__}, not a string")
        try:
            docs.append((f"{line_no}", text.encode("utf-8")))
        except UnicodeEncodeError as e:
            raise DataError(f"{path}:{line_no}: the {field!r} field is not valid Unicode ({e.reason})") from None
    return docs


def _hf_dataset(path: Path) -> LocalDataset:
    """data.kind=hf's table at `path`: a save_to_disk folder, a .parquet or .arrow file, or a folder
    of such files (recursively, sorted, names starting with "." left out), all of one format."""
    if path.is_file():
        if not is_dataset_file(path):
            raise DataError(f"data.kind=hf reads .parquet or .arrow files or save_to_disk folders; {path} is "
                            "neither (data=text and data=jsonl read other files)")  # fmt: skip
        return LocalDataset.of_file(path)
    if is_saved_dataset(path):
        return LocalDataset(path)
    try:
        files = sorted(p for p in path.rglob("*") if is_dataset_file(p) and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))  # fmt: skip
    except OSError as e:
        raise DataError(f"data.path {path} cannot be listed ({e.strerror or e})") from None
    if not files:
        raise DataError(f"data.path {path} is not a dataset: no dataset_info.json and state.json (a save_to_disk "
                        "folder) and no .parquet or .arrow files under it; point data.path at one")  # fmt: skip
    if saved := sorted({p.parent for p in files if is_saved_dataset(p.parent)}):
        raise DataError(f"data.path {path} holds the save_to_disk folder {saved[0]}; point data.path at that folder")
    if len({p.suffix for p in files}) > 1:
        raise DataError(f"data.path {path} holds both .parquet and .arrow files; data.kind=hf reads one table of "
                        "one format: point data.path at a file or a folder of one format")  # fmt: skip
    return LocalDataset(path, tuple(files))


def _read_hf(path: Path, field: str) -> list[tuple[str, bytes]]:
    """Every row's text, named by its 1-based row number: the line it would be in a JSON-lines
    export (Dataset.to_json), as data.kind=jsonl names its lines."""
    dataset = _hf_dataset(path)
    dataset.check_field(field, "data.field")
    return [(f"{row + 1}", raw) for row, raw in dataset.documents(field, 0, dataset.open().num_rows)]


def _existing_path(cfg: DataConfig) -> Path:
    """data.path, which must be a file or a folder."""
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"data.path {path} does not exist")
    if not (path.is_file() or path.is_dir()):
        raise DataError(f"data.path {path} is neither a file nor a folder")
    return path


def _shards_of(cfg: DataConfig) -> tuple[Path, shards.Metadata]:
    """data.kind=tokens: the folder and its metadata, checked against the shards' sizes, headers and
    offsets (no token is read)."""
    path = _existing_path(cfg)
    if not path.is_dir():
        raise DataError(f"data.kind=tokens needs the folder `python -m epmoe.data prepare --out` wrote; "
                        f"{path} is a file")  # fmt: skip
    return path, shards.read_metadata(path)


def check_source(cfg: DataConfig) -> Path | None:
    """Check what can be checked without reading the corpus (the launcher calls this before any
    rank starts): the path exists and has the kind's shape (token shards: match their metadata).
    Returns the path (None for stdlib)."""
    if cfg.kind == "stdlib":
        return None
    if cfg.kind == "tokens":
        return _shards_of(cfg)[0]
    path = _existing_path(cfg)
    if cfg.kind == "hf":  # the columns, from the schemas: nothing converted or read yet
        _hf_dataset(path).check_field(cfg.field, "data.field")
        return path
    if cfg.kind in ("jsonl", "bin") and not path.is_file():
        what = "uint16 tokens" if cfg.kind == "bin" else "JSON lines"
        raise DataError(f"data.kind={cfg.kind} needs a file of {what}; {path} is a folder")
    if cfg.kind == "bin":
        size = path.stat().st_size
        if size == 0:
            raise DataError(f"{path} is empty; data.kind=bin needs a file of uint16 token ids")
        if size % 2:
            raise DataError(
                f"{path} has {size} bytes, an odd number: data.kind=bin reads uint16 token ids (2 bytes each)"
            )
    return path


# a file's content hash covers its first and last FINGERPRINT_ENDS bytes (all of a file of at most
# twice that): cheap on a large corpus, and size plus mtime_ns stand in for the middle
FINGERPRINT_ENDS = 1 << 20


def _head_tail_sha256(p: Path, size: int) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        h.update(f.read(FINGERPRINT_ENDS))
        if size > 2 * FINGERPRINT_ENDS:
            f.seek(size - FINGERPRINT_ENDS)
        h.update(f.read(FINGERPRINT_ENDS))
    return h.hexdigest()


def fingerprint(cfg: DataConfig) -> dict:
    """What the configured source reads, cheaply: {"kind", "path" (absolute; the standard
    library's root for stdlib), "files": {name relative to path: {"bytes", "mtime_ns",
    "sha256_ends"}}}, with `sha256_ends` over the file's first and last FINGERPRINT_ENDS bytes.
    A checkpoint records it so that a resume on other data is noticed. An unreadable file
    raises OSError (a save reports it in one line)."""
    if cfg.kind == "stdlib":
        root, files = stdlib_root(), _stdlib_files(stdlib_root())
    else:
        root = Path(cfg.path).expanduser().resolve()
        if cfg.kind == "hf":
            files = _hf_dataset(root).data_files()
        else:
            files = _text_files(root) if cfg.kind in ("text", "tokens") else [root]
    out = {}
    for p in files:
        stat = p.stat()
        name = str(p.relative_to(root)) if root.is_dir() else p.name
        sha = _head_tail_sha256(p, stat.st_size)
        out[name] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256_ends": sha}
    source = {"kind": str(cfg.kind), "path": str(root), "files": out}
    if cfg.tokenizer is not None:  # {"path", "sha256"} of the tokenizer.json (absent for bytes)
        source["tokenizer"] = tokenizer_identity(cfg.tokenizer)  # hashed, not parsed again
    return source


def _check_windows(train: Tokens, val: Tokens, seq_len: int, what: str) -> None:
    """Each split must hold one (seq_len + 1)-token window, or no batch can be drawn from it."""
    for name, tokens, fix in (("train", train, "lower"), ("val", val, "raise")):
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"{what}: the {name} split has {len(tokens)} tokens, fewer than data.seq_len + 1 ({seq_len + 1}) "
                f"for one window; add data, lower data.seq_len or {fix} data.val_fraction"
            )


def load_splits(cfg: DataConfig, vocab_size: int) -> TokenSplits:
    """Read the configured source and split it into train and val token streams.

    Raises DataError (one line) for a path that does not exist, an empty or too small corpus,
    binary or non-UTF-8 files in text data, bad jsonl lines, token files or a tokenizer that do
    not fit the model's vocabulary.
    """
    if cfg.kind == "tokens":
        return _load_shards(cfg, *_shards_of(cfg), vocab_size)
    path = check_source(cfg)
    if path is None:
        docs = _read_stdlib()
        what = f"the Python standard library at {stdlib_root()}"
    else:
        what = str(path)
        if cfg.kind == "bin":
            tokens = torch.from_numpy(np.memmap(path, dtype=np.uint16, mode="r").astype(np.int64))
            if int(tokens.max()) >= vocab_size:
                raise DataError(
                    f"{path} holds token id {int(tokens.max())} >= model.vocab_size ({vocab_size}); raise vocab_size"
                )
            train, val = _split_position(tokens, cfg.val_fraction, what)
            _check_windows(train, val, cfg.seq_len, what)
            return TokenSplits(train, val, f"{what} ({len(tokens):,} uint16 tokens)", None, None, None)
        if cfg.kind == "hf":
            docs = _read_hf(path, cfg.field)
        else:
            docs = _read_jsonl(path, cfg.field) if cfg.kind == "jsonl" else _read_text(path)
    tokenizer = load_tokenizer(cfg.tokenizer)
    tokenizer.check_vocab(vocab_size)
    if sum(len(d) for _, d in docs) == 0:
        raise DataError(f"{what} holds no text")
    train, val, val_bytes_per_token = _split_docs(docs, cfg.val_fraction, what, tokenizer)
    _check_windows(train, val, cfg.seq_len, what)
    unit = "bytes" if cfg.tokenizer is None else f"tokens of {cfg.tokenizer}"
    return TokenSplits(train, val, f"{what} ({len(docs):,} documents, {len(train) + len(val):,} {unit})",
                       tokenizer, val_bytes_per_token, tokenizer.eos_id)  # fmt: skip


def check_vocab(cfg: DataConfig, vocab_size: int) -> None:
    """The model's vocabulary holds every id the configured data can hold: data.tokenizer's, or the
    token shards' (their metadata's; data.tokenizer, if set, must be theirs). Raises DataError."""
    if cfg.kind != "tokens":
        load_tokenizer(cfg.tokenizer).check_vocab(vocab_size)
        return
    path, meta = _shards_of(cfg)
    meta.check_vocab(vocab_size, path)
    _shard_tokenizer(cfg, meta, path)


def _shard_tokenizer(cfg: DataConfig, meta: shards.Metadata, folder: Path) -> Tokenizer | None:
    """What decodes the shards' ids: data.tokenizer, which must be the one they were prepared with;
    bytes for byte-level shards; else None (the tokenizer file prepare read is not assumed to stay)."""
    if cfg.tokenizer is None:
        return load_tokenizer(None) if meta.tokenizer.sha256 == shards.BYTES_SHA256 else None
    sha = tokenizer_identity(cfg.tokenizer)["sha256"]
    if sha != meta.tokenizer.sha256:
        raise DataError(f"data.tokenizer {cfg.tokenizer} (sha256 {sha[:12]}) is not the tokenizer {folder} was "
                        f"prepared with ({meta.tokenizer.path}, sha256 {meta.tokenizer.sha256[:12]}); "
                        "name that one or drop data.tokenizer")  # fmt: skip
    return load_tokenizer(cfg.tokenizer)


def _load_shards(cfg: DataConfig, folder: Path, meta: shards.Metadata, vocab_size: int) -> TokenSplits:
    """data.kind=tokens: the shards memory-mapped (nothing widened), bytes per token from the metadata."""
    meta.check_vocab(vocab_size, folder)
    tokenizer = _shard_tokenizer(cfg, meta, folder)
    shards.verify_sha256(folder, meta)  # the shards small enough to hash at every start
    train, val = (shards.open_split(folder, meta, split) for split in ("train", "val"))
    _check_windows(train, val, cfg.seq_len, str(folder))
    t, v = meta.splits["train"], meta.splits["val"]
    what = f"{folder} ({t.documents + v.documents:,} documents, {t.tokens + v.tokens:,} {meta.dtype} tokens of " \
           f"{meta.tokenizer.path})"  # fmt: skip
    return TokenSplits(train, val, what, tokenizer, v.bytes_per_token, meta.tokenizer.eos_id)


def sample_batch(
    tokens: Tokens, batch_size: int, seq_len: int, seed: int, stream: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs_BS, targets_BS: random windows drawn from a generator seeded by (seed, stream, step).

    `stream` separates independent uses (train micro-step, validation batch index).
    """
    if len(tokens) < seq_len + 1:
        raise DataError(f"a split has {len(tokens)} tokens, fewer than data.seq_len + 1 ({seq_len + 1}); lower seq_len")
    g = torch.Generator().manual_seed(hash((seed, stream, step)) & 0x7FFF_FFFF_FFFF_FFFF)
    starts_B = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=g)
    windows_BS1 = torch.stack([tokens[s : s + seq_len + 1] for s in starts_B.tolist()]).long()
    return windows_BS1[:, :-1], windows_BS1[:, 1:]
