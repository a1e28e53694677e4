"""Where metrics go: console lines, a jsonl file in the run directory, wandb (offline unless
configured), TensorBoard event files (`<run dir>/tensorboard`), and the end-of-run plots. One
`Loggers` object fans each record out.

A record is a flat dict of JSON-able values; `step` is always present, and jsonl adds `time`
(Unix seconds) to each. Lists (`expert_load`: tokens per expert per MoE layer; the per-layer
exchange times) go to jsonl and plots; scalars, the per-layer ones as `moe/L{i}/<name>` keys
included, go to wandb and TensorBoard; the console line has console.py's few fixed columns. The
expert-load heatmaps go to wandb and TensorBoard as images (`log_images`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from epmoe.config import Config, LoggerConfig
from epmoe.train.console import format_line


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers, without `step` and the lists (a scalar chart cannot draw a list)."""
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Loggers:
    def __init__(self, cfg: LoggerConfig, run_dir: Path, full_config: Config, write, start_step: int = 0):
        """write: a function printing a line without breaking the progress bar. start_step: the
        step the run resumes after (0: from the start); metrics.jsonl keeps the records of the
        steps up to it and drops the later ones, which this run computes again."""
        self.cfg, self.run_dir, self.write = cfg, run_dir, write
        self.total_steps = full_config.train.steps
        self.history: list[dict[str, Any]] = []  # the whole run's records, for the plots
        self._jsonl = None
        if cfg.jsonl:
            path = run_dir / "metrics.jsonl"
            self.history = keep_records_up_to(path, start_step)  # a resumed run's plots show all of it
            self._jsonl = path.open("a", buffering=1)
        self._wandb = None
        if cfg.wandb and cfg.wandb_mode != "disabled":
            import wandb  # imported only when asked for: it is slow to import

            self._wandb = wandb.init(
                project=cfg.wandb_project,
                entity=cfg.wandb_entity,
                mode=cfg.wandb_mode,
                dir=str(run_dir),
                name=run_dir.name,  # the run directory's name, as in the console header
                group=cfg.wandb_group,
                tags=cfg.wandb_tags or None,
                config=asdict(full_config),
                settings=wandb.Settings(silent=True, console="off"),
            )
        self._tensorboard = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    @property
    def wandb_dir(self) -> Path | None:
        return Path(self._wandb.dir).parent if self._wandb is not None else None

    def log(self, record: dict[str, Any], console: bool = True) -> None:
        self.history.append(record)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
        scalars = _scalars(record)
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, global_step=record["step"])
        if console and self.cfg.console:
            self.write(format_line(record, self.total_steps))

    @property
    def takes_images(self) -> bool:
        """Whether a dashboard (wandb, TensorBoard) is open to take images."""
        return self._wandb is not None or self._tensorboard is not None

    def log_images(self, step: int, images: dict[str, Any]) -> None:
        """{name: image_HW3 uint8} at `step` (the expert-load heatmaps) to wandb and TensorBoard."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Image(image) for name, image in images.items()}, step=step)
        if self._tensorboard is not None:
            for name, image in images.items():
                self._tensorboard.add_image(name, image, global_step=step, dataformats="HWC")

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb is not None:
            self._wandb.summary.update(values)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in order; a torn last line (the process was killed
    while writing it) is left out."""
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def keep_records_up_to(path: Path, step: int) -> list[dict[str, Any]]:
    """Rewrite the jsonl file `path` (if any) with only its records of steps <= `step`, and return
    them: a resumed or restarted run logs the steps after its checkpoint again, and each step must
    be there once."""
    if not path.exists():
        return []
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
    return kept
