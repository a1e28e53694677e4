"""Single-process checkpoints: one file per save, written atomically, loaded weights-only.

Layout: `<run_dir>/checkpoints/step_<N>.pt`. A save writes `step_<N>.pt.tmp`, fsyncs it and
renames it into place, so a crash mid-write never leaves a file that looks complete. Loading
uses `torch.load(weights_only=True)`: a checkpoint carrying pickled objects is refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
_NAME = re.compile(r"step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or read; the message names the file."""


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save(run_dir: Path, step: int, state: dict[str, Any]) -> Path:
    """Atomically write `state` (tensors, numbers, strings, lists, dicts) for `step`."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:08d}.pt"
    tmp = final.with_name(final.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save({"format_version": FORMAT_VERSION, "step": step, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def latest(path: Path) -> Path:
    """The checkpoint file `path` names: itself if a file, else the newest in a run or checkpoint dir."""
    if path.is_file():
        return path
    folder = path if path.name == "checkpoints" else checkpoint_dir(path)
    found = sorted((int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := _NAME.search(p.name)))
    if not found:
        raise CheckpointError(f"no checkpoint (step_*.pt) under {path}; pass a checkpoint file or a run directory")
    return found[-1][1]


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by `save`, refusing anything but plain tensors and containers."""
    file = latest(Path(path))
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign / unsafe files
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load checkpoint {file}: {first_line}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file} is not an epmoe checkpoint of format version {FORMAT_VERSION}")
    return state
