"""Tokenizers that turn a corpus's documents into one token stream: bytes, or a Hugging Face
`tokenizer.json` read by the `tokenizers` library.

Both join documents with one boundary token (a NUL byte; the tokenizer's EOS) and count the
bytes of what they encoded, so that a held-out loss per token can be reported per byte whatever
the vocabulary: bits/byte = (nats/token / ln 2) × tokens / bytes, a boundary counting as one byte
(the NUL it is in byte-level data).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from epmoe.data.errors import DataError

# tokens a tokenizer.json without a tokenizer_config.json may use to end a document, most usual first
KNOWN_EOS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
ENCODE_BATCH = 256  # documents per encode_batch call: bounds the Python lists alive at once


@dataclass
class Encoded:
    tokens: torch.Tensor  # 1-D token ids, documents joined by the boundary token
    n_bytes: int  # UTF-8 bytes encoded, one per boundary


class ByteTokenizer:
    """Byte-level: a token is a byte (vocab 256), documents joined by NUL."""

    vocab_size = 256
    eos_id = 0  # NUL

    def encode_each(self, docs: list[bytes]) -> list[np.ndarray]:
        """Each document's ids on its own (no boundary): its bytes."""
        return [np.frombuffer(d, dtype=np.uint8) for d in docs]

    def encode_docs(self, docs: list[bytes]) -> Encoded:
        joined = b"\0".join(docs)
        return Encoded(torch.frombuffer(bytearray(joined), dtype=torch.uint8), len(joined))

    def decode(self, ids: list[int]) -> str:
        return bytes(min(max(i, 0), 255) for i in ids).decode("utf-8", errors="replace")

    def check_vocab(self, vocab_size: int) -> None:
        if vocab_size < self.vocab_size:
            raise DataError(f"byte-level data needs model.vocab_size >= 256, got {vocab_size}")


class HFTokenizer:
    """A `tokenizer.json` (the file, or a folder that holds it, such as a Hugging Face model's)."""

    def __init__(self, spec: str):
        file = tokenizer_file(spec)
        from tokenizers import Tokenizer  # only when a tokenizer is asked for

        raw = file.read_bytes()
        try:
            self.tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # the library's own parse errors (JSON, unknown model type)
            raise DataError(f"data.tokenizer: {file} is not a tokenizer.json the tokenizers library reads "
                            f"({str(e).splitlines()[0]})") from None  # fmt: skip
        self.file = file.resolve()
        # ids can be sparse (added tokens past the base vocabulary): the model needs the largest + 1
        self.vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values()) + 1
        self.eos_id = self._eos_id(file.parent)

    def _eos_id(self, folder: Path) -> int:
        """The document boundary: tokenizer_config.json's eos_token, else config.json's
        eos_token_id, else a KNOWN_EOS token the tokenizer has."""
        named = _json(folder / "tokenizer_config.json").get("eos_token")
        if isinstance(named, dict):  # {"content": "</s>", ...} in older files
            named = named.get("content")
        if isinstance(named, str) and (i := self.tok.token_to_id(named)) is not None:
            return i
        eos = _json(folder / "config.json").get("eos_token_id")
        if isinstance(eos, list) and eos:
            eos = eos[0]
        if isinstance(eos, int):
            return eos
        for token in KNOWN_EOS:
            if (i := self.tok.token_to_id(token)) is not None:
                return i
        raise DataError(f"data.tokenizer: {self.file} names no end-of-document token (no eos_token in a "
                        f"tokenizer_config.json beside it, no eos_token_id in a config.json, none of "
                        f"{', '.join(KNOWN_EOS)}); add a tokenizer_config.json with eos_token")  # fmt: skip

    def encode_each(self, docs: list[bytes]) -> list[np.ndarray]:
        """Each document's int32 ids on its own (no special tokens added: a post-processor's BOS would
        repeat in every window)."""
        out: list[np.ndarray] = []
        for i in range(0, len(docs), ENCODE_BATCH):
            # NOTE: a few of the standard library's files are not UTF-8 (its encoding tests): their
            # undecodable bytes become U+FFFD, as `errors="replace"` reads them
            texts = [d.decode("utf-8", errors="replace") for d in docs[i : i + ENCODE_BATCH]]
            encodings = self.tok.encode_batch(texts, add_special_tokens=False)
            out += [np.asarray(enc.ids, dtype=np.int32) for enc in encodings]
        return out

    def encode_docs(self, docs: list[bytes]) -> Encoded:
        """Each document's ids (encode_each), EOS between documents."""
        eos = np.array([self.eos_id], dtype=np.int32)
        parts: list[np.ndarray] = []
        for ids in self.encode_each(docs):
            if parts:
                parts.append(eos)
            parts.append(ids)
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        return Encoded(torch.from_numpy(tokens), sum(len(d) for d in docs) + max(len(docs) - 1, 0))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def check_vocab(self, vocab_size: int) -> None:
        if self.vocab_size > vocab_size:
            raise DataError(f"data.tokenizer {self.file} has token ids up to {self.vocab_size - 1}, beyond "
                            f"model.vocab_size ({vocab_size}); raise model.vocab_size to >= {self.vocab_size} "
                            "or use the model's own tokenizer")  # fmt: skip


Tokenizer = ByteTokenizer | HFTokenizer


def tokenizer_file(spec: str) -> Path:
    """The tokenizer.json that data.tokenizer names (the file, or the one in the folder it names)."""
    path = Path(spec).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        where = f"{path} holds no tokenizer.json" if path.is_dir() else f"{path} does not exist"
        raise DataError(f"data.tokenizer: {where}; give a tokenizer.json or a folder that holds one")
    return file


def tokenizer_identity(spec: str) -> dict:
    """{"path", "sha256"} of data.tokenizer's file, which a checkpoint records so that a resume
    with another tokenizer is noticed; hashed, not parsed (no vocabulary is needed)."""
    file = tokenizer_file(spec)
    return {"path": str(file.resolve()), "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}


def load_tokenizer(spec: str | None) -> Tokenizer:
    """data.tokenizer: None = bytes; else a tokenizer.json or a folder holding one. Raises
    DataError (one line) for a missing or unreadable file or one without an EOS token."""
    return ByteTokenizer() if spec is None else HFTokenizer(spec)


def _json(path: Path) -> dict:
    """The JSON object in `path`, {} if there is no such file (these are optional beside a
    tokenizer.json); one that cannot be read or parsed is a DataError."""
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"data.tokenizer: {path} cannot be read as JSON ({e})") from None
    return obj if isinstance(obj, dict) else {}
