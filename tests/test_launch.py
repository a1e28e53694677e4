"""`python -m epmoe.launch`: validation before any rank starts, torchrun runs and exit statuses, slurm scripts
(nothing injected), the DeepSpeed runner. Signals to a running job: tests/test_launch_signals.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from epmoe.config import ConfigError, LauncherConfig
from epmoe.launch.__main__ import check
from epmoe.launch.commands import deepspeed_command, read_hostfile, run_dir_override, sbatch_script, torchrun_command
from epmoe.launch.supervise import exit_status
from epmoe.launch.torchrun import rank_exit_status

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
    run_dir = tmp_path / "a b"  # quoted as Hydra quotes; the folder is named without the quotes
    proc = _launch("launcher=slurm", "launcher.partition=gpu", "parallel.ep=8", "model.num_experts=16",
                   "launcher.setup=[module load cuda,source .venv/bin/activate]", "train.threads=2",
                   f"hydra.run.dir='{run_dir}'", timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a b"]
    script = (run_dir / "launch.sbatch").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --cpus-per-task=16", "#SBATCH --signal=USR1@120", "#SBATCH --requeue",
                 "module load cuda", "source .venv/bin/activate",
                 'if [ "$status" -eq 75 ]; then scontrol requeue "$SLURM_JOB_ID"; fi', 'exit "$status"'):  # fmt: skip
        assert f"\n{line}\n" in script, line
    assert script.index("source .venv/bin/activate") < script.index("\nsrun ")
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert " -m epmoe.launch.torchrun --nproc-per-node=8 --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 " \
           "--shutdown-timeout=300 --max-restarts=0 --nnodes=\"$SLURM_NNODES\" --rdzv-id=\"$SLURM_JOB_ID\" " \
           "--rdzv-backend=c10d --rdzv-endpoint=\"$head_node\":29500 -m epmoe.train " in srun  # fmt: skip
    assert srun.endswith(" parallel.ep=8 model.num_experts=16 'launcher.setup=[module load cuda,source "
                         ".venv/bin/activate]' train.threads=2 " + shlex.quote(f"hydra.run.dir='{run_dir}'")
                         + " || status=$?")  # fmt: skip


def test_sbatch_script_options_follow_the_launcher_config() -> None:
    lc = LauncherConfig(name="slurm", nproc_per_node=4, cpus_per_task=6, requeue=False, signal_lead_s=300)
    script = sbatch_script(lc, ["x=$(reboot)"], Path("/r"), threads=8)
    assert "#SBATCH --cpus-per-task=6\n" in script and "#SBATCH --signal=USR1@300\n" in script
    assert "--requeue" not in script and "scontrol requeue" not in script
    assert " 'x=$(reboot)' hydra.run.dir=/r || status=$?\n" in script  # an override is data, never a command
    assert "#SBATCH --cpus-per-task=32\n" in sbatch_script(LauncherConfig(nproc_per_node=4), [], Path("/r"), threads=8)
    assert "#SBATCH --cpus-per-task=4\n" in sbatch_script(LauncherConfig(nproc_per_node=4), [], Path("/r"))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("launcher.partition='gpu\nrm -rf ~'", "launcher.partition"),
        ("launcher.partition='gpu\x00'", "launcher.partition"),
        ("launcher.setup=['module load x\nrm -rf ~']", "launcher.setup[0]"),
        ("hydra.run.dir='{tmp}/r\nrm -rf ~'", "hydra.run.dir"),
        ("logger.wandb_project='a\rrm -rf ~'", "override 2"),
    ],
)
def test_a_control_character_cannot_add_a_line_to_the_slurm_script(override: str, key: str, tmp_path: Path) -> None:
    args = ["launcher=slurm", override.format(tmp=tmp_path)]
    if not override.startswith("hydra.run.dir"):
        args.append(f"hydra.run.dir={tmp_path}/r")
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=.* holds a control character .*; remove it$"):
        check(args)
    # launcher.time_limit is refused by validation already: only Slurm's time formats pass
    with pytest.raises(ConfigError, match=r"^launcher\.time_limit \(1:00\rx\) must be a Slurm time"):
        check(["launcher=slurm", "launcher.time_limit='1:00\rx'", f"hydra.run.dir={tmp_path}/r"])


def test_an_injected_line_exits_2_before_anything_is_written(tmp_path: Path) -> None:
    proc = _launch("launcher=slurm", "launcher.partition='gpu\nrm -rf ~'", f"hydra.run.dir={tmp_path}/r", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: launcher.partition='gpu\\nrm -rf ~' holds a control character (newline, carriage return, NUL, "
        "...) that would add a line to the Slurm script; remove it\n"
    )
    assert not (tmp_path / "r").exists()


def test_deepspeed_on_several_nodes_refuses_what_ssh_would_interpret(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("n0 slots=2\nn1 slots=2\n")
    with pytest.raises(ConfigError, match=r"^override 4=\"logger.wandb_project='a;reboot'\" has characters a shell"):
        check(["launcher=deepspeed", "launcher.nnodes=2", f"launcher.hostfile={hostfile}",
               "logger.wandb_project='a;reboot'", f"hydra.run.dir={tmp_path}/r"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"^hydra.run.dir='/tmp/a b' has characters a shell would interpret"):
        check(["launcher=deepspeed", "launcher.nnodes=2", f"launcher.hostfile={hostfile}", "hydra.run.dir='/tmp/a b'"])


def test_run_dir_override_reads_back_as_the_same_path() -> None:
    parser = OverridesParser.create()
    for path in ("/runs/a", "/runs/a b", "/runs/it's", "/runs/a=b,c", "/runs/x\\"):
        text = run_dir_override(Path(path))
        assert parser.parse_override(text).value() == path, text
    assert run_dir_override(Path("/runs/a")) == "hydra.run.dir=/runs/a"


def test_torchrun_command_multi_node() -> None:
    lc = LauncherConfig(name="torchrun", nproc_per_node=4, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29400",
                        max_restarts=3, shutdown_timeout_s=90)  # fmt: skip
    cmd = torchrun_command(lc, ["parallel.ep=8"], Path("/runs/a"), python="py")
    assert cmd == ["py", "-m", "epmoe.launch.torchrun", "--nproc-per-node=4",
                   "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=90",
                   "--max-restarts=3", "--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d",
                   "--rdzv-endpoint=10.0.0.1:29400", "-m", "epmoe.train", "parallel.ep=8",
                   "hydra.run.dir=/runs/a"]  # fmt: skip
    one_node = torchrun_command(LauncherConfig(name="torchrun"), [], Path("/r"), python="py")
    assert one_node[7:11] == ["--nnodes=1", "--rdzv-backend=epmoe-bound", "--rdzv-endpoint=127.0.0.1:0",
                              "--local-addr=127.0.0.1"]  # fmt: skip
    for addr, is_host in (("10.0.0.1", "true"), ("10.0.0.2", "false")):
        lc = LauncherConfig(name="torchrun", nnodes=2, rdzv_endpoint="10.0.0.1:29400", local_addr=addr)
        cmd = torchrun_command(lc, [], Path("/r"))
        assert cmd[9:13] == ["--rdzv-backend=epmoe-bound", "--rdzv-endpoint=10.0.0.1:29400", f"--local-addr={addr}",
                             f"--rdzv-conf=is_host={is_host}"]  # fmt: skip
    static = LauncherConfig(name="torchrun", nnodes=2, node_rank=1, master_addr="10.0.0.1")
    assert torchrun_command(static, [], Path("/r"), python="py")[7:11] == [
        "--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=29500"]  # fmt: skip
    assert "--gpus-per-node" not in sbatch_script(LauncherConfig(name="slurm", gpus_per_node=0), [], Path("/r"))


def test_rank_statuses_the_job_passes_on() -> None:
    assert rank_exit_status([2, 2]) == 2 and rank_exit_status([75, 75]) == 75 and rank_exit_status([130]) == 130
    assert rank_exit_status([2, 1]) is None and rank_exit_status([75, -9]) is None and rank_exit_status([]) is None
    assert exit_status(75) == 75 and exit_status(-signal.SIGTERM) == 143


@pytest.mark.parametrize(("code", "status"), [(2, 2), (75, 75), (3, 1)])
def test_torchrun_wrapper_passes_on_what_the_ranks_agree_on(code: int, status: int, tmp_path: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(f"import sys\nprint('error: rank said no', file=sys.stderr)\nsys.exit({code})\n")
    cmd = torchrun_command(LauncherConfig(name="torchrun", nproc_per_node=2), [], tmp_path)
    cmd = [*cmd[: cmd.index("-m", 3)], str(script)]  # the same torchrun, running this script as its ranks
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == status, proc.stderr[-3000:]
    assert proc.stderr.count("error: rank said no") == 2
    assert ("Root Cause (first observed failure)" in proc.stderr) == (status == 1)  # torch's report only for a crash
    assert "Traceback" not in proc.stderr


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
