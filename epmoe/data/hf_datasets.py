"""Local Hugging Face datasets as documents: a `datasets.save_to_disk` folder, or `.parquet` /
`.arrow` files, read through the `datasets` library. Nothing is fetched: every path is local.

A `LocalDataset` is one table of rows, each row a document whose text is one string column (the
field). `prepare` reads each INPUT dataset as such a table (epmoe/data/documents.py), data=hf reads
`data.path` as one (epmoe/train/data.py); both name a row by its index, so which split a row falls
in does not depend on how the table is stored.

- A save_to_disk folder is `load_from_disk`'s: a Dataset's holds dataset_info.json and state.json;
  a DatasetDict's holds dataset_dict.json and a folder per split, of which the `train` split is
  read (the others are the dataset's own held-out data, which epmoe's split must not train on;
  name a split's folder to read that one).
- Files are `load_dataset("parquet" | "arrow", data_files=[...], split="train")`'s: one table, the
  files' rows in order. `datasets` converts them once into its Arrow cache (HF_DATASETS_CACHE) and
  memory-maps that, so later reads, and every worker's, are cheap.

`check_field` reads only schemas (parquet footers, arrow stream headers, a save_to_disk folder's
memory map): the launcher runs it before ranks start without converting anything.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from epmoe.data.errors import DataError

if TYPE_CHECKING:  # `datasets` (and pyarrow, pandas) take a second to import: only where a dataset is read
    import datasets
    import pyarrow as pa

BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}  # file suffix -> the `datasets` packaged builder
DATASET_SUFFIXES = tuple(BUILDERS)
DATASET_MARKERS = ("dataset_info.json", "state.json")  # what save_to_disk writes into a Dataset's folder
DICT_MARKER = "dataset_dict.json"  # ... and into a DatasetDict's
TRAIN_SPLIT = "train"


def is_saved_dataset(folder: Path) -> bool:
    """Whether `folder` is a `save_to_disk` folder (a Dataset's or a DatasetDict's)."""
    return folder.is_dir() and (
        all((folder / m).is_file() for m in DATASET_MARKERS) or (folder / DICT_MARKER).is_file()
    )


def is_dataset_file(path: Path) -> bool:
    return path.suffix in DATASET_SUFFIXES


@dataclass(frozen=True)
class LocalDataset:
    """One table of documents on disk: the save_to_disk folder `path` (`files` empty), or the data
    files `files` of one format read as one table in order (`path` names them in messages)."""

    path: Path
    files: tuple[Path, ...] = ()

    @staticmethod
    def of_file(path: Path) -> LocalDataset:
        return LocalDataset(path, (path,))

    @property
    def what(self) -> str:
        """The dataset as a message names it."""
        if not self.files:
            return f"the saved dataset {self.path}"
        if len(self.files) == 1:
            return str(self.files[0])
        return f"the {len(self.files)} {self.builder} files of {self.path}"

    @property
    def builder(self) -> str:
        return BUILDERS[self.files[0].suffix]

    def schema(self) -> pa.Schema:
        """The columns and their Arrow types, read without converting the data (the files' schemas
        must agree)."""
        if not self.files:
            return self.open().data.schema  # memory-mapped: no row is read
        schemas = [_file_schema(f) for f in self.files]
        for f, s in zip(self.files[1:], schemas[1:]):
            if s.names != schemas[0].names:
                raise DataError(f"{f} has columns {', '.join(s.names)} but {self.files[0]} has "
                                f"{', '.join(schemas[0].names)}; one dataset's files share their columns")  # fmt: skip
        return schemas[0]

    def check_field(self, field: str, fix: str) -> None:
        """Raise DataError unless column `field` exists and holds strings; `fix` says how to choose
        another (the option's name)."""
        import pyarrow as pa

        schema = self.schema()
        if field not in schema.names:
            raise DataError(f"no {field!r} column in {self.what} (its columns: {', '.join(schema.names)}); "
                            f"choose the text column with {fix}")  # fmt: skip
        kind = schema.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(
                f"column {field!r} of {self.what} holds {kind}, not text; choose a string column with {fix}"
            )

    def open(self, progress: bool = True) -> datasets.Dataset:
        """The dataset, memory-mapped (opened once per process); `progress`: datasets' own bar while
        it converts files into its cache."""
        with _progress_bars(progress):
            return _open(self)

    def text_bytes(self, field: str) -> int:
        """The Arrow size of the text column (about its UTF-8 bytes), without reading a row."""
        return self.open().data.column(field).nbytes

    def documents(self, field: str, start: int, end: int) -> Iterator[tuple[int, bytes]]:
        """(row, UTF-8 text) of each row in [start, end), in order, empty texts included (as a
        JSON-lines reader sees an empty one). A null text raises DataError."""
        texts = self.open().select_columns([field])[start:end][field]
        for row, text in enumerate(texts, start):
            if text is None:
                raise DataError(f"{self.what}: the {field!r} column of row {row} is null, not text; "
                                "drop or fill such rows")  # fmt: skip
            yield row, text.encode("utf-8")  # an Arrow string is valid UTF-8: this cannot fail

    def data_files(self) -> list[Path]:
        """Every file the dataset is read from (for a run's data fingerprint)."""
        if self.files:
            return list(self.files)
        return sorted(p for p in self.path.rglob("*") if p.is_file())


def _file_schema(path: Path) -> pa.Schema:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            return pq.read_schema(path)
        try:  # datasets writes the Arrow IPC stream format; the file format (Feather v2) reads too
            with pa.memory_map(str(path)) as f:
                return pa.ipc.open_stream(f).schema
        except pa.ArrowInvalid:
            with pa.memory_map(str(path)) as f:
                return pa.ipc.open_file(f).schema
    except (pa.ArrowException, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path} is not a readable {BUILDERS[path.suffix]} file ({reason})") from None


@contextlib.contextmanager
def _progress_bars(on: bool) -> Iterator[None]:
    """datasets' bars off within the block unless `on` (its switch is the library's own, global:
    set back after)."""
    import datasets

    was_on = not datasets.utils.are_progress_bars_disabled()
    if not on:
        datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.utils.enable_progress_bars()


@functools.lru_cache(maxsize=8)
def _open(ds: LocalDataset) -> datasets.Dataset:
    """load_from_disk for a save_to_disk folder (a DatasetDict's train split), load_dataset for files."""
    import datasets

    if ds.files:
        ds.schema()  # a corrupt file or files of different columns: one line, not the builder's traceback
        # NOTE: the first call converts the files into datasets' cache; `split="train"` is the builder's
        # name for all of them, not a split of the rows
        return datasets.load_dataset(ds.builder, data_files=[str(f) for f in ds.files], split="train")
    try:
        loaded = datasets.load_from_disk(str(ds.path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(f"{ds.path} is not a readable save_to_disk folder ({str(e).splitlines()[0]})") from None
    if (ds.path / DICT_MARKER).is_file():  # a DatasetDict: read its train split
        if TRAIN_SPLIT not in loaded:
            first = ds.path / next(iter(loaded))
            raise DataError(f"{ds.path} is a DatasetDict without a {TRAIN_SPLIT!r} split (its splits: "
                            f"{', '.join(loaded)}); name one split's folder, e.g. {first}")  # fmt: skip
        return loaded[TRAIN_SPLIT]
    return loaded
