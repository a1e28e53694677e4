"""`python -m epmoe.launch`: validation before any rank starts, torchrun runs, slurm scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from epmoe.config import LauncherConfig
from epmoe.launch.commands import deepspeed_command, read_hostfile, sbatch_script, torchrun_command

from .conftest import REPO, TINY, free_port


def _launch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.run([sys.executable, "-m", "epmoe.launch", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_torchrun_launcher_trains_two_ranks_with_ep2_in_one_run_dir(tmp_path: Path, text_corpus: Path) -> None:
    run_dir = tmp_path / "run"  # with the pipelined dispatcher and bf16 rows on the wire
    proc = _launch("launcher=torchrun", "launcher.nproc_per_node=2", "parallel.ep=2", "comm.dispatcher=pipelined",
                   "comm.dtype=bf16", *TINY, "data=text", f"data.path={text_corpus}",
                   f"hydra.run.dir={run_dir}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))  # rank 0 alone logs: one record per step
    assert sum(records[0]["expert_load"][0]) == 2 * 4 * 32 * 2  # 2 ranks x batch 4 x seq 32 x top-2
    assert records[-1]["loss"] < records[0]["loss"]
    assert "epmoe.launch: 2 rank(s)" in proc.stderr
    # per-layer timing of the exchange (2 MoE layers): in flight, exposed, expert compute
    for key in ("exchange_ms", "exposed_ms", "expert_ms"):
        assert all(len(r[key]) == 2 and min(r[key]) >= 0 for r in records), key
    assert all(min(r["exchange_ms"]) > 0 and min(r["expert_ms"]) > 0 for r in records)
    assert "exchange per MoE layer, mean ms/step: in flight" in proc.stdout


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.ep=4"], "ep (4) must divide world size (2)"),
        (["model.num_experts=6", "parallel.ep=4", "launcher.nproc_per_node=4"],
         "model.num_experts (6) must be divisible by parallel.ep (4)"),
        (["router.top_k=9"], "router.top_k (9) must be between 1 and model.num_experts (8)"),
        (["router.n_groups=2", "router.topk_groups=3"],
         "router.topk_groups (3) must be between 1 and router.n_groups (2)"),
    ],
)  # fmt: skip
def test_impossible_configs_fail_before_any_rank_starts(overrides: list[str], message: str, tmp_path: Path) -> None:
    proc = _launch("launcher=torchrun", "launcher.nproc_per_node=2", *overrides, f"hydra.run.dir={tmp_path}/r",
                   timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {message}"
    assert not (tmp_path / "r").exists()  # nothing was started, not even the run directory


def test_slurm_launcher_writes_the_sbatch_script(tmp_path: Path) -> None:
    proc = _launch("launcher=slurm", "launcher.partition=gpu", "parallel.ep=8", "model.num_experts=16",
                   f"hydra.run.dir={tmp_path}", timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    script = (tmp_path / "launch.sbatch").read_text()
    assert "#SBATCH --nodes=2\n" in script and "#SBATCH --gpus-per-node=8\n" in script
    assert "#SBATCH --partition=gpu\n" in script
    assert "--nproc-per-node=8 --rdzv-id=$SLURM_JOB_ID --rdzv-backend=c10d --rdzv-endpoint=$head_node:29500" in script
    assert script.rstrip().endswith(f"-m epmoe.train launcher=slurm launcher.partition=gpu parallel.ep=8 "
                                    f"model.num_experts=16 hydra.run.dir={tmp_path}")  # fmt: skip


def test_torchrun_command_multi_node() -> None:
    lc = LauncherConfig(name="torchrun", nproc_per_node=4, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29400",
                        max_restarts=3)  # fmt: skip
    cmd = torchrun_command(lc, ["parallel.ep=8"], Path("/runs/a"), python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--nproc-per-node=4", "--nnodes=2", "--node-rank=1",
                   "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400", "--max-restarts=3", "-m", "epmoe.train",
                   "parallel.ep=8", "hydra.run.dir=/runs/a"]  # fmt: skip
    assert "--standalone" in torchrun_command(LauncherConfig(name="torchrun"), [], Path("/r"))
    for addr, is_host in (("10.0.0.1", "true"), ("10.0.0.2", "false")):
        lc = LauncherConfig(name="torchrun", nnodes=2, rdzv_endpoint="10.0.0.1:29400", local_addr=addr)
        assert torchrun_command(lc, [], Path("/r"))[8:10] == [f"--local-addr={addr}", f"--rdzv-conf=is_host={is_host}"]
    static = LauncherConfig(name="torchrun", nnodes=2, node_rank=1, master_addr="10.0.0.1")
    assert torchrun_command(static, [], Path("/r"), python="py")[4:8] == [
        "--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=29500"]  # fmt: skip
    assert "--gpus-per-node" not in sbatch_script(LauncherConfig(name="slurm", gpus_per_node=0), [], Path("/r"))


@pytest.mark.skipif(
    not (Path(sys.executable).parent / "mpiexec").exists(), reason="mpiexec (the mpich wheel) is not installed"
)
def test_mpirun_launcher_trains_two_ranks_with_ep2_over_torch_and_over_mpi(tmp_path: Path, text_corpus: Path) -> None:
    losses = {}
    for backend in ("torch", "mpi"):
        run_dir = tmp_path / backend
        proc = _launch("launcher=mpirun", f"comm={backend}", "parallel.ep=2", *TINY, "data=text",
                       f"data.path={text_corpus}", f"hydra.run.dir={run_dir}")  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, 11))
        assert sum(records[0]["expert_load"][0]) == 2 * 4 * 32 * 2  # both ranks' tokens were routed
        assert f"(ep 2, tokens exchanged over {backend})" in proc.stderr
        losses[backend] = [r["loss"] for r in records]
    # the same rows cross either way: the tokens exchanged over MPI give the same training
    assert losses["mpi"] == pytest.approx(losses["torch"], rel=1e-6)


def test_mpi_backend_needs_ranks_started_by_mpi(tmp_path: Path) -> None:
    proc = _launch("launcher=torchrun", "comm=mpi", "parallel.ep=2", f"hydra.run.dir={tmp_path}/r", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: comm.backend=mpi needs ranks started by MPI: use launcher=mpirun, not launcher=torchrun"
    )


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_deepspeed_launcher_and_engine_train_ep2_with_zero2_from_a_hostfile(tmp_path: Path, text_corpus: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one node, two ranks\nlocalhost slots=2\n")
    run_dir = tmp_path / "run"
    proc = _launch("launcher=deepspeed", f"launcher.hostfile={hostfile}", "parallel.ep=2", *TINY, "data=text",
                   f"data.path={text_corpus}", "train.engine=deepspeed", "train.zero_stage=2",
                   f"hydra.run.dir={run_dir}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(run_dir)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert sum(records[0]["expert_load"][0]) == 2 * 4 * 32 * 2  # both ranks' tokens were routed
    assert "world 2 (ep 2, tokens exchanged over torch), engine deepspeed (ZeRO 2)" in proc.stderr


def test_deepspeed_module_runs_the_rank_entry_point_directly(tmp_path: Path, text_corpus: Path) -> None:
    # as a user would type it: `deepspeed --num_gpus 2 --module epmoe.train ...` (DeepSpeed adds --local_rank=N)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "epmoe.train", "parallel.ep=2", *TINY, "train.steps=3", "data=text",
           f"data.path={text_corpus}", f"hydra.run.dir={run_dir}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert [r["step"] for r in _records(run_dir)] == [1, 2, 3]


def test_deepspeed_command_and_hostfile_checks(tmp_path: Path) -> None:
    lc = LauncherConfig(name="deepspeed", nproc_per_node=4, nnodes=2, hostfile="/etc/hosts.ds", master_addr="n0")
    assert deepspeed_command(lc, ["parallel.ep=8"], Path("/runs/a"), 29501, python="py") == [
        "py", "-m", "deepspeed.launcher.runner", "--num_gpus=4", "--master_port=29501", "--no_local_rank",
        "--hostfile=/etc/hosts.ds", "--num_nodes=2", "--master_addr=n0", "--module", "epmoe.train", "parallel.ep=8",
        "hydra.run.dir=/runs/a"]  # fmt: skip
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-0 slots=8\n# spare\nworker-1 slots=4\n")
    assert read_hostfile(hostfile, nnodes=1, nproc_per_node=8) == ["worker-0"]
    with pytest.raises(ValueError, match="worker-1 has 4 slots, launcher.nproc_per_node is 8"):
        read_hostfile(hostfile, nnodes=2, nproc_per_node=8)
    with pytest.raises(ValueError, match="lists 2 host\\(s\\), launcher.nnodes is 3"):
        read_hostfile(hostfile, nnodes=3, nproc_per_node=2)
    hostfile.write_text("worker-0\n")
    with pytest.raises(ValueError, match='line 1: expected "host slots=N", got "worker-0"'):
        read_hostfile(hostfile, nnodes=1, nproc_per_node=1)


def test_a_missing_hostfile_fails_before_any_rank_starts(tmp_path: Path) -> None:
    proc = _launch("launcher=deepspeed", f"launcher.hostfile={tmp_path}/nope", f"hydra.run.dir={tmp_path}/r",
                   timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: launcher.hostfile ({tmp_path}/nope) does not exist"
    assert not (tmp_path / "r").exists()
