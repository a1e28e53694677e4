"""The command lines and scripts a launcher runs: pure functions of the config, easy to test."""

from __future__ import annotations

import shlex
import socket
import sys
from pathlib import Path

from epmoe.config import LauncherConfig


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(
    lc: LauncherConfig, overrides: list[str], run_dir: Path, python: str = sys.executable
) -> list[str]:
    """`python -m torch.distributed.run ... -m epmoe.train <overrides> hydra.run.dir=<run_dir>`."""
    cmd = [python, "-m", "torch.distributed.run", f"--nproc-per-node={lc.nproc_per_node}"]
    if lc.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={lc.nnodes}", f"--node-rank={lc.node_rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={lc.rdzv_endpoint}"]  # fmt: skip
    cmd += [f"--max-restarts={lc.max_restarts}", "-m", "epmoe.train", *overrides, f"hydra.run.dir={run_dir}"]
    return cmd


def mpirun_command(lc: LauncherConfig, overrides: list[str], run_dir: Path, master_port: int,
                   python: str = sys.executable) -> list[str]:  # fmt: skip
    """The venv's `mpiexec` (the mpich wheel) running nproc_per_node ranks on this node; the
    ranks map MPI's rank variables onto torch.distributed's and meet at MASTER_ADDR:PORT."""
    mpiexec = str(Path(python).parent / "mpiexec")
    return [mpiexec, "-n", str(lc.nproc_per_node), "-genv", "MASTER_ADDR", "127.0.0.1", "-genv", "MASTER_PORT",
            str(master_port), python, "-m", "epmoe.train", *overrides, f"hydra.run.dir={run_dir}"]  # fmt: skip


def sbatch_script(lc: LauncherConfig, overrides: list[str], run_dir: Path, python: str = sys.executable) -> str:
    """An sbatch script: one srun task per node, each a torchrun agent for nproc_per_node ranks."""
    lines = [
        "#!/bin/bash",
        "#SBATCH --job-name=epmoe",
        f"#SBATCH --nodes={lc.nnodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --time={lc.time_limit}",
        f"#SBATCH --output={run_dir}/slurm-%j.out",
    ]
    if lc.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={lc.gpus_per_node}")
    if lc.partition:
        lines.append(f"#SBATCH --partition={lc.partition}")
    train_args = " ".join(shlex.quote(a) for a in [*overrides, f"hydra.run.dir={run_dir}"])
    lines += [
        "set -euo pipefail",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"srun {shlex.quote(python)} -m torch.distributed.run --nnodes=$SLURM_NNODES "
        f"--nproc-per-node={lc.nproc_per_node} --rdzv-id=$SLURM_JOB_ID --rdzv-backend=c10d "
        f"--rdzv-endpoint=$head_node:29500 --max-restarts={lc.max_restarts} -m epmoe.train {train_args}",
    ]
    return "\n".join(lines) + "\n"
