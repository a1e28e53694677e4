"""The documents of a corpus on disk, as `prepare` and `train-tokenizer` read them, and the
train/validation assignment of a document by its name.

An INPUT is a text file (one document), a JSON-lines file (`.jsonl`, `.ndjson`: one document per
line, its text in a chosen field), a local Hugging Face dataset (a `.parquet` or `.arrow` file, or a
`datasets.save_to_disk` folder, of which a DatasetDict's `train` split: one document per row, its
text in the chosen column; epmoe/data/hf_datasets.py), or a folder of such files and saved
datasets (read recursively, in sorted order). Reading is cut into `Task`s — a group of small text
files, a byte range of one JSON-lines file that starts and ends at a line break, or a row range of
one dataset — so that worker processes can read, decode and tokenise in parallel while the output
stays in one deterministic order.

A document's name (its path relative to the INPUT folder; `path@byte offset` for a JSON line;
`path@row` for a dataset's row, the path without its .parquet / .arrow suffix, so that the same
table stored as parquet, arrow or save_to_disk names its rows alike and prepares to the same
shards) decides its split, so the split does not depend on the order, the number of workers or
the other documents: the same rule as data.kind=stdlib/text/jsonl/hf (epmoe/train/data.py).
"""

from __future__ import annotations

import fnmatch
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from epmoe.data.errors import DataError
from epmoe.data.hf_datasets import LocalDataset, is_dataset_file, is_saved_dataset

JSONL_SUFFIXES = (".jsonl", ".ndjson")
TASK_BYTES = 1 << 20  # text per task: its pickling is small beside its tokenising, and the last tasks balance
TASK_FILES = 256  # small files per task at most


def is_val(name: str, val_fraction: float) -> bool:
    """Deterministic, order-independent train/val assignment of a file or document by its name."""
    return zlib.crc32(name.encode()) % 10_000 < val_fraction * 10_000


@dataclass(frozen=True)
class Task:
    """One unit of reading for a worker: text files (each a document), one JSON-lines file's
    lines that start in bytes [start, end), or one dataset's rows [start, end)."""

    files: tuple[tuple[str, Path], ...] = ()  # (document name, path) of text files
    jsonl: Path | None = None
    jsonl_name: str = ""  # the JSON-lines file's name relative to its INPUT
    start: int = 0
    end: int = 0
    field: str = "text"
    dataset: LocalDataset | None = None
    dataset_name: str = ""  # its rows' names' prefix: the name relative to its INPUT, less the suffix
    dataset_bytes: int = 0  # about the text bytes of the rows (the column's share): read without reading them

    @property
    def n_bytes(self) -> int:
        """Bytes of input this task reads (for the progress bar)."""
        if self.jsonl is not None:
            return self.end - self.start
        if self.dataset is not None:
            return self.dataset_bytes
        return sum(p.stat().st_size for _, p in self.files)

    def documents(self) -> Iterator[tuple[str, bytes]]:
        """(name, UTF-8 text) of each non-empty document of the task, in order."""
        for name, path in self.files:
            raw = _read(path)
            if (nul := raw.find(b"\0")) >= 0:  # NUL is byte-level data's boundary, and marks a binary file
                raise DataError(f"{path} is binary, not text (a NUL byte at byte {nul}); leave it out of the INPUTs")
            if raw:
                yield name, raw
        if self.jsonl is not None:
            yield from self._jsonl_documents()
        if self.dataset is not None:
            for row, raw in self.dataset.documents(self.field, self.start, self.end):
                if raw:
                    yield f"{self.dataset_name}@{row}", raw

    def _jsonl_documents(self) -> Iterator[tuple[str, bytes]]:
        with self.jsonl.open("rb") as f:
            f.seek(self.start)
            chunk = f.read(self.end - self.start)
        offset = self.start
        for line in chunk.split(b"\n"):
            at, offset = offset, offset + len(line) + 1
            if not line.strip():
                continue
            where = f"{self.jsonl} (the line at byte {at})"
            try:
                text = json.loads(line)[self.field]
            except (ValueError, KeyError, TypeError, IndexError):  # not JSON, or not an object with the field
                raise DataError(f"{where} is not a JSON object with a {self.field!r} field; "
                                "choose the field with --field") from None  # fmt: skip
            if not isinstance(text, str):
                raise DataError(f"{where}: the {self.field!r} field is a {type(text).__name__}, not a string")
            try:
                raw = text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"{where}: the {self.field!r} field is not valid Unicode ({e.reason})") from None
            if raw:
                yield f"{self.jsonl_name}@{at}", raw


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror or e})") from None


