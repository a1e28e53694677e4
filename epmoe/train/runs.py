"""Reading finished run directories: their metrics, config and overrides, and a sweep's summary.

A run directory holds `metrics.jsonl` (loggers.py) and Hydra's `.hydra/` (config.yaml, the
composed config; overrides.yaml, the command line's overrides). A sweep directory holds one run
directory per job, named by the job's number (Hydra's `hydra.sweep.subdir`, and the launcher's).
`python -m epmoe.plot` and both sweeps' summary tables (the launcher's, and `SweepSummary` for
`python -m epmoe.train --multirun`) read runs through here.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from epmoe.config import Config
from epmoe.train.console import human
from epmoe.train.loggers import read_metrics

METRICS = "metrics.jsonl"
# the overrides a sweep adds to name its jobs' wandb runs: they say which sweep, not what it changed
WANDB_GROUP, WANDB_TAGS = "logger.wandb_group", "logger.wandb_tags"
WANDB_TAG_CHARS = 64  # wandb refuses longer tags


def history(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metric records, in order ([] if it has none)."""
    path = Path(run_dir) / METRICS
    return read_metrics(path) if path.is_file() else []


def run_config(run_dir: Path) -> Config | None:
    """The run's composed config (.hydra/config.yaml), or None if it has none."""
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path)))


def run_overrides(run_dir: Path) -> list[str]:
    """The command line's overrides of the run (.hydra/overrides.yaml) but a sweep's wandb names,
    [] if none."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    overrides = (yaml.safe_load(path.read_text()) or []) if path.is_file() else []
    return [o for o in overrides if not o.startswith((f"{WANDB_GROUP}=", f"{WANDB_TAGS}="))]


def labels(run_dirs: list[Path]) -> list[str]:
    """Each run's overrides that not every run shares (its directory name where none), so a
    sweep's jobs are told apart by what the sweep changed."""
    overrides = [run_overrides(d) for d in run_dirs]
    common = set.intersection(*(set(o) for o in overrides)) if overrides else set()
    named = [" ".join(o for o in own if o not in common) or Path(d).name for own, d in zip(overrides, run_dirs)]
    if len(set(named)) < len(named):  # runs the overrides do not tell apart
        named = [f"{label} ({d})" for label, d in zip(named, run_dirs)]
    return named


def sweep_jobs(sweep_dir: Path) -> list[Path]:
    """The job directories of a sweep, by job number."""
    return sorted((d for d in Path(sweep_dir).iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))


def _last(records: list[dict[str, Any]], key: str) -> float | None:
    return next((r[key] for r in reversed(records) if isinstance(r.get(key), (int, float))), None)


def summary_table(run_dirs: list[Path], exit_codes: list[int] | None = None) -> str:
    """A markdown table of the runs: what sets each apart, its exit status (where given, one per
    run), steps done, final validation loss and bits per byte, and median tokens/s (the first step
    left out: it pays one-time set-up)."""
    head = ["job", "overrides", *(["exit"] if exit_codes is not None else []), "steps", "val loss", "bits/byte",
            "tok/s"]  # fmt: skip
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if h != "overrides" else "---" for h in head) + "|"]
    for i, (label, run_dir) in enumerate(zip(labels(run_dirs), run_dirs)):
        records = history(run_dir)
        val, bpb = _last(records, "val_loss"), _last(records, "val_bpb")
        rates = [r["tokens_per_s"] for r in records[1:] if "tokens_per_s" in r]
        cells = [
            Path(run_dir).name,
            label,
            *([str(exit_codes[i])] if exit_codes is not None else []),
            str(records[-1]["step"]) if records else "0",
            f"{val:.4f}" if val is not None else "-",
            f"{bpb:.4f}" if bpb is not None else "-",
            human(statistics.median(rates)) if rates else "-",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


class SweepSummary(Callback):
    """Hydra callback (conf/config.yaml's hydra.callbacks): `python -m epmoe.train --multirun`
    ends with the table of its jobs, also written to <sweep dir>/summary.md."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        if not sweep_dir.is_dir():
            return
        jobs = sweep_jobs(sweep_dir)
        table = summary_table(jobs)
        (sweep_dir / "summary.md").write_text(f"# sweep {sweep_dir}\n\n{table}\n")
        print(f"\nsweep {sweep_dir}: {len(jobs)} jobs\n{table}")
