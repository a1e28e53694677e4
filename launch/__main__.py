"""`python -m epmoe.launch <hydra overrides>` (console script `epmoe-launch`): start the ranks.

1. fix one run directory for every rank (`hydra.run.dir`, quoted or not, parsed as Hydra
   parses it; else outputs/<date>/<time>);
2. compose and validate the config once, here (`check`): bad values, impossible degrees
   (checked against the world this launch will make), values that would add a line to a
   Slurm script, and what `epmoe.train.preflight.check` finds on this machine (data, resume
   target, run directory, disk, memory, threads) fail with one line and exit code 2, before
   any rank starts and before the run directory is created;
3. start the ranks: `launcher=torchrun` runs torchrun (`python -m epmoe.launch.torchrun`: one
   node's rendezvous on 127.0.0.1 only, SIGUSR1 forwarded to the ranks, the ranks' exit
   statuses passed on); `launcher=deepspeed` runs the DeepSpeed runner (this node, or a
   hostfile's hosts); `launcher=mpirun` runs the venv's mpiexec on this node;
   `launcher=slurm` writes <run dir>/launch.sbatch and prints it (or submits it with
   launcher.submit=true); `launcher=local` runs one process.

Signals (epmoe/launch/supervise.py): SIGINT, SIGTERM, SIGUSR1 and SIGHUP sent to the launcher
are forwarded, once, to its child (which runs in its own process group, so Ctrl-C in a
terminal is not delivered twice); the ranks save a checkpoint on SIGTERM / SIGUSR1 and stop. A
job not gone launcher.shutdown_timeout_s (+30 s) after the signal is SIGKILLed, its whole
process tree. The child dies with a SIGKILLed launcher (PR_SET_PDEATHSIG), and processes the
child leaves behind are ended before the launcher exits: no orphans.

Exit statuses (epmoe/exit_codes.py): 0 the job finished; 2 the user's input cannot work (one
line "error: ..." on stderr, from this check or from the ranks); 75 the job was stopped by a
signal after every rank saved a complete checkpoint (run the same command to continue); 1 the
job failed otherwise; 128 + N the job was ended by signal N without a checkpoint.
"""

from __future__ import annotations

import datetime
import importlib.resources
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from epmoe.comm.parallel_dims import ParallelConfigError, ParallelDims
from epmoe.config import Config, ConfigError
from epmoe.exit_codes import EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USAGE
from epmoe.launch.commands import (
    DEFAULT_PORT,
    deepspeed_command,
    free_port,
    mpirun_command,
    read_hostfile,
    refuse_control_characters,
    refuse_unquotable,
    run_dir_override,
    sbatch_script,
    torchrun_command,
)
from epmoe.launch.supervise import run
from epmoe.launch.sweep import MULTIRUN_FLAGS, plan
from epmoe.train import preflight
from epmoe.train.checkpoint_files import CheckpointError
from epmoe.train.cli import CONFIG_MODULE, expand_path, load_config
from epmoe.train.data import DataError, check_source
from epmoe.train.runs import summary_table

# one line each: the user's input cannot work
LAUNCH_ERRORS = (ConfigError, ParallelConfigError, DataError, CheckpointError)
RUN_DIR_KEY = "hydra.run.dir"


def _fail(message: str) -> NoReturn:
    print("error: " + message.replace("\n", "\\n"), file=sys.stderr)  # one line, whatever a value holds
    sys.exit(EXIT_USAGE)


