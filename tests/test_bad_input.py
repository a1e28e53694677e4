"""Bad input through the command line: one line on stderr starting with "error:", exit code 2.

Unusable data (a path that is not there, an empty or too small corpus, a binary file among the
text, a bad jsonl line, token ids the model cannot embed, a torn uint16 file) and values that
cannot work each end `python -m epmoe.train` before training, never with a traceback; the
launcher refuses a missing data path before any rank starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from .conftest import REPO, TINY, run_cli


def _binary_among_text(root: Path) -> Path:
    folder = root / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("hello world\n" * 100)
    (folder / "b.bin").write_bytes(bytes(range(256)) * 4)
    return folder


def _write(name: str, content: bytes) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        (root / name).write_bytes(content)
        return root / name

    return make


CASES = [
    ("text", _binary_among_text, "{path}/b.bin is binary, not text (a NUL byte at byte 0); data.kind=text reads text "
                                 "files only"),
    ("text", _write("empty.txt", b""), "{path} holds no text"),
    ("text", _write("small.txt", b"x" * 400),
     "{path}: the val split has 20 tokens, fewer than data.seq_len + 1 (33) for one window; add data, lower "
     "data.seq_len or raise data.val_fraction"),
    ("jsonl", _write("d.jsonl", b'{"text": "a"}\n{"text": "b"}\nnot json\n'),
     "{path}:3 is not a JSON object with a 'text' field"),
    ("bin", _write("t.bin", np.arange(1000, dtype=np.uint16).tobytes()),
     "{path} holds token id 999 >= model.vocab_size (256); raise vocab_size"),
    ("bin", _write("odd.bin", b"\x01\x00\x02"),
     "{path} has 3 bytes, an odd number: data.kind=bin reads uint16 token ids (2 bytes each)"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "make", "expected"), CASES)
def test_unusable_data_is_one_line_and_exit_2(tmp_path: Path, kind: str, make, expected: str) -> None:
    path = make(tmp_path)
    proc = run_cli(*TINY, f"data={kind}", f"data.path={path}", f"hydra.run.dir={tmp_path}/run", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == ["error: " + expected.format(path=path)]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.collective_timeout_s=0"], "train.collective_timeout_s (0.0) must be > 0 and finite"),
        (["model.vocab_size=100"], "model.vocab_size (100) must be >= 256 for byte-level data.kind=stdlib; "
                                   "token ids come with data.tokenizer or data.kind=bin"),
        (["train.beta2=1.0"], "train.beta2 (1.0) must be in [0, 1)"),
    ],
)  # fmt: skip
def test_bad_values_are_one_line_and_exit_2(tmp_path: Path, overrides: list[str], expected: str) -> None:
    proc = run_cli(*TINY, *overrides, f"hydra.run.dir={tmp_path}/run", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [f"error: {expected}"]


def test_the_launcher_refuses_a_missing_data_path_before_any_rank_starts(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    proc = subprocess.run(
        [sys.executable, "-m", "epmoe.launch", "launcher=torchrun", *TINY, "data=text", f"data.path={missing}",
         f"hydra.run.dir={tmp_path}/run"],
        cwd=REPO, env={**os.environ, "PYTHONHASHSEED": "0"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: data.path {missing} does not exist"]
    assert not (tmp_path / "run").exists()
