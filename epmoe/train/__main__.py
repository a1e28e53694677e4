"""`python -m epmoe.train <hydra overrides>`: the rank entry point.

Examples:
    python -m epmoe.train                                   # the default small MoE run
    python -m epmoe.train model=dense_small train.steps=50
    python -m epmoe.train router=deepseek_v3 router.top_k=4 logger=wandb
    python -m epmoe.train --multirun router.top_k=1,2,4 router.renormalize=false  # a sweep, one dir per job
    torchrun --nproc-per-node=2 -m epmoe.train parallel.ep=2 hydra.run.dir=runs/a
    deepspeed --num_gpus=2 --module epmoe.train parallel.ep=2 hydra.run.dir=runs/a
(under several ranks, name the run dir: every rank must write to the same one; the launcher,
`python -m epmoe.launch`, does that for you)

Exit statuses (epmoe/exit_codes.py): 0 done; 2 bad config values, unusable data or checkpoint,
before any work, with one line on stderr; 1 a collective failed because another rank died or
hung (longer than train.collective_timeout_s), one line; 75 stopped by SIGTERM or SIGUSR1
(preemption, a time limit) after every rank saved the checkpoint the line names; 130 stopped by
Ctrl-C (SIGINT), with a checkpoint where the ranks could agree on one. A rank dies with its
parent (torchrun, the launcher): it gets SIGTERM then, and stops as above.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import nullcontext
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from epmoe.comm.parallel_dims import ParallelConfigError
from epmoe.comm.process import PeerLostError, die_with_parent, end_process, launched_rank, peer_failures_as_errors
from epmoe.config import Config, ConfigError, register_configs
from epmoe.exit_codes import EXIT_INTERRUPTED, EXIT_JOB_FAILED, EXIT_PREEMPTED, EXIT_USAGE
from epmoe.train.checkpoint_files import CheckpointError
from epmoe.train.cli import CONFIG_NAME, expand_path_overrides, load_config, resolve_config
from epmoe.train.console import ConsoleLog
from epmoe.train.data import DataError
from epmoe.train.runs import WANDB_TAG_CHARS
from epmoe.train.stop import Preempted
from epmoe.train.trainer import TrainingAborted, train

USER_ERRORS = (ConfigError, ParallelConfigError, DataError, CheckpointError)


def _fail(message: str, code: int = EXIT_USAGE, every_rank: bool = True) -> None:
    """One line on stderr (a value holding a newline is shown escaped), then exit `code`.
    every_rank=False: an error every rank finds alike (the config) is printed by rank 0 only."""
    if every_rank or launched_rank() == 0:
        print("error: " + message.replace("\n", "\\n"), file=sys.stderr)
    sys.exit(code)


@hydra.main(config_path="pkg://epmoe.conf", config_name=CONFIG_NAME, version_base="1.3")
def _run(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)  # Hydra has made it (and .hydra/ in it)
    # rank 0 keeps what its console shows in train.log, the error lines below included
    with ConsoleLog(run_dir / "train.log") if launched_rank() == 0 else nullcontext():
        try:
            config = resolve_config(cfg, HydraConfig.get().overrides.task)
            _name_sweep_job(config)
            with peer_failures_as_errors(config.train.collective_timeout_s):
                result = train(config, run_dir)
        except (ConfigError, ParallelConfigError) as e:
            _fail(str(e), every_rank=False)
        except USER_ERRORS as e:  # the data or a checkpoint: what one node sees may differ
            _fail(str(e))
        except (PeerLostError, TrainingAborted) as e:
            _fail(str(e), EXIT_JOB_FAILED)
        except Preempted as e:
            if e.main:  # one line for the job, not one per rank
                print(e, file=sys.stderr)
            sys.exit(EXIT_PREEMPTED)
        except KeyboardInterrupt:
            sys.exit(EXIT_INTERRUPTED)
    return result.val_loss  # what a sweeper would optimise


def _name_sweep_job(config: Config) -> None:
    """A job of `--multirun` gets the sweep as its wandb group and its overrides as tags (unless
    set: the launcher's sweep sets them for the jobs it launches)."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or config.logger.wandb_group is not None:
        return
    config.logger.wandb_group = str(Path(hydra_cfg.sweep.dir).resolve())
    config.logger.wandb_tags = [o[:WANDB_TAG_CHARS] for o in hydra_cfg.overrides.task]


def _is_single_run(argv: list[str]) -> bool:
    return not any(a in ("-m", "--multirun") or a.startswith(("--cfg", "-c", "--info", "--help", "-h")) for a in argv)


def _take_local_rank_argument() -> None:
    """`deepspeed --module epmoe.train` passes `--local_rank=N` (unless --no_local_rank), which
    Hydra would reject as an override: move it into LOCAL_RANK, where torchrun puts it."""
    rest = []
    for arg in sys.argv[1:]:
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ["LOCAL_RANK"] = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    sys.argv[1:] = rest


def main() -> None:
    die_with_parent(signal.SIGTERM)
    register_configs()
    _take_local_rank_argument()
    sys.argv[1:] = expand_path_overrides(sys.argv[1:])  # before Hydra parses them: `~` is its delete operator
    argv = sys.argv[1:]
    if _is_single_run(argv):
        # Compose once up front so a bad override is one line and exit 2, not Hydra's
        # multi-line report (sweeps are checked per job by Hydra itself).
        try:
            load_config([a for a in argv if not a.startswith("-")])
        except ConfigError as e:
            _fail(str(e), every_rank=False)
        except CheckpointError as e:
            _fail(str(e))
    try:
        _run()
    except SystemExit as e:  # _fail's exit code, or Hydra's
        end_process(e.code if isinstance(e.code, int) else 1)
    end_process(0)


if __name__ == "__main__":
    main()