def _run_dir(overrides: list[str]) -> tuple[Path, list[str]]:
    """The run directory named by hydra.run.dir=, else a new timestamped one; overrides without it.

    The value is read as Hydra reads it (OverridesParser): `hydra.run.dir='/a b'` names `/a b`,
    not a folder whose name starts with a quote. Raises ConfigError for a value Hydra rejects."""
    rest, named = [], []
    for text in overrides:
        if not text.startswith(f"{RUN_DIR_KEY}="):
            rest.append(text)
            continue
        try:
            value = OverridesParser.create().parse_override(text).value()
        except HydraException as e:
            raise ConfigError(f"{text!r} is not an override Hydra can parse ({str(e).splitlines()[0]}); "
                              f"quote the path: {RUN_DIR_KEY}='<path>'") from None  # fmt: skip
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{text} does not name a directory; pass {RUN_DIR_KEY}=<path>")
        named.append(expand_path(value))
    if named:
        return Path(named[-1]).resolve(), rest
    return Path("outputs", datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S")).resolve(), rest


def _refuse_unsafe_shell_values(cfg: Config, overrides: list[str], run_dir: Path) -> None:
    """What the Slurm script and DeepSpeed's ssh line would carry must not add a command."""
    lc = cfg.launcher
    texts = {f"override {i + 1}": o for i, o in enumerate(overrides) if not o.startswith(f"{RUN_DIR_KEY}=")}
    texts[RUN_DIR_KEY] = str(run_dir)
    if lc.name == "slurm":
        setup = {f"launcher.setup[{i}]": line for i, line in enumerate(lc.setup)}
        refuse_control_characters(
            {"launcher.partition": lc.partition or "", "launcher.time_limit": lc.time_limit, **setup, **texts}
        )
    if lc.name == "deepspeed" and lc.nnodes > 1:
        refuse_unquotable(texts)


def check(overrides: list[str], run_dir: Path | None = None) -> tuple[Config, int]:
    """Compose and validate the config for this launch; return it and the world size it makes.

    Raises one of LAUNCH_ERRORS with a one-line message for anything that cannot work: bad
    values, degrees that do not fit the world, a missing launcher package or hostfile, values
    that would inject lines into a shell script, and what `preflight.check` finds for the run
    directory `run_dir` (default: the one the overrides name) on this machine: data, resume
    target, disk, memory, threads (not under Slurm: the ranks run elsewhere). Creates nothing.
    """
    if run_dir is None:
        run_dir = _run_dir(overrides)[0]
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
    _refuse_unsafe_shell_values(cfg, overrides, run_dir)
    if lc.name != "slurm":
        check_source(cfg.data)
        preflight.check(cfg, run_dir, lc.nproc_per_node if lc.name != "local" else 1)
    return cfg, world


def _child_env(cfg: Config) -> dict[str, str] | None:
    """The ranks' environment: on one node, gloo's sockets on loopback too (GLOO_SOCKET_IFNAME,
    torch.distributed's documented choice of interface) unless the user chose an interface."""
    lc = cfg.launcher
    one_node = lc.name != "local" and lc.nnodes == 1
    if not one_node or "GLOO_SOCKET_IFNAME" in os.environ or not Path("/sys/class/net/lo").exists():
        return None
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}


def usage() -> str:
    """`--help`: what the launcher takes, with every config group's options read from conf/."""
    conf = Path(str(importlib.resources.files(CONFIG_MODULE)))
    groups = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(conf.iterdir()) if d.is_dir()}
    lines = [
        "usage: python -m epmoe.launch [--help] [--cfg job] [--multirun] [GROUP=OPTION ...] [KEY=VALUE ...]",
        "",
        "Compose epmoe's config (conf/config.yaml with the overrides), check everything that can be",
        "checked here (one 'error: ...' line and exit 2 otherwise), then start the ranks with the",
        "chosen launcher in one run directory (hydra.run.dir=<path>, else outputs/<date>/<time>).",
        "",
        "  --help, -h   this text",
        "  --cfg job    print the composed, validated config and exit (nothing starts)",
        "  --multirun   sweep: KEY=A,B (or range(..), glob(..)) makes one job per value, their product",
        "               over several keys; each job is checked first, then launched in turn in",
        "               <hydra.sweep.dir>/<n> (else multirun/<date>/<time>/<n>); a table of the jobs'",
        "               validation loss and tokens/s ends it (also <sweep dir>/summary.md)",
        "",
        "config groups (GROUP=OPTION):",
        *(f"  {name:<11}{', '.join(options)}" for name, options in groups.items() if options),
        "",
        "any field as KEY=VALUE, e.g. train.steps=600 parallel.ep=2 data=text data.path=~/books",
        "(paths expand ~ and $VARS); --cfg job lists them all with their values.",
        "",
        "examples:",
        "  python -m epmoe.launch experiment=ep2_cpu",
        "  python -m epmoe.launch launcher=torchrun launcher.nproc_per_node=4 parallel.ep=4",
        "  python -m epmoe.launch launcher=slurm launcher.nnodes=2 launcher.nproc_per_node=4 parallel.ep=8",
        "  python -m epmoe.launch --multirun experiment=ep2_cpu router.top_k=1,2 train.steps=100",
    ]
    return "\n".join(lines)


def composed_config(overrides: list[str]) -> str:
    """`--cfg job`: the config this launch would run, as YAML, after every check the launch
    itself makes (`check`: the degrees against the world it would start, data, memory, ...)."""
    return OmegaConf.to_yaml(OmegaConf.structured(check(overrides)[0]))


