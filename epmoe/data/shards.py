"""Token shards on disk: the format `python -m epmoe.data prepare` writes and data=tokens reads.

A shard folder holds
- `metadata.json`: format version; the tokenizer (its file's path and sha256, vocab size, EOS id);
  the token dtype; per split ("train", "val") its tokens, documents and bytes of text, and per
  shard its tokens, documents, bytes and file sha256;
- `<split>-NNNNN.bin`: a HEADER_BYTES header (MAGIC, version, itemsize, tokens, documents, the
  tokenizer's sha256) then the token ids, little-endian uint8 / uint16 / uint32 by vocab size;
- `<split>-NNNNN.docs.npy`: uint64 offsets of each document's first token, then the shard's
  token count (documents + 1 values): document i is tokens[offsets[i]:offsets[i+1]].

Every document is followed by one EOS token, so shards (and splits) concatenate without a seam and
a window sees where a document ends. The bytes of a split count each document's UTF-8 bytes and
one per EOS (as the NUL boundary of byte-level data counts), so bits/byte = bits/token × tokens /
bytes is exact for any tokenizer. Each shard's header names its tokenizer: shards of another
tokenizer dropped into a folder are caught without reading tokens.

Reading memory-maps each shard; `TokenStream` slices copy only the asked-for windows (no shard
is ever widened whole).
"""

from __future__ import annotations

import bisect
import json
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from epmoe.data.errors import DataError
from epmoe.durable import fsync_path, sha256_file

FORMAT = "epmoe-token-shards"
VERSION = 1
METADATA = "metadata.json"
SPLITS = ("train", "val")
MAGIC = b"EPMOETOK"
HEADER = struct.Struct("<8sIIQQ32s")  # magic, version, itemsize, tokens, documents, tokenizer sha256
HEADER_BYTES = HEADER.size  # 64
BYTES_SHA256 = "0" * 64  # the byte-level "tokenizer" has no file to hash
SHA_AT_LOAD_BYTES = 32 << 20  # shards up to this size are hashed when read; larger ones by `verify`


def dtype_for(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id below vocab_size."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise DataError(f"a vocabulary of {vocab_size:,} tokens does not fit uint32 token ids")


@dataclass
class ShardInfo:
    file: str  # <split>-NNNNN.bin, relative to the folder
    docs_file: str  # <split>-NNNNN.docs.npy
    tokens: int
    documents: int
    bytes: int
    sha256: str  # of the whole .bin file (`sha256sum` agrees)


@dataclass
class SplitInfo:
    tokens: int = 0
    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the split's documents, one per EOS
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)


@dataclass
class TokenizerInfo:
    path: str  # the tokenizer.json prepare read, or "bytes"
    sha256: str
    vocab_size: int
    eos_id: int


@dataclass
class Metadata:
    tokenizer: TokenizerInfo
    dtype: str
    val_fraction: float
    splits: dict[str, SplitInfo]
    inputs: list[str] = field(default_factory=list)  # what prepare read, as named on its command line
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, where: Path) -> Metadata:
        """Parse metadata.json; anything missing or of the wrong type is one DataError."""
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise DataError(f"{where} is not epmoe token-shard metadata (format {raw.get('format')!r}, "
                                f"not {FORMAT!r}); write the folder with `python -m epmoe.data prepare`")  # fmt: skip
            if raw.get("version") != VERSION:
                raise DataError(f"{where} is token-shard format version {raw.get('version')}, this epmoe reads "
                                f"version {VERSION}; prepare the corpus again")  # fmt: skip
            splits = {name: SplitInfo(**{**s, "shards": [ShardInfo(**x) for x in s["shards"]]})
                      for name, s in raw["splits"].items()}  # fmt: skip
            return cls(TokenizerInfo(**raw["tokenizer"]), raw["dtype"], raw["val_fraction"], splits,
                       list(raw.get("inputs", [])))  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{where} cannot be read as token-shard metadata ({type(e).__name__}: {e}); "
                            "prepare the corpus again") from None  # fmt: skip

    def check_vocab(self, vocab_size: int, folder: Path) -> None:
        """The model's vocabulary must hold every id of the tokenizer the shards were written with."""
        if self.tokenizer.vocab_size > vocab_size:
            raise DataError(f"{folder} holds tokens of {self.tokenizer.path} (vocab {self.tokenizer.vocab_size:,}), "
                            f"beyond model.vocab_size ({vocab_size:,}); set model.vocab_size="
                            f"{self.tokenizer.vocab_size}")  # fmt: skip


