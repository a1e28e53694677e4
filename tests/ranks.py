"""Training jobs on spawned gloo ranks: `spawn_jobs(world, jobs)` starts `world` processes once and
runs every (overrides, run dir) job in turn in their one process group, returning rank 0's
losses and held-out loss of each. A process start (torch imported, a group formed) costs seconds
on the 2-core test machines, a job on the tiny model about one: tests group their jobs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

from .conftest import free_port


def _worker(rank: int, world: int, port: int, jobs: list[tuple[list[str], str]], out: str) -> None:
    from epmoe.comm.process import end_process
    from epmoe.train.cli import load_config
    from epmoe.train.trainer import train

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")  # fmt: skip
    torch.set_num_threads(1)
    results = []
    for overrides, run_dir in jobs:
        result = train(load_config(overrides), Path(run_dir))
        results.append({"losses": result.losses, "val": result.val_loss})
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    end_process(0)  # as the rank entry point ends (see end_process)


def spawn_jobs(world: int, jobs: list[tuple[list[str], Path]]) -> list[dict]:
    """[{"losses", "val"}] of each job, run in order by `world` spawned ranks."""
    out = jobs[0][1].parent / f"{jobs[0][1].name}.jobs.json"
    mp.spawn(_worker, args=(world, free_port(), [(o, str(d)) for o, d in jobs], str(out)), nprocs=world)
    return json.loads(out.read_text())


def spawn_train(world: int, overrides: list[str], run_dir: Path) -> dict:
    """One job: {"losses", "val"} of rank 0."""
    return spawn_jobs(world, [(overrides, run_dir)])[0]