def input_files(inputs: list[Path], include: list[str], exclude: list[str]) -> list[tuple[str, Path]]:
    """(name relative to its INPUT, path) of every file the INPUTs name: a file itself, or each file
    under a folder (sorted) whose name matches an `include` glob and no part of whose relative path
    matches an `exclude` glob (names starting with "." are always left out). A save_to_disk folder
    (the INPUT itself or one under it) is one entry, its folder, whatever the globs say of its files."""
    out = []
    for root in inputs:
        if not root.exists():
            raise DataError(f"INPUT {root} does not exist")
        if root.is_file() or is_saved_dataset(root):
            out.append((root.name, root))
            continue
        try:
            found = sorted(p for p in root.rglob("*") if p.is_file())
        except OSError as e:
            raise DataError(f"INPUT {root} cannot be listed ({e.strerror or e})") from None
        saved = {d for d in {p.parent for p in found} if is_saved_dataset(d)}
        for p in sorted([*found, *saved]):  # a saved dataset where its files would be
            rel = p.relative_to(root)
            if any(part.startswith(".") or any(fnmatch.fnmatch(part, g) for g in exclude) for part in rel.parts):
                continue
            if any(d in p.parents for d in saved):  # a saved dataset's own files, read through it
                continue
            if p not in saved and include and not any(fnmatch.fnmatch(p.name, g) for g in include):
                continue
            out.append((str(rel), p))
    return out


def plan_tasks(files: list[tuple[str, Path]], field: str, progress: bool = True) -> list[Task]:
    """The INPUT files cut into tasks of about TASK_BYTES each, in the files' order (`progress`:
    the `datasets` library's bar while it converts a parquet or arrow file into its cache)."""
    tasks: list[Task] = []
    group: list[tuple[str, Path]] = []
    group_bytes = 0
    for name, path in files:
        if path.suffix not in JSONL_SUFFIXES and not is_dataset_file(path) and not path.is_dir():
            group.append((name, path))
            group_bytes += path.stat().st_size
            if group_bytes >= TASK_BYTES or len(group) >= TASK_FILES:
                tasks.append(Task(files=tuple(group)))
                group, group_bytes = [], 0
            continue
        if group:  # keep the output in the files' order
            tasks.append(Task(files=tuple(group)))
            group, group_bytes = [], 0
        if path.suffix in JSONL_SUFFIXES:
            tasks += [Task(jsonl=path, jsonl_name=name, start=a, end=b, field=field) for a, b in _line_ranges(path)]
        else:
            tasks += _dataset_tasks(name, path, field, progress)
    if group:
        tasks.append(Task(files=tuple(group)))
    return tasks


def _line_ranges(path: Path) -> list[tuple[int, int]]:
    """[start, end) byte ranges of about TASK_BYTES that cover the file, each ending after a line break
    (or at the end of the file)."""
    size = path.stat().st_size
    ranges, start = [], 0
    with path.open("rb") as f:
        while start < size:
            f.seek(min(start + TASK_BYTES, size))
            f.readline()  # on to the end of the line the cut falls in
            end = min(f.tell(), size) if start + TASK_BYTES < size else size
            ranges.append((start, end))
            start = end
    return ranges


def _dataset_tasks(name: str, path: Path, field: str, progress: bool) -> list[Task]:
    """A dataset's rows cut into tasks of about TASK_BYTES of text each (by the column's mean row size)."""
    dataset = LocalDataset(path) if path.is_dir() else LocalDataset.of_file(path)
    dataset.check_field(field, "--field")
    rows = dataset.open(progress).num_rows
    text_bytes = dataset.text_bytes(field)
    step = max(1, rows * TASK_BYTES // max(text_bytes, 1))
    prefix = name if path.is_dir() else name[: -len(path.suffix)]
    return [Task(dataset=dataset, dataset_name=prefix, start=a, end=min(a + step, rows), field=field,
                 dataset_bytes=text_bytes * (min(a + step, rows) - a) // rows)
            for a in range(0, rows, step)]  # fmt: skip


def iter_documents(files: list[tuple[str, Path]], field: str, progress: bool = True) -> Iterator[str]:
    """The text of every document of the files, in order (for training a tokenizer); undecodable
    bytes read as U+FFFD, as the tokenizers encode them."""
    for task in plan_tasks(files, field, progress):
        for _, raw in task.documents():
            yield raw.decode("utf-8", errors="replace")
