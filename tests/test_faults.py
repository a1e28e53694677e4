"""A dead or hung peer ends a rank with a one-line error within train.collective_timeout_s, not a hang.

Two gloo ranks on CPU. Rank 1 joins, takes part in one all-reduce, then either exits abruptly
(its connections close) or stops answering (alive, silent); rank 0's next all-reduce must end
in a PeerLostError naming the timeout. End to end, `python -m epmoe.train` prints that error as
one line and exits with code 1 when its peer is killed mid-training.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from epmoe.comm.process import PeerLostError, all_reduce_sum_, init_from_env, peer_failures_as_errors
from epmoe.train import checkpoint_files
from epmoe.train.cli import load_config
from epmoe.train.trainer import train

from .conftest import REPO, TINY, free_port

TIMEOUT_S = 3.0


def _worker(rank: int, port: int, peer: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_from_env(torch.device("cpu"), timeout_s=TIMEOUT_S)
    all_reduce_sum_(torch.ones(4))  # both ranks are up and connected
    if rank == 1:
        if peer == "dies":
            os._exit(1)  # no clean-up: the way a crashed or killed rank goes
        time.sleep(120)  # hung: alive, holding its connections, never joining the next collective (killed below)
    start = time.monotonic()
    try:
        with peer_failures_as_errors(TIMEOUT_S):
            all_reduce_sum_(torch.ones(4))
        outcome = {"error": None}
    except PeerLostError as e:
        outcome = {"error": str(e)}
    outcome["seconds"] = time.monotonic() - start
    Path(out).write_text(json.dumps(outcome))
    os._exit(0)  # the group's peer is gone: skip destroying it


@pytest.mark.parametrize("peer", ["dies", "hangs"])
def test_a_lost_peer_ends_the_collective_within_the_timeout(tmp_path: Path, peer: str) -> None:
    out, port = tmp_path / "rank0.json", free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(rank, port, peer, str(out))) for rank in range(2)]
    for p in procs:
        p.start()
    procs[0].join(timeout=60)
    hung = procs[0].is_alive()
    for p in procs:
        p.kill()
        p.join()
    assert not hung, "rank 0 hung past the collective timeout"
    outcome = json.loads(out.read_text())
    message = outcome["error"]
    assert message is not None and "\n" not in message
    assert message.startswith("a collective failed (")
    assert "train.collective_timeout_s=3 s" in message
    if peer == "dies":  # its connections closed: no need to wait for the timeout
        assert re.search("Connection (closed|reset) by peer", message)
        assert outcome["seconds"] < TIMEOUT_S
    else:  # silent: the collective gives up after the timeout, not much later
        assert "Timed out" in message
        assert TIMEOUT_S - 0.5 <= outcome["seconds"] <= TIMEOUT_S + 3


def test_other_errors_pass_through_unchanged() -> None:
    with pytest.raises(ValueError, match="not a peer"), peer_failures_as_errors(TIMEOUT_S):
        raise ValueError("not a peer")
    with pytest.raises(RuntimeError, match="shape mismatch"), peer_failures_as_errors(TIMEOUT_S):
        raise RuntimeError("shape mismatch")


def test_a_killed_rank_ends_its_peer_with_one_line_and_exit_1(tmp_path: Path, text_corpus: Path) -> None:
    """`python -m epmoe.train` as two ranks (the environment torchrun would give them, without
    its agent, which would tear the job down itself); rank 1 is killed once training runs."""
    run_dir, port = tmp_path / "run", free_port()
    args = [*TINY, "data=text", f"data.path={text_corpus}", "train.steps=100000", "train.eval_every=0",
            "train.collective_timeout_s=5", "train.threads=1", f"hydra.run.dir={run_dir}"]  # fmt: skip
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONHASHSEED": "0"}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-m", "epmoe.train", *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # training is under way
            assert procs[0].poll() is None and time.monotonic() < deadline, procs[0].communicate()[1][-3000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = procs[0].communicate(timeout=60)
        seconds = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert procs[0].returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: a collective failed (") and "train.collective_timeout_s=5 s" in last
    assert seconds < 5 + 10  # ended by the closed connection or the timeout, with room for a loaded machine


# --- non-finite steps: skip or abort; the kill-a-rank drill under torchrun with restarts ---


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_nonfinite_skip_counts_the_step_and_keeps_the_weights_finite(tmp_path: Path, text_corpus: Path) -> None:
    from epmoe.train.cli import load_config
    from epmoe.train.trainer import train

    cfg = load_config([*TINY, "data=text", f"data.path={text_corpus}", "train.fault.nan_at_step=4",
                       "train.on_nonfinite=skip"])  # fmt: skip
    result = train(cfg, tmp_path / "run")
    skipped = [r["step"] for r in _records(tmp_path / "run") if r.get("skipped_nonfinite")]
    assert skipped == [4]
    assert all(torch.isfinite(v).all() for v in torch.load(next((tmp_path / "run").rglob("common.pt")),
                                                           weights_only=True)["model"].values())  # fmt: skip
    assert math.isfinite(result.val_loss) and result.losses[-1] < result.losses[0]


def test_nonfinite_abort_stops_with_the_step_and_saves_the_last_good_state(tmp_path: Path, text_corpus: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "epmoe.train", *TINY, "data=text", f"data.path={text_corpus}",
                           "train.fault.nan_at_step=4", f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite training step 4 (loss nan") and "last good state (step 3)" in last
    assert (run_dir / "checkpoints" / "step_00000003" / "manifest.json").is_file()


DRILL = ["launcher=torchrun", "launcher.nproc_per_node=2", "parallel.ep=2", *TINY, "train.steps=12",
         "train.checkpoint_every=4", "train.eval_every=0", "train.sample_bytes=0",
         "launcher.max_restarts=1"]  # fmt: skip


def test_kill_a_rank_drill_restarts_resumes_and_ends_with_the_uninterrupted_loss(
    tmp_path: Path, text_corpus: Path
) -> None:
    def launch(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "epmoe.launch", *DRILL, "data=text", f"data.path={text_corpus}",
                               *extra, f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True, text=True,
                              timeout=400)  # fmt: skip

    # the uninterrupted run, in this process: EP=2 on 2 ranks equals one process on the same global batch
    one_process = [*TINY, "train.steps=12", "train.eval_every=0", "train.sample_bytes=0", "train.batch_size=8"]
    clean = train(load_config([*one_process, "data=text", f"data.path={text_corpus}"]), tmp_path / "clean")
    drill = launch(tmp_path / "drill", "train.fault.kill_rank=1", "train.fault.at_step=10")
    # kill -9 of a rank in the middle of a save: its shard of step 8 is on disk, the checkpoint is not complete
    in_save = launch(
        tmp_path / "in_save", "train.fault.kill_rank=1", "train.fault.at_step=8", "train.fault.in_save=true"
    )
    for run, name, killed, newest in (
        (drill, "drill", "exits abruptly at step 10", 8),
        (in_save, "in_save", "is killed (SIGKILL) while saving step 8", 4),
    ):
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"fault drill: rank 1 {killed}" in run.stderr
        assert "restart 1: resuming from the newest complete checkpoint" in run.stderr
        assert f"resumed from step {newest} of " in run.stderr  # the newest complete checkpoint
        records = _records(tmp_path / name)
        assert [r["step"] for r in records] == list(range(1, 13))  # the steps after `newest` ran twice, logged once
        assert records[-1]["loss"] == pytest.approx(clean.losses[-1], rel=1e-5)
    saved = checkpoint_files.complete_checkpoints(checkpoint_files.checkpoint_dir(tmp_path / "in_save"))
    assert [p.name for p in saved] == [f"step_{n:08d}" for n in (4, 8, 12)]  # 8 saved again after the restart
    assert all(checkpoint_files.verify(p) for p in saved)
