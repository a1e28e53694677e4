"""The launcher's own options: --help lists every config group's options, --cfg job prints the
composed config and starts nothing, other flags are one-line errors; path values expand ~ and
$VARS (a shell leaves `key=~/x` alone, and Hydra's grammar would read `~` as its delete operator)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from epmoe.train.cli import load_config
from tests.conftest import REPO

CONF = REPO / "conf"


def _launch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epmoe.launch", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})  # fmt: skip


def test_help_lists_every_group_and_option_and_starts_nothing(tmp_path: Path) -> None:
    proc = _launch("--help", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m epmoe.launch")
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("  ") and line.split()}
    for group in (d for d in CONF.iterdir() if d.is_dir() and list(d.glob("*.yaml"))):
        listed = lines[group.name].split(None, 1)[1].split(", ")
        assert listed == sorted(p.stem for p in group.glob("*.yaml")), group.name
    assert not (tmp_path / "run").exists()


def test_cfg_job_prints_the_composed_config_with_paths_expanded(tmp_path: Path) -> None:
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text("a book. " * 4000)
    proc = _launch("--cfg", "job", "data=text", "data.path=~/books", "data.seq_len=32", "train.resume=$RUNS/old",
                   "train.steps=7", f"hydra.run.dir={tmp_path / 'run'}",
                   env={"HOME": str(tmp_path), "RUNS": str(tmp_path / "runs")})  # fmt: skip
    # --cfg job makes the launch's own checks: the resume target named through $RUNS is not there
    assert proc.returncode == 2 and f"{tmp_path}/runs/old does not exist" in proc.stderr, proc.stderr
    proc = _launch("--cfg", "job", "data=text", "data.path=~/books", "data.seq_len=32", "train.steps=7",
                   f"hydra.run.dir={tmp_path / 'run'}", env={"HOME": str(tmp_path)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["data"]["path"] == f"{tmp_path}/books"
    assert cfg["train"]["steps"] == 7 and cfg["launcher"]["name"] == "local"
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_other_flags_are_one_line_errors() -> None:
    for args, message in ((["--cfg", "hydra"], "--cfg takes 'job'"), (["--multirun"], "nothing to sweep"),
                          (["--cfg", "job", "parallel.ep=3"], "ep (3)"),  # the launch's checks: world 1
                          (["--cfg", "job", "launcher=torchrun", "launcher.nproc_per_node=2", "parallel.ep=4"],
                           "ep (4) must divide world size (2)")):  # fmt: skip
        proc = _launch(*args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, (args, proc.stderr)


def test_path_values_expand_home_and_variables(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CORPUS", "/data/corpus it's")
    assert load_config(["data=text", "data.path=~/books/"]).data.path == f"{tmp_path}/books/"
    assert load_config(["data=text", "data.path=$CORPUS/a.txt"]).data.path == "/data/corpus it's/a.txt"
    assert load_config(["launcher=deepspeed", "launcher.hostfile=~"]).launcher.hostfile == str(tmp_path)
