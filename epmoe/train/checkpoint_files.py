"""The files of a checkpoint: names, atomic fsynced writes, checksums, the manifest, and
finding, verifying and pruning complete checkpoints. What goes into the files (and how a
checkpoint reshards on load) is epmoe/train/checkpoint_state.py, whose docstring has the layout.

A checkpoint directory `step_<N>/` (N zero-padded to 8 digits) is complete when it holds its
manifest (written last, after every file is fsynced and hashed); `step_<N>.tmp/` never is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import torch

from epmoe.comm.process import all_reduce_sum_
from epmoe.durable import sha256_file
from epmoe.train import manifest as schema
from epmoe.train.manifest import COMMON, FORMAT_VERSION, MANIFEST, expert_file  # noqa: F401  (re-exported)

STEP_DIR = re.compile(r"step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, verified or read; the message names the file."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (it failed verification) in favour of an older complete one, or
    is resumed with another data stream or source than it was saved with."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


class _Writer:
    """The file object torch.save writes through, keeping the OSError of a failed write.

    NOTE: torch.save reports a failed write (ENOSPC, EFBIG, EIO) as a RuntimeError ("unexpected
    pos ...") without the errno; `write_file` raises the kept OSError instead."""

    def __init__(self, file: BinaryIO):
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def write_file(path: Path, obj: Any) -> tuple[str, int]:
    """torch.save `obj` to `path` and fsync it; returns (sha256 hex, bytes) of what is on disk.
    A failed write raises its OSError (with the errno)."""
    with path.open("wb") as f:
        out = _Writer(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise
        f.flush()
        os.fsync(f.fileno())
    return sha256_file(path), path.stat().st_size


def prune(folder: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints in `folder` (0 = keep all)."""
    old = complete_checkpoints(folder)[:-keep] if keep > 0 else []
    for path in old:
        shutil.rmtree(path)
    return old


def complete_checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoint directories (those with a manifest) in `folder`, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(folder).glob("step_*") if (m := STEP_DIR.search(p.name))]
    return [p for _, p in sorted(found) if (p / MANIFEST).is_file()]


def latest(path: Path) -> Path:
    """The checkpoint `path` names: itself if a checkpoint directory, else the newest complete
    one under a run or checkpoints directory (not verified; see `resolve`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a checkpoint directory (checkpoints/step_<N>) or a run dir")
    if STEP_DIR.search(path.name):
        if not (path / MANIFEST).is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no {MANIFEST})")
        return path
    found = complete_checkpoints(path if path.name == "checkpoints" else checkpoint_dir(path))
    if not found:
        raise CheckpointError(f"no complete checkpoint (checkpoints/step_<N>/{MANIFEST}) under {path}")
    return found[-1]


def readable(path: Path) -> tuple[Path, dict]:
    """The checkpoint `path` names and its manifest, read and validated (not its checksums: see
    `resolve`): a checkpoint directory must read; under a run or checkpoints directory the
    newest one whose manifest reads (as `resolve` would skip the others)."""
    newest = latest(path)
    if newest == Path(path):
        return newest, read_manifest(newest)
    first_error = None
    for ckpt in reversed(complete_checkpoints(newest.parent)):
        try:
            return ckpt, read_manifest(ckpt)
        except CheckpointError as e:
            first_error = first_error or e
    raise first_error


def read_manifest(ckpt: Path) -> dict:
    """The manifest of `ckpt`, checked against its schema (epmoe/train/manifest.py): a manifest
    that is unreadable, of another format version, or fails the schema is a CheckpointError
    naming the file and its first problem."""
    path = Path(ckpt) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not an epmoe checkpoint manifest of format version {FORMAT_VERSION}")
    dir_step = m.group(1) if (m := STEP_DIR.search(Path(ckpt).name)) else None
    try:
        schema.check(manifest, None if dir_step is None else int(dir_step))
    except schema.ManifestError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return manifest


def verify(ckpt: Path) -> dict:
    """Check every file against the manifest's size and sha256; returns the manifest.
    Raises CheckpointError naming the first bad file."""
    manifest = read_manifest(ckpt)
    for name, meta in manifest["files"].items():
        file = Path(ckpt) / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if (size := file.stat().st_size) != meta["bytes"]:
            raise CheckpointError(f"{file} is truncated or altered: {size} bytes, the manifest says {meta['bytes']}")
        if sha256_file(file) != meta["sha256"]:
            raise CheckpointError(f"{file} fails its sha256 checksum")
    return manifest


def resolve(path: Path) -> Path:
    """The checkpoint to resume from, verified. A checkpoint directory must verify; under a run
    (or checkpoints) directory the newest one that verifies wins, and every newer one skipped
    warns (CheckpointWarning) with its name and what is wrong."""
    path = Path(path)
    newest = latest(path)
    if newest == path:
        verify(path)
        return path
    candidates = complete_checkpoints(newest.parent)
    for ckpt in reversed(candidates):
        try:
            verify(ckpt)
            return ckpt
        except CheckpointError as e:
            warnings.warn(
                f"skipping checkpoint {ckpt}: {e}; trying the previous complete one", CheckpointWarning, stacklevel=2
            )
    raise CheckpointError(f"no checkpoint under {path} passes verification ({len(candidates)} tried)")


def agree(path: Path, is_main: bool) -> Path:
    """`resolve` on rank 0 (which reads every file's checksum); the other ranks take its choice
    (a collective: every rank calls it). Raises CheckpointError on every rank if none is usable."""
    path, chosen, error = Path(path), None, None
    if is_main:
        try:
            chosen = resolve(path)
        except CheckpointError as e:
            error = e
    step_1 = torch.tensor([int(STEP_DIR.search(chosen.name).group(1)) + 1 if chosen else 0])  # 0: none
    all_reduce_sum_(step_1)
    if error is not None:
        raise error
    if int(step_1) == 0:
        raise CheckpointError(f"rank 0 found no usable checkpoint under {path}")
    if chosen is None:
        folder = path.parent if STEP_DIR.search(path.name) else latest(path).parent
        chosen = folder / f"step_{int(step_1) - 1:08d}"
    return chosen


def load_file(file: Path, mmap: bool = False) -> dict:
    """torch.load with weights_only=True; anything else (pickled objects, a truncated file) is a
    CheckpointError naming the file."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises several types for truncated / foreign / unsafe files
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load checkpoint file {file}: {first_line}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, not a dict of tensors")
    return state
