"""The command lines and scripts a launcher runs: pure functions of the config, easy to test."""

from __future__ import annotations

import re
import shlex
import socket
import sys
from pathlib import Path

from epmoe.config import ConfigError, LauncherConfig
from epmoe.exit_codes import EXIT_PREEMPTED

DEFAULT_PORT = 29500  # torch.distributed's and DeepSpeed's default master port


def run_dir_override(run_dir: Path) -> str:
    """`hydra.run.dir=<run_dir>` as the ranks' Hydra will read it back: a path with characters
    Hydra's override grammar gives a meaning to (spaces, quotes, commas, brackets) is quoted,
    with its quotes and trailing backslashes escaped as Hydra's quoted strings expect."""
    text = str(run_dir)
    if re.fullmatch(r"[\w/.@%+:-]+", text):
        return f"hydra.run.dir={text}"
    body = text.replace("'", "\\'")
    stripped = body.rstrip("\\")
    trailing = "\\\\" * (len(body) - len(stripped))  # each trailing backslash doubled
    return f"hydra.run.dir='{stripped}{trailing}'"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# torchrun forwards these to the ranks (its default list lacks SIGUSR1, Slurm's warning signal)
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def torchrun_prefix(lc: LauncherConfig, python: str = sys.executable) -> list[str]:
    """`python -m epmoe.launch.torchrun` (torchrun with the ranks' exit statuses, see there) with
    the options every launch uses: ranks per node, signals, the ranks' time to save, restarts."""
    return [python, "-m", "epmoe.launch.torchrun", f"--nproc-per-node={lc.nproc_per_node}",
            f"--signals-to-handle={TORCHRUN_SIGNALS}", f"--shutdown-timeout={lc.shutdown_timeout_s}",
            f"--max-restarts={lc.max_restarts}"]  # fmt: skip


def torchrun_command(
    lc: LauncherConfig, overrides: list[str], run_dir: Path, python: str = sys.executable
) -> list[str]:
    """torchrun (`torchrun_prefix`) ... `-m epmoe.train <overrides> hydra.run.dir=<run_dir>`.

    One node: the rendezvous and the ranks' store listen on 127.0.0.1 only (the epmoe-bound
    backend of epmoe/launch/torchrun.py; `--standalone` would listen on every interface).
    Several nodes with launcher.local_addr: on that address only; without it, torch's c10d
    backend (every interface: there is no address to choose)."""
    cmd = torchrun_prefix(lc, python)
    if lc.nnodes == 1:
        cmd += ["--nnodes=1", "--rdzv-backend=epmoe-bound", "--rdzv-endpoint=127.0.0.1:0", "--local-addr=127.0.0.1"]
    elif lc.rdzv_endpoint:
        cmd += [f"--nnodes={lc.nnodes}", f"--node-rank={lc.node_rank}",
                f"--rdzv-backend={'epmoe-bound' if lc.local_addr else 'c10d'}",
                f"--rdzv-endpoint={lc.rdzv_endpoint}"]  # fmt: skip
        if lc.local_addr:
            # NOTE: torchrun finds the store's host by resolving its own hostname, which fails
            # where that name maps to another interface (containers, network namespaces)
            hosts_store = lc.rdzv_endpoint.rsplit(":", 1)[0] == lc.local_addr
            cmd += [f"--local-addr={lc.local_addr}", f"--rdzv-conf=is_host={str(hosts_store).lower()}"]
    else:  # static rendezvous at node 0
        cmd += [f"--nnodes={lc.nnodes}", f"--node-rank={lc.node_rank}", f"--master-addr={lc.master_addr}",
                f"--master-port={lc.master_port or DEFAULT_PORT}"]  # fmt: skip
    return [*cmd, "-m", "epmoe.train", *overrides, run_dir_override(run_dir)]