def main(argv: list[str] | None = None) -> None:
    overrides = list(sys.argv[1:] if argv is None else argv)
    if {"--help", "-h"} & set(overrides):
        print(usage())
        return
    if "--cfg" in overrides:
        i = overrides.index("--cfg")
        if overrides[i + 1 : i + 2] != ["job"]:
            _fail("--cfg takes 'job' (the composed config): python -m epmoe.launch --cfg job [overrides]")
        try:
            print(composed_config(overrides[:i] + overrides[i + 2 :]), end="")
        except LAUNCH_ERRORS as e:
            _fail(str(e))
        return
    if multirun := [o for o in overrides if o in MULTIRUN_FLAGS]:
        sys.exit(_sweep([o for o in overrides if o not in multirun]))
    if flags := [o for o in overrides if o.startswith("-")]:
        _fail(f"{flags[0]} is not an option of epmoe.launch (it takes --help, --cfg job, --multirun and KEY=VALUE "
              "overrides)")  # fmt: skip
    try:
        run_dir, rank_overrides = _run_dir(overrides)
        cfg, world = check(overrides, run_dir)
    except LAUNCH_ERRORS as e:
        _fail(str(e))
    sys.exit(_start(cfg, world, rank_overrides, run_dir))


def _start(cfg: Config, world: int, rank_overrides: list[str], run_dir: Path) -> int:
    """Start the checked job's ranks in `run_dir` and wait for them; their exit status."""
    lc = cfg.launcher
    run_dir.mkdir(parents=True, exist_ok=True)
    if lc.name == "slurm":
        script = run_dir / "launch.sbatch"
        script.write_text(sbatch_script(lc, rank_overrides, run_dir, threads=cfg.train.threads))
        print(f"wrote {script}")
        if not lc.submit:
            print(script.read_text(), end="")
            return 0
        if shutil.which("sbatch") is None:
            _fail("launcher.submit=true but sbatch is not on PATH; submit the script on the cluster")
        return subprocess.call(["sbatch", str(script)])
    if lc.name == "local":
        cmd = [sys.executable, "-m", "epmoe.train", *rank_overrides, run_dir_override(run_dir)]
    elif lc.name == "mpirun":
        cmd = mpirun_command(lc, rank_overrides, run_dir, lc.master_port or free_port())
    elif lc.name == "deepspeed":
        port = lc.master_port or (free_port() if lc.nnodes == 1 else DEFAULT_PORT)
        cmd = deepspeed_command(lc, rank_overrides, run_dir, port)
    else:
        cmd = torchrun_command(lc, rank_overrides, run_dir)
    if lc.name != "local":  # one rank in place says all itself: its stderr stays the rank's own
        print(f"epmoe.launch: {world} rank(s), run dir {run_dir}", file=sys.stderr)
    return run(cmd, lc.shutdown_timeout_s, _child_env(cfg))


def _sweep(overrides: list[str]) -> int:
    """--multirun: check every job first (one line and exit 2 naming the job if one cannot run,
    before any starts), then launch them one after another; a job stopped by a signal (75, 130,
    128+N) ends the sweep. Prints and writes (<sweep dir>/summary.md) the jobs' table; the exit
    status is the first failed job's, else 0."""
    try:
        sweep_dir, jobs = plan(overrides)
        checked = []
        for job in jobs:
            job_overrides = job.with_wandb_names(sweep_dir)
            try:
                checked.append((job, job_overrides, *check(job_overrides, job.run_dir)))
            except LAUNCH_ERRORS as e:
                raise type(e)(f"job {job.num} ({' '.join(job.swept) or 'no swept values'}): {e}") from None
    except LAUNCH_ERRORS as e:
        _fail(str(e))
    print(f"epmoe.launch: sweep of {len(jobs)} jobs in {sweep_dir}", file=sys.stderr)
    codes: list[int] = []
    for job, job_overrides, cfg, world in checked:
        print(f"epmoe.launch: job {job.num + 1}/{len(jobs)}: {' '.join(job.swept)}", file=sys.stderr)
        codes.append(_start(cfg, world, job_overrides, job.run_dir))
        if codes[-1] in (EXIT_PREEMPTED, EXIT_INTERRUPTED) or codes[-1] > 128:
            print(f"epmoe.launch: job {job.num} stopped by a signal (exit {codes[-1]}); the sweep ends here",
                  file=sys.stderr)  # fmt: skip
            break
    ran = [job.run_dir for job, *_ in checked[: len(codes)]]
    table = summary_table(ran, codes)
    (sweep_dir / "summary.md").write_text(f"# sweep {sweep_dir}\n\n{table}\n")
    print(f"\nsweep {sweep_dir}: {len(codes)} of {len(jobs)} jobs ran\n{table}")
    return next((c for c in codes if c != 0), 0)


if __name__ == "__main__":
    main()
