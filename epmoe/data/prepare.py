"""`python -m epmoe.data prepare`: tokenise a corpus once into token shards (epmoe/data/shards.py).

1. list the INPUT files and cut them into tasks (epmoe/data/documents.py);
2. workers read, decode and tokenise the tasks in parallel (a process pool, results in task
   order, so the output does not depend on the number of workers);
3. the main process splits each task's documents into train and val by name, appends them to
   the splits' shards (EOS after every document) and reports bytes and tokens per second;
4. metadata.json is written last, into `<out>.tmp`; every file is fsynced and the folder
   renamed to `<out>`: a crash leaves no folder that looks complete.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from epmoe.data.documents import Task, input_files, is_val, plan_tasks
from epmoe.data.errors import DataError
from epmoe.data.shards import (
    BYTES_SHA256,
    METADATA,
    SPLITS,
    Metadata,
    ShardWriter,
    TokenizerInfo,
    dtype_for,
)
from epmoe.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_identity
from epmoe.durable import fsync_path

BYTES = "bytes"  # --tokenizer bytes: byte-level ids (vocab 256), EOS = NUL
DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 per shard


@dataclass
class PrepareOptions:
    tokenizer: str  # a tokenizer.json, a folder holding one, or "bytes"
    out: Path
    inputs: list[Path]
    text_field: str = "text"  # the text's key in JSON lines
    val_fraction: float = 0.05
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    include: list[str] = field(default_factory=list)  # file-name globs under INPUT folders; empty = every file
    exclude: list[str] = field(default_factory=list)  # globs of path parts to leave out
    progress: bool = True


@dataclass
class Prepared:
    meta: Metadata
    out: Path
    seconds: float
    input_bytes: int

    def summary(self) -> str:
        s = self.meta.splits
        tokens = s["train"].tokens + s["val"].tokens
        rate = self.input_bytes / max(self.seconds, 1e-9)
        return (f"prepared {s['train'].documents + s['val'].documents:,} documents, {self.input_bytes / 1e6:,.1f} MB, "
                f"into {tokens:,} {self.meta.dtype} tokens (train {s['train'].tokens:,} in "
                f"{len(s['train'].shards)} shard(s), val {s['val'].tokens:,}) at {self.out} in {self.seconds:.1f} s: "
                f"{rate / 1e6:.2f} MB/s, {tokens / max(self.seconds, 1e-9):,.0f} tokens/s")  # fmt: skip


@functools.lru_cache(maxsize=1)
def _tokenizer(spec: str) -> Tokenizer:
    """The tokenizer, loaded once per worker process."""
    return load_tokenizer(None if spec == BYTES else spec)


# a task's documents of one split: (ids with EOS after each document, tokens per document, bytes per document)
SplitBatch = tuple[np.ndarray, np.ndarray, np.ndarray]


def _encode(task: Task, spec: str, val_fraction: float, dtype: np.dtype) -> tuple[dict[str, SplitBatch], int]:
    """Read and tokenise one task (in a worker): its documents per split, and the input bytes read."""
    tok = _tokenizer(spec)
    docs = list(task.documents())
    ids = tok.encode_each([raw for _, raw in docs])
    eos = np.array([tok.eos_id], dtype=dtype)
    out = {}
    for split in SPLITS:
        chosen = [i for i, (name, _) in enumerate(docs) if is_val(name, val_fraction) == (split == "val")]
        parts = [p for i in chosen for p in (ids[i].astype(dtype, copy=False), eos)]
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
        doc_tokens = np.array([len(ids[i]) + 1 for i in chosen], dtype=np.int64)
        doc_bytes = np.array([len(docs[i][1]) + 1 for i in chosen], dtype=np.int64)  # the EOS counts one byte
        out[split] = (tokens, doc_tokens, doc_bytes)
    return out, task.n_bytes


def _encode_star(args: tuple) -> tuple[dict[str, SplitBatch], int]:
    return _encode(*args)


def _worker_init() -> None:
    # the pool is the parallelism: the tokenizers library's own threads would oversubscribe the cores
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _results(tasks: list[Task], spec: str, opts: PrepareOptions, dtype: np.dtype) -> Iterator[tuple[dict, int]]:
    """Each task's encoding, in task order: inline for one worker, else from a process pool."""
    jobs = [(t, spec, opts.val_fraction, dtype) for t in tasks]
    if opts.workers == 1 or len(tasks) == 1:
        yield from map(_encode_star, jobs)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(min(opts.workers, len(tasks)), initializer=_worker_init) as pool:
        yield from pool.imap(_encode_star, jobs)


