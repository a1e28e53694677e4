"""Everything about a run that can be checked before any rank starts (the launcher calls
`check` once; every rank calls it again, for runs started without the launcher).

Work in progress (issue 13): filled in by the trainer side of that issue.
"""

from __future__ import annotations

from pathlib import Path

from epmoe.config import Config


def check(cfg: Config, run_dir: Path, ranks_on_node: int) -> None:
    """Raise ConfigError / DataError / CheckpointError (one line each) for what cannot work on
    this machine: data, resume target, run directory, disk, memory, threads."""
