"""The command lines and scripts a launcher runs: pure functions of the config, easy to test."""

from __future__ import annotations

import shlex
import socket
import sys
from pathlib import Path

from epmoe.config import LauncherConfig

DEFAULT_PORT = 29500  # torch.distributed's and DeepSpeed's default master port


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
    elif lc.rdzv_endpoint:
        cmd += [f"--nnodes={lc.nnodes}", f"--node-rank={lc.node_rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={lc.rdzv_endpoint}"]  # fmt: skip
        if lc.local_addr:
            # NOTE: torchrun finds the store's host by resolving its own hostname, which fails
            # where that name maps to another interface (containers, network namespaces)
            hosts_store = lc.rdzv_endpoint.rsplit(":", 1)[0] == lc.local_addr
            cmd += [f"--local-addr={lc.local_addr}", f"--rdzv-conf=is_host={str(hosts_store).lower()}"]
    else:  # static rendezvous at node 0
        cmd += [f"--nnodes={lc.nnodes}", f"--node-rank={lc.node_rank}", f"--master-addr={lc.master_addr}",
                f"--master-port={lc.master_port or DEFAULT_PORT}"]  # fmt: skip
    cmd += [f"--max-restarts={lc.max_restarts}", "-m", "epmoe.train", *overrides, f"hydra.run.dir={run_dir}"]
    return cmd


def mpirun_command(lc: LauncherConfig, overrides: list[str], run_dir: Path, master_port: int,
                   python: str = sys.executable) -> list[str]:  # fmt: skip
    """The venv's `mpiexec` (the mpich wheel) running nproc_per_node ranks on this node; the
    ranks map MPI's rank variables onto torch.distributed's and meet at MASTER_ADDR:PORT."""
    mpiexec = str(Path(python).parent / "mpiexec")
    return [mpiexec, "-n", str(lc.nproc_per_node), "-genv", "MASTER_ADDR", "127.0.0.1", "-genv", "MASTER_PORT",
            str(master_port), python, "-m", "epmoe.train", *overrides, f"hydra.run.dir={run_dir}"]  # fmt: skip


def deepspeed_command(lc: LauncherConfig, overrides: list[str], run_dir: Path, master_port: int,
                      python: str = sys.executable) -> list[str]:  # fmt: skip
    """The DeepSpeed runner (`deepspeed --module epmoe.train`): nproc_per_node ranks per node, on
    this node or on the hosts of lc.hostfile. `--no_local_rank`: the ranks read LOCAL_RANK
    from the environment, Hydra would reject a `--local_rank` argument."""
    cmd = [python, "-m", "deepspeed.launcher.runner", f"--num_gpus={lc.nproc_per_node}",
           f"--master_port={master_port}", "--no_local_rank"]  # fmt: skip
    master_addr = lc.master_addr
    if lc.hostfile:
        cmd += [f"--hostfile={lc.hostfile}", f"--num_nodes={lc.nnodes}"]
        if lc.nnodes == 1:
            # NOTE: with any hostfile DeepSpeed first checks ssh to its first host (and asks it
            # for its address); one node runs locally, so neither is needed
            cmd.append("--no_ssh_check")
            master_addr = master_addr or "127.0.0.1"
    if master_addr:
        cmd.append(f"--master_addr={master_addr}")
    return [*cmd, "--module", "epmoe.train", *overrides, f"hydra.run.dir={run_dir}"]


def read_hostfile(path: Path, nnodes: int, nproc_per_node: int) -> list[str]:
    """The first `nnodes` hosts of a DeepSpeed hostfile ("host slots=N" lines, # comments);
    ValueError (one line) if the file cannot give nnodes hosts of nproc_per_node slots."""
    if not path.is_file():
        raise ValueError(f"launcher.hostfile ({path}) does not exist")
    hosts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        host, _, slots = line.partition(" slots=")
        if not slots.strip().isdigit():
            raise ValueError(f'launcher.hostfile ({path}) line {number}: expected "host slots=N", got "{line}"')
        hosts.append((host.strip(), int(slots)))
    if len(hosts) < nnodes:
        raise ValueError(f"launcher.hostfile ({path}) lists {len(hosts)} host(s), launcher.nnodes is {nnodes}")
    for host, slots in hosts[:nnodes]:
        if slots < nproc_per_node:
            raise ValueError(
                f"launcher.hostfile ({path}): {host} has {slots} slots, launcher.nproc_per_node is {nproc_per_node}"
            )
    return [host for host, _ in hosts[:nnodes]]


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
