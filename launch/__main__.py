"""`python -m epmoe.launch <hydra overrides>` (console script `epmoe-launch`): start the ranks.

1. compose and validate the config once, here (`check`): bad values, impossible degrees
   (checked against the world this launch will make) and missing data fail with one line and
   exit code 2, before any rank starts;
2. fix one run directory for every rank (`hydra.run.dir`, or outputs/<date>/<time>);
3. start the ranks: `launcher=torchrun` runs torchrun and passes its exit code on;
   `launcher=deepspeed` runs the DeepSpeed runner (this node, or a hostfile's hosts);
   `launcher=mpirun` runs the venv's mpiexec on this node;
   `launcher=slurm` writes <run dir>/launch.sbatch and prints it (or submits it with
   launcher.submit=true); `launcher=local` runs one process in place.
"""

from __future__ import annotations

import datetime
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

from epmoe.comm.parallel_dims import ParallelConfigError, ParallelDims
from epmoe.config import Config, ConfigError
from epmoe.launch.commands import (
    DEFAULT_PORT,
    deepspeed_command,
    free_port,
    mpirun_command,
    read_hostfile,
    sbatch_script,
    torchrun_command,
)
from epmoe.train.cli import load_config
from epmoe.train.data import DataError, check_source

EXIT_USAGE = 2
LAUNCH_ERRORS = (ConfigError, ParallelConfigError, DataError)  # one line each: the user's input cannot work


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _run_dir(overrides: list[str]) -> tuple[Path, list[str]]:
    """The run directory named by hydra.run.dir=, else a new timestamped one; overrides without it."""
    rest = [o for o in overrides if not o.startswith("hydra.run.dir=")]
    named = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")]
    if named:
        return Path(named[-1]).resolve(), rest
    return Path("outputs", datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S")).resolve(), rest


def check(overrides: list[str]) -> tuple[Config, int]:
    """Compose and validate the config for this launch; return it and the world size it makes.

    Raises one of LAUNCH_ERRORS with a one-line message for anything that cannot work: bad
    values, degrees that do not fit the world, a missing launcher package or hostfile, a data
    path that is not there (checked here unless the ranks run elsewhere, under Slurm).
    """
    cfg = load_config(overrides)
    lc = cfg.launcher
    if lc.name == "local" and lc.nproc_per_node * lc.nnodes > 1:
        raise ConfigError(
            f"launcher=local runs one process, not launcher.nproc_per_node={lc.nproc_per_node} x "
            f"launcher.nnodes={lc.nnodes}; use launcher=torchrun"
        )
    world = lc.nproc_per_node * lc.nnodes if lc.name != "local" else 1
    ParallelDims(world=world, dp=cfg.parallel.dp or world, ep=cfg.parallel.ep, num_experts=cfg.model.num_experts)
    if (lc.name == "mpirun" or cfg.comm.backend == "mpi") and importlib.util.find_spec("mpi4py") is None:
        raise ConfigError(f"launcher={lc.name} comm.backend={cfg.comm.backend} needs mpi4py: pip install 'epmoe[mpi]'")
    if lc.name == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("launcher=deepspeed needs DeepSpeed: pip install 'epmoe[deepspeed]'")
        if lc.hostfile:
            try:
                read_hostfile(Path(lc.hostfile), lc.nnodes, lc.nproc_per_node)
            except ValueError as e:
                raise ConfigError(str(e)) from None
    if lc.name != "slurm":
        check_source(cfg.data)
    return cfg, world


def main(argv: list[str] | None = None) -> None:
    overrides = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, world = check(overrides)
    except LAUNCH_ERRORS as e:
        _fail(str(e))
    lc = cfg.launcher
    run_dir, rank_overrides = _run_dir(overrides)
    run_dir.mkdir(parents=True, exist_ok=True)

    if lc.name == "slurm":
        script = run_dir / "launch.sbatch"
        script.write_text(sbatch_script(lc, rank_overrides, run_dir))
        print(f"wrote {script}")
        if not lc.submit:
            print(script.read_text(), end="")
            return
        if shutil.which("sbatch") is None:
            _fail("launcher.submit=true but sbatch is not on PATH; submit the script on the cluster")
        sys.exit(subprocess.call(["sbatch", str(script)]))
    if lc.name == "local":
        cmd = [sys.executable, "-m", "epmoe.train", *rank_overrides, f"hydra.run.dir={run_dir}"]
    elif lc.name == "mpirun":
        cmd = mpirun_command(lc, rank_overrides, run_dir, lc.master_port or free_port())
    elif lc.name == "deepspeed":
        port = lc.master_port or (free_port() if lc.nnodes == 1 else DEFAULT_PORT)
        cmd = deepspeed_command(lc, rank_overrides, run_dir, port)
    else:
        cmd = torchrun_command(lc, rank_overrides, run_dir)
    if lc.name != "local":  # one rank in place says all itself: its stderr stays the rank's own
        print(f"epmoe.launch: {world} rank(s), run dir {run_dir}", file=sys.stderr)
    sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