def _check_options(opts: PrepareOptions) -> None:
    if not 0 < opts.val_fraction < 1:
        raise DataError(f"--val-fraction {opts.val_fraction} is not between 0 and 1 (exclusive); try 0.05")
    if opts.workers < 1:
        raise DataError(f"--workers {opts.workers} must be at least 1")
    if opts.shard_tokens < 1:
        raise DataError(f"--shard-tokens {opts.shard_tokens} must be at least 1")
    if not opts.inputs:
        raise DataError("no INPUT given: name text or JSON-lines files or folders to prepare")
    if opts.out.exists() and (opts.out.is_file() or any(opts.out.iterdir())):
        raise DataError(f"--out {opts.out} exists and is not an empty folder; remove it or choose another --out")


def _tokenizer_info(spec: str, tok: Tokenizer) -> TokenizerInfo:
    if spec == BYTES:
        return TokenizerInfo(BYTES, BYTES_SHA256, tok.vocab_size, tok.eos_id)
    identity = tokenizer_identity(spec)
    return TokenizerInfo(identity["path"], identity["sha256"], tok.vocab_size, tok.eos_id)


def prepare(opts: PrepareOptions) -> Prepared:
    """Tokenise opts.inputs into shards at opts.out (see the module docstring). Raises DataError
    (one line) for bad options, unreadable or empty inputs, and splits left without documents."""
    start = time.perf_counter()
    _check_options(opts)
    tok = _tokenizer(opts.tokenizer)
    info = _tokenizer_info(opts.tokenizer, tok)
    dtype = dtype_for(tok.vocab_size)
    files = input_files(opts.inputs, opts.include, opts.exclude)
    tasks = plan_tasks(files, opts.text_field, opts.progress)
    total = sum(t.n_bytes for t in tasks)
    tmp = opts.out.with_name(opts.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # an earlier prepare that did not finish
    tmp.mkdir(parents=True)
    try:
        writers = {s: ShardWriter(tmp, s, dtype, info.sha256, opts.shard_tokens) for s in SPLITS}
        n_tokens = 0
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", file=sys.stderr, disable=not opts.progress,
                   dynamic_ncols=True)  # fmt: skip
        with bar:
            for batches, n_bytes in _results(tasks, opts.tokenizer, opts, dtype):
                for split, batch in batches.items():
                    writers[split].add(*batch)
                    n_tokens += len(batch[0])
                bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - start, 1e-9):,.0f} tokens/s", refresh=False)
                bar.update(n_bytes)
        splits = {s: w.finish() for s, w in writers.items()}
        _check_splits(opts, files, splits)
        meta = Metadata(info, dtype.name, opts.val_fraction, splits, inputs=[str(p) for p in opts.inputs])
        (tmp / METADATA).write_text(meta.to_json(), encoding="utf-8")
        fsync_path(tmp / METADATA)
        fsync_path(tmp)
        if opts.out.exists():  # an empty folder (checked): the rename replaces it
            opts.out.rmdir()
        tmp.rename(opts.out)
        fsync_path(opts.out.absolute().parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Prepared(meta, opts.out, time.perf_counter() - start, total)


def _check_splits(opts: PrepareOptions, files: list, splits: dict) -> None:
    inputs = " ".join(str(p) for p in opts.inputs)
    n_docs = splits["train"].documents + splits["val"].documents
    if n_docs == 0:
        raise DataError(f"{inputs} hold no documents ({len(files)} file(s), none with text); "
                        "name the corpus's text or JSON-lines files or folders")  # fmt: skip
    for split, fix in (("val", "raise"), ("train", "lower")):
        if splits[split].documents == 0:
            raise DataError(f"{inputs}: none of the {n_docs} document(s) falls in the {split} split with "
                            f"--val-fraction {opts.val_fraction}; {fix} it or add documents")  # fmt: skip