class ShardWriter:
    """Writes one split's shards into `folder`, a new shard once one holds `shard_tokens` tokens
    (a shard holds whole documents, so one may run past it by a document)."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, tokenizer_sha256: str, shard_tokens: int):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.tokenizer_digest = bytes.fromhex(tokenizer_sha256)
        self.info = SplitInfo()
        self._file = None
        self._offsets: list[int] = []
        self._bytes = 0

    def add(self, tokens: np.ndarray, doc_tokens: np.ndarray, doc_bytes: np.ndarray) -> None:
        """Append documents: `tokens` is their ids, each document's followed by EOS; doc_tokens and
        doc_bytes their lengths in tokens (EOS included) and in bytes (one for the EOS)."""
        first = 0
        while first < len(doc_tokens):
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._offsets[-1]
            filled_K = np.cumsum(doc_tokens[first:])  # K documents left: this shard's growth with each
            last = first + max(int(np.searchsorted(filled_K, room, side="right")), 1)  # those that fit, one at least
            a = int(doc_tokens[:first].sum())
            b = a + int(filled_K[last - first - 1])
            self._file.write(tokens[a:b].astype(self.dtype, copy=False).tobytes())
            self._offsets += (self._offsets[-1] + filled_K[: last - first]).tolist()
            self._bytes += int(doc_bytes[first:last].sum())
            first = last
            if self._offsets[-1] >= self.shard_tokens:
                self._close()

    def _name(self) -> str:
        return f"{self.split}-{len(self.info.shards):05d}"

    def _open(self) -> None:
        self._file = (self.folder / f"{self._name()}.bin").open("wb")
        self._file.write(b"\0" * HEADER_BYTES)  # rewritten at close, when the counts are known
        self._offsets, self._bytes = [0], 0

    def _close(self) -> None:
        n_tokens, n_docs = self._offsets[-1], len(self._offsets) - 1
        f, self._file = self._file, None
        f.seek(0)
        f.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, n_tokens, n_docs, self.tokenizer_digest))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        name = self._name()
        np.save(self.folder / f"{name}.docs.npy", np.asarray(self._offsets, dtype=np.uint64))
        fsync_path(self.folder / f"{name}.docs.npy")
        shard = ShardInfo(f"{name}.bin", f"{name}.docs.npy", n_tokens, n_docs, self._bytes,
                          sha256_file(self.folder / f"{name}.bin"))  # fmt: skip
        self.info.shards.append(shard)
        self.info.tokens += n_tokens
        self.info.documents += n_docs
        self.info.bytes += self._bytes

    def finish(self) -> SplitInfo:
        if self._file is not None:
            self._close()
        return self.info


class TokenStream:
    """A split's shards as one 1-D token sequence: `len()` and `[a:b]` (a torch int64 tensor of
    only those tokens, read through the memory maps). Nothing is read until a slice asks for it."""

    def __init__(self, maps: list[np.ndarray]):
        self.maps = [m for m in maps if len(m)]
        self.starts = [0]
        for m in self.maps:
            self.starts.append(self.starts[-1] + len(m))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: slice) -> torch.Tensor:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError(f"a token stream is read by contiguous slices [a:b], not [{index}]")
        a, b, _ = index.indices(len(self))
        parts = []
        shard = bisect.bisect_right(self.starts, a) - 1
        while a < b:
            lo, hi = self.starts[shard], self.starts[shard + 1]
            take = min(b, hi)
            parts.append(np.asarray(self.maps[shard][a - lo : take - lo], dtype=np.int64))  # copies only this window
            a, shard = take, shard + 1
        return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))


def read_metadata(folder: Path) -> Metadata:
    """The folder's metadata.json, checked against its shards cheaply: every listed shard is there
    with the size, header and document offsets the metadata says, and no shard the metadata does not
    list lies beside them. Raises DataError (one line)."""
    meta_file = folder / METADATA
    if not meta_file.is_file():
        raise DataError(f"data.path {folder} holds no {METADATA}: point it at the --out folder of "
                        "`python -m epmoe.data prepare`")  # fmt: skip
    try:
        meta = Metadata.from_json(meta_file.read_text(encoding="utf-8"), meta_file)
    except OSError as e:
        raise DataError(f"{meta_file} cannot be read ({e.strerror or e})") from None
    try:
        itemsize = np.dtype(meta.dtype).itemsize
    except TypeError:
        raise DataError(f"{meta_file}: dtype {meta.dtype!r} is not a numpy dtype; prepare the corpus again") from None
    listed = set()
    for split in SPLITS:
        if split not in meta.splits:
            raise DataError(f"{meta_file} lists no {split!r} split; prepare the corpus again")
        for shard in meta.splits[split].shards:
            listed.add(shard.file)
            _check_shard(folder, shard, itemsize, meta)
    for extra in sorted(p.name for p in folder.glob("*.bin") if p.name not in listed):
        other = _header(folder / extra)
        if other is not None and other[5].hex() != meta.tokenizer.sha256:
            raise DataError(f"{folder} mixes shards of different tokenizers: {extra} was written with tokenizer "
                            f"sha256 {other[5].hex()[:12]}, {METADATA} says {meta.tokenizer.sha256[:12]}; "
                            "prepare each corpus into its own folder")  # fmt: skip
        raise DataError(f"{folder / extra} is not listed in {METADATA}: the metadata does not match its shards; "
                        "remove the file or prepare the corpus again")  # fmt: skip
    return meta


def _header(path: Path) -> tuple | None:
    """The shard's header fields, or None where the file is too short or not a shard."""
    with path.open("rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES or not raw.startswith(MAGIC):
        return None
    return HEADER.unpack(raw)


def _check_shard(folder: Path, shard: ShardInfo, itemsize: int, meta: Metadata) -> None:
    path = folder / shard.file
    if not path.is_file():
        raise DataError(f"{path} is missing: {METADATA} lists it; prepare the corpus again")
    header = _header(path)
    if header is None:
        raise DataError(f"{path} is not an epmoe token shard (no {MAGIC.decode()} header); prepare the corpus again")
    _, version, size, n_tokens, n_docs, digest = header
    if digest.hex() != meta.tokenizer.sha256:
        raise DataError(f"{folder} mixes shards of different tokenizers: {shard.file} was written with tokenizer "
                        f"sha256 {digest.hex()[:12]}, {METADATA} says {meta.tokenizer.sha256[:12]}; "
                        "prepare each corpus into its own folder")  # fmt: skip
    expected = HEADER_BYTES + shard.tokens * itemsize
    actual = path.stat().st_size
    if (version, size, n_tokens, n_docs, actual) != (VERSION, itemsize, shard.tokens, shard.documents, expected):
        raise DataError(f"{path} does not match {METADATA}: {actual:,} bytes holding {n_tokens:,} tokens of "
                        f"{size} bytes in {n_docs:,} documents, the metadata says {expected:,} bytes, "
                        f"{shard.tokens:,} tokens of {itemsize} bytes in {shard.documents:,} documents; "
                        "prepare the corpus again")  # fmt: skip
    docs = folder / shard.docs_file
    try:
        offsets = np.load(docs, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"{docs} cannot be read as document offsets ({e}); prepare the corpus again") from None
    if offsets.shape != (shard.documents + 1,) or int(offsets[-1]) != shard.tokens:
        raise DataError(f"{docs} does not match {METADATA}: {offsets.shape} offsets, for {shard.documents:,} "
                        f"documents of {shard.tokens:,} tokens; prepare the corpus again")  # fmt: skip


def verify_sha256(folder: Path, meta: Metadata, max_bytes: int | None = SHA_AT_LOAD_BYTES) -> None:
    """Hash the shards (those of at most max_bytes; all when None) against the metadata's sha256."""
    for split in SPLITS:
        for shard in meta.splits[split].shards:
            path = folder / shard.file
            if max_bytes is not None and path.stat().st_size > max_bytes:
                continue
            if (sha := sha256_file(path)) != shard.sha256:
                raise DataError(f"{path} does not match {METADATA}: sha256 {sha[:12]}, the metadata says "
                                f"{shard.sha256[:12]} (a corrupt or replaced shard); prepare the corpus "
                                "again")  # fmt: skip


def open_split(folder: Path, meta: Metadata, split: str) -> TokenStream:
    """The split's shards, memory-mapped (read-only, nothing read yet), as one TokenStream."""
    dtype = np.dtype(meta.dtype).newbyteorder("<")
    return TokenStream([np.memmap(folder / s.file, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(s.tokens,))
                        for s in meta.splits[split].shards if s.tokens])  # fmt: skip


def document(folder: Path, meta: Metadata, split: str, shard: int, index: int) -> np.ndarray:
    """One document's token ids (its EOS included), through the shard's offsets."""
    info = meta.splits[split].shards[shard]
    offsets = np.load(folder / info.docs_file, mmap_mode="r")
    tokens = np.memmap(folder / info.file, dtype=np.dtype(meta.dtype).newbyteorder("<"), mode="r",
                       offset=HEADER_BYTES, shape=(info.tokens,))  # fmt: skip
    return np.asarray(tokens[int(offsets[index]) : int(offsets[index + 1])])
