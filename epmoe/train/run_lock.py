"""One run per run directory: an OS file lock on `<run_dir>/run.lock`, held by rank 0 for the
life of the run.

Two runs writing into one directory would overwrite each other's checkpoints and interleave
their metrics. `fcntl.flock` is released by the kernel whenever the holder exits — also on
SIGKILL or a crash — so a stale lock cannot outlive its run, and a torchrun restart (whose
previous processes are gone) takes it again. The file names its holder for the error message.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
from pathlib import Path

from epmoe.config import ConfigError

LOCK_FILE = "run.lock"


class RunLock:
    """The lock on one run directory; `release` (or the process's exit) frees it."""

    def __init__(self, run_dir: Path):
        """Take the lock at once or raise ConfigError naming the run that holds it."""
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text().strip() or "another process"
            os.close(self._fd)
            self._fd = None
            raise ConfigError(
                f"run directory {run_dir} is in use by another run ({holder}); wait for it to end, "
                "or choose another hydra.run.dir"
            ) from None
        started = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def check_free(run_dir: Path) -> None:
    """Raise ConfigError if a run holds `run_dir`'s lock now (a launcher's early check; the run's
    rank 0 takes the lock itself)."""
    if (Path(run_dir) / LOCK_FILE).exists():
        RunLock(run_dir).release()
