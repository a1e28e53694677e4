"""The jobs of `python -m epmoe.launch --multirun ...`: one launch per job, each with its ranks.

Overrides sweep as Hydra's basic sweeper sweeps them (`router.top_k=1,2,4`, `range(1,4)`,
`glob(...)`, `choice(...)`): several sweeping keys make the product of their values, in the
order given, the last key varying fastest. Job `n` runs in `<sweep dir>/<n>`, the sweep directory
being `hydra.sweep.dir=<path>` (else multirun/<date>/<time>), as `python -m epmoe.train
--multirun` lays them out; each job's wandb run gets the sweep as its group and the job's swept
values as its tags.
"""

from __future__ import annotations

import datetime
import itertools
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from epmoe.config import ConfigError
from epmoe.train.cli import expand_path, hydra_quoted
from epmoe.train.runs import WANDB_GROUP, WANDB_TAG_CHARS, WANDB_TAGS

MULTIRUN_FLAGS = ("--multirun", "-m")
SWEEP_DIR_KEY = "hydra.sweep.dir"


class Job:
    """One job of a sweep: its number, directory, overrides and the values it sweeps."""

    def __init__(self, num: int, run_dir: Path, overrides: list[str], swept: list[str]):
        self.num, self.run_dir, self.overrides, self.swept = num, run_dir, overrides, swept

    def with_wandb_names(self, sweep_dir: Path) -> list[str]:
        """The overrides plus the wandb group (the sweep) and tags (the swept values)."""
        tags = ",".join(hydra_quoted(s[:WANDB_TAG_CHARS]) for s in self.swept)
        return [*self.overrides, f"{WANDB_GROUP}={hydra_quoted(str(sweep_dir))}", f"{WANDB_TAGS}=[{tags}]"]


def plan(overrides: list[str]) -> tuple[Path, list[Job]]:
    """The sweep directory and the jobs the overrides make. Raises ConfigError for an override
    Hydra cannot parse or a `hydra.run.dir` (a sweep's jobs run in <sweep dir>/<n>)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(f"the sweep's overrides do not parse: {str(e).splitlines()[0]}") from None
    sweep_dir = Path("multirun", datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))
    choices: list[list[tuple[str, bool]]] = []  # per override: (override text, swept?) per value
    for o in parsed:
        key = o.get_key_element()
        if key == "hydra.run.dir":
            raise ConfigError(f"hydra.run.dir with --multirun: each job runs in <{SWEEP_DIR_KEY}>/<n>; "
                              f"set {SWEEP_DIR_KEY}=<path> instead")  # fmt: skip
        if key == SWEEP_DIR_KEY:
            sweep_dir = Path(expand_path(str(o.value())))
        elif o.is_sweep_override():
            choices.append([(f"{key}={v}", True) for v in o.sweep_string_iterator()])
        else:
            choices.append([(o.input_line, False)])
    if not any(swept for values in choices for _, swept in values):
        raise ConfigError("--multirun without a swept value (KEY=A,B, range(..), glob(..)): nothing to sweep; "
                          "drop --multirun for one run")  # fmt: skip
    sweep_dir = sweep_dir.resolve()
    jobs = []
    for num, combo in enumerate(itertools.product(*choices)):
        jobs.append(Job(num, sweep_dir / str(num), [text for text, _ in combo], [t for t, swept in combo if swept]))
    if not jobs:
        raise ConfigError("--multirun made no jobs: a sweep over an empty list of values")
    return sweep_dir, jobs
