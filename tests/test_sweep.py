"""Sweeps: `python -m epmoe.launch --multirun` expands overrides as Hydra's basic sweeper does,
checks every job before any starts, launches them in turn, names their wandb runs (group: the
sweep, tags: the swept values, read back from wandb's own records) and ends with a table; the
Hydra callback gives `python -m epmoe.train --multirun` the same table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from epmoe.config import ConfigError
from epmoe.launch.sweep import plan
from epmoe.train.runs import SweepSummary
from tests.conftest import REPO, TINY
from tests.wandb_records import _records


def test_plan_is_the_product_of_the_swept_values_last_key_fastest(tmp_path: Path) -> None:
    sweep_dir, jobs = plan(["router.top_k=2,4", "train.steps=3", "parallel.ep=1,2", f"hydra.sweep.dir={tmp_path}/s"])
    assert sweep_dir == tmp_path / "s"
    assert [job.overrides for job in jobs] == [
        ["router.top_k=2", "train.steps=3", "parallel.ep=1"],
        ["router.top_k=2", "train.steps=3", "parallel.ep=2"],
        ["router.top_k=4", "train.steps=3", "parallel.ep=1"],
        ["router.top_k=4", "train.steps=3", "parallel.ep=2"],
    ]
    assert [job.run_dir for job in jobs] == [tmp_path / "s" / str(n) for n in range(4)]
    assert jobs[3].swept == ["router.top_k=4", "parallel.ep=2"]
    assert jobs[3].with_wandb_names(sweep_dir)[-2:] == [
        f"logger.wandb_group='{tmp_path}/s'",
        "logger.wandb_tags=['router.top_k=4','parallel.ep=2']",
    ]
    assert len(plan(["train.steps=range(1,4)"])[1]) == 3


def test_plan_refuses_a_run_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"set hydra.sweep.dir=<path> instead"):
        plan(["router.top_k=2,4", f"hydra.run.dir={tmp_path}"])


def _wandb_run(job_dir: Path):
    from wandb.proto import wandb_internal_pb2

    (path,) = (job_dir / "wandb").glob("offline-run-*/*.wandb")
    for data in _records(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "run":
            return record.run
    raise AssertionError(f"no run record in {path}")


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epmoe.launch", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "WANDB_SILENT": "true"}, timeout=300)  # fmt: skip


def test_launcher_sweep_checks_every_job_first_then_runs_each_and_tabulates(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    common = [*TINY, "train.steps=2", "train.eval_every=2", "train.sample_bytes=0", "train.threads=1",
              "logger.progress=false", "logger.plots=false", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    # job 1 (top_k=8 > 4 experts) cannot run: refused before job 0 starts
    bad = _launch("--multirun", *common, "router.top_k=2,8")
    assert bad.returncode == 2 and bad.stderr.startswith("error: job 1 (router.top_k=8): ")
    assert bad.stderr.count("\n") == 1 and not sweep.exists()

    proc = _launch("--multirun", *common, "router.top_k=1,2", "router.renormalize=false", "logger.wandb=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index(f"sweep {sweep}: 2 of 2 jobs ran") :].splitlines()[1:]
    assert table[0] == "| job | overrides | exit | steps | val loss | bits/byte | tok/s |"
    for n, top_k in enumerate((1, 2)):
        job = sweep / str(n)
        records = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        assert table[2 + n].startswith(f"| {n} | router.top_k={top_k} | 0 | 2 | {records[-1]['val_loss']:.4f} | ")
        run = _wandb_run(job)
        assert run.run_group == str(sweep) and list(run.tags) == [f"router.top_k={top_k}"]
    assert (sweep / "summary.md").read_text().endswith("\n".join(table[:4]) + "\n")


def test_train_multirun_callback_writes_the_table_of_the_sweep_dir(tmp_path: Path, capsys) -> None:
    for n, loss in enumerate((2.5, 2.25)):
        job = tmp_path / str(n)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- router.top_k={n + 1}\n")
        (job / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0, "val_loss": loss}) + "\n")
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    rows = (tmp_path / "summary.md").read_text().splitlines()[-2:]
    assert rows == ["| 0 | router.top_k=1 | 1 | 2.5000 | - | - |", "| 1 | router.top_k=2 | 1 | 2.2500 | - | - |"]
    assert f"sweep {tmp_path}: 2 jobs" in capsys.readouterr().out