def mpirun_command(lc: LauncherConfig, overrides: list[str], run_dir: Path, master_port: int,
                   python: str = sys.executable) -> list[str]:  # fmt: skip
    """The venv's `mpiexec` (the mpich wheel) running nproc_per_node ranks on this node; the
    ranks map MPI's rank variables onto torch.distributed's and meet at MASTER_ADDR:PORT."""
    mpiexec = str(Path(python).parent / "mpiexec")
    return [mpiexec, "-n", str(lc.nproc_per_node), "-genv", "MASTER_ADDR", "127.0.0.1", "-genv", "MASTER_PORT",
            str(master_port), python, "-m", "epmoe.train", *overrides, run_dir_override(run_dir)]  # fmt: skip


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
    return [*cmd, "--module", "epmoe.train", *overrides, run_dir_override(run_dir)]


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


# what a #SBATCH line or a shell line cannot hold safely: a newline, carriage return or NUL ends
# the directive (or command) early and starts another one; the other control characters are refused too
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def refuse_control_characters(values: dict[str, str]) -> None:
    """ConfigError naming the first key whose value holds a control character (it would add a
    line to launch.sbatch); `values` maps a config key (or "override N") to its text."""
    for key, value in values.items():
        if _CONTROL.search(value):
            raise ConfigError(
                f"{key}={value!r} holds a control character (newline, carriage return, NUL, ...) that would add a "
                f"line to the Slurm script; remove it"
            )


def refuse_unquotable(values: dict[str, str]) -> None:
    """ConfigError naming the first value a remote shell would split or expand: the DeepSpeed
    runner hands the ranks' arguments to pdsh as one unquoted shell line."""
    for key, value in values.items():
        if shlex.quote(value) != value:
            raise ConfigError(
                f"{key}={value!r} has characters a shell would interpret, and launcher=deepspeed with several nodes "
                f"passes it through ssh unquoted; use letters, digits and @%+=:,./_- only, or launcher=torchrun"
            )


def sbatch_script(lc: LauncherConfig, overrides: list[str], run_dir: Path, python: str = sys.executable,
                  threads: int = 0) -> str:  # fmt: skip
    """An sbatch script: one srun task per node, each a torchrun agent for nproc_per_node ranks.

    - `--signal=USR1@<signal_lead_s>` (no `B:`): Slurm signals the job steps, not the batch
      shell. Each srun task is torchrun, which forwards SIGUSR1 to its ranks once (they run in
      sessions of their own); where Slurm signals every process of the step, a rank sees it
      twice, which is harmless (repeats are ignored while it saves). The batch shell needs no trap.
    - the ranks save and exit 75; torchrun, then srun, pass 75 on; with launcher.requeue the
      script requeues the job (`scontrol requeue`), and the restarted ranks resume from the run
      directory's newest checkpoint.
    - `--cpus-per-task`: launcher.cpus_per_task, else nproc_per_node x max(train.threads, 1)
      (`threads`).
    - launcher.setup lines run before srun, as written (they are shell commands by design);
      every other value is shlex-quoted; `refuse_control_characters` ran before (launch's check).
    """
    cpus = lc.cpus_per_task or lc.nproc_per_node * max(threads, 1)
    lines = [
        "#!/bin/bash",
        "#SBATCH --job-name=epmoe",
        f"#SBATCH --nodes={lc.nnodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --time={lc.time_limit}",
        f"#SBATCH --output={run_dir}/slurm-%j.out",
        f"#SBATCH --signal=USR1@{lc.signal_lead_s}",
    ]
    if lc.requeue:
        lines.append("#SBATCH --requeue")
    if lc.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={lc.gpus_per_node}")
    if lc.partition:
        lines.append(f"#SBATCH --partition={lc.partition}")
    torchrun = " ".join(shlex.quote(a) for a in torchrun_prefix(lc, python))
    train_args = " ".join(shlex.quote(a) for a in [*overrides, run_dir_override(run_dir)])
    lines += [
        "set -euo pipefail",
        *lc.setup,
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "status=0",
        f'srun {torchrun} --nnodes="$SLURM_NNODES" --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d '
        f'--rdzv-endpoint="$head_node":{DEFAULT_PORT} -m epmoe.train {train_args} || status=$?',
    ]
    if lc.requeue:
        lines.append(f'if [ "$status" -eq {EXIT_PREEMPTED} ]; then scontrol requeue "$SLURM_JOB_ID"; fi')
    lines.append('exit "$status"')
    return "\n".join(lines) + "\n"
