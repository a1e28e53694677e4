"""Shared fixtures: a tiny model config and small on-disk corpora, so tests run in seconds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A model small enough that a 10-step run takes about a second on one CPU core.
TINY = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.num_experts=4",
    "model.expert_hidden=32",
    "model.shared_hidden=32",
    "model.dense_hidden=64",
    "model.first_dense_layers=0",
    "model.max_seq_len=32",
    "data.seq_len=32",
    "train=smoke",
    "logger.progress=false",
    "logger.plots=false",
]


def _write_corpus(folder: Path) -> Path:
    """A folder of 40 small text files: enough documents to split by file."""
    folder.mkdir()
    for i in range(40):
        lines = [f"def function_{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(30)]
        (folder / f"doc_{i:02d}.txt").write_text("".join(lines))
    return folder


@pytest.fixture
def text_corpus(tmp_path: Path) -> Path:
    return _write_corpus(tmp_path / "corpus")


@pytest.fixture(scope="module")
def text_corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same corpus, shared by a module's tests."""
    return _write_corpus(tmp_path_factory.mktemp("corpus") / "corpus")


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m epmoe.train <args>` in a subprocess; returns the completed process."""
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONHASHSEED": "0"}
    return subprocess.run(
        [sys.executable, "-m", "epmoe.train", *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a test's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
