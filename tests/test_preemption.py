"""Faults a cluster injects into a rank, for real (signals sent to running processes): nothing lost,
no silent wrong resume, one run per directory.

The launcher's side (signals to the launcher or torchrun, no orphans) is tests/test_launch_signals.py.
Each run is the tiny model on a small corpus: a few seconds. Waits are generous: a run is
signalled once its first metrics record is on disk, whenever that is on a loaded machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from epmoe.exit_codes import EXIT_PREEMPTED, EXIT_USAGE
from epmoe.train import checkpoint_files

from .conftest import REPO, TINY

STEPS = 40
BASE = [*TINY, "train.sample_bytes=0", f"train.steps={STEPS}", "train.eval_every=20", "logger.console=false"]


def _command(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "epmoe.train", *BASE, "data=text", f"data.path={corpus}", *extra,
            f"hydra.run.dir={run_dir}"]  # fmt: skip


def _run(corpus: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(corpus, run_dir, *extra), cwd=REPO, capture_output=True, text=True, timeout=300)


def _start(corpus: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    """A run under way: returns once its first step's record is in metrics.jsonl."""
    proc = subprocess.Popen(_command(corpus, run_dir, *extra), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 240  # generous: start-up is ~5 s, but the machine is shared
    while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the run logged no step in 240 s"
        time.sleep(0.05)
    return proc


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _files(run_dir: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of everything under run_dir/checkpoints."""
    root = checkpoint_files.checkpoint_dir(run_dir)
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def uninterrupted(text_corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("clean") / "run"
    proc = _run(text_corpus_dir, run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


def test_sigusr1_saves_exits_75_and_a_resume_by_run_dir_alone_ends_with_the_uninterrupted_loss(
    text_corpus_dir: Path, tmp_path: Path, uninterrupted: Path
) -> None:
    run_dir = tmp_path / "run"
    proc = _start(text_corpus_dir, run_dir)
    proc.send_signal(signal.SIGUSR1)  # what `sbatch --signal=USR1@...` sends ahead of the time limit
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(rf"stopped by SIGUSR1 after step (\d+): checkpoint (\S+); continue with "
                         rf"train.resume={re.escape(str(run_dir))}", last)  # fmt: skip
    assert match, last
    step, ckpt = int(match.group(1)), Path(match.group(2))
    assert 1 <= step < STEPS and ckpt == checkpoint_files.resolve(run_dir)
    assert checkpoint_files.verify(ckpt)["step"] == step
    assert [r["step"] for r in _records(run_dir)] == list(range(1, step + 1))

    # the config comes from the checkpoint: train.resume alone continues the same run, here in its own directory
    resumed = subprocess.run([sys.executable, "-m", "epmoe.train", f"train.resume={run_dir}",
                              f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from step {step} of {ckpt}" in resumed.stderr
    records = _records(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # each step once
    clean = _records(uninterrupted)
    assert records[-1]["val_loss"] == pytest.approx(clean[-1]["val_loss"], rel=1e-6)
    assert records[-1]["loss"] == pytest.approx(clean[-1]["loss"], rel=1e-6)


def test_a_second_run_in_a_busy_run_dir_fails_at_once_and_sigterm_twice_still_saves_once(
    text_corpus_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    first = _start(text_corpus_dir, run_dir, "train.steps=100000")
    second = _run(text_corpus_dir, run_dir, "train.steps=100000")
    assert second.returncode == EXIT_USAGE
    assert second.stderr.count("\n") == 1, second.stderr
    assert second.stderr.startswith(f"error: run directory {run_dir} is in use by another run (pid {first.pid} on ")
    assert first.poll() is None  # the first run goes on

    first.send_signal(signal.SIGTERM)
    first.send_signal(signal.SIGTERM)  # a second signal while it stops (and saves) changes nothing
    time.sleep(0.2)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == EXIT_PREEMPTED, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM after step ")
    (ckpt,) = checkpoint_files.complete_checkpoints(checkpoint_files.checkpoint_dir(run_dir))
    assert checkpoint_files.verify(ckpt)["step"] == len(_records(run_dir))
    assert not list(checkpoint_files.checkpoint_dir(run_dir).glob("*.tmp"))


@pytest.mark.parametrize("steps", [STEPS - 10, STEPS])
def test_resume_with_train_steps_not_beyond_the_checkpoint_is_refused_touching_nothing(
    steps: int, uninterrupted: Path
) -> None:
    before = _files(uninterrupted)
    proc = subprocess.run([sys.executable, "-m", "epmoe.train", f"train.resume={uninterrupted}",
                           f"train.steps={steps}", f"hydra.run.dir={uninterrupted}"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == EXIT_USAGE
    assert proc.stderr == (
        f"error: train.steps ({steps}) is not beyond the step of the checkpoint to resume ({STEPS}, in "
        f"{uninterrupted}): nothing would be trained and the checkpoint of step {steps} would be overwritten; "
        f"raise train.steps above {STEPS}\n"
    )
    assert _files(uninterrupted) == before
    assert os.path.exists(uninterrupted / "checkpoints" / f"step_{STEPS:08d}")
