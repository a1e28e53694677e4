"""Files that survive a crash: fsync a file's data or a folder's entries, and hash a file. What
checkpoints (epmoe/train/checkpoint_files.py) and token shards (epmoe/data/shards.py) both write
atomically: into a temporary name, fsynced, renamed, the parent fsynced."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

HASH_CHUNK = 1 << 24  # bytes read per update: bounded memory on files of any size


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename into it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """The file's sha256, hex."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
