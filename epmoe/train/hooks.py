"""What the trainer runs around each step besides the step itself, as hooks.

A hook sees the trainer at fixed points of its loop; the loop has no branch for any of them:
- `before_step(trainer, step)`: before step `step` (0-based) starts;
- `routing(step)`: a callback for that step's expert choices, or None if the hook wants none;
- `after_step(trainer, step, record, seconds)`: the step is done; the hook may add metrics to its
  record (seconds: the step's time so far);
- `after_update(trainer, completed, record, last)`: after the schedule step, before evaluation;
- `after_evaluate(trainer)`: an evaluation ran (its exchanges are not a training step's).
`build_hooks` picks the ones a run needs, in the order they run.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from epmoe.comm.process import RankInfo
from epmoe.config import Config
from epmoe.parallel.parallelize import Parallel
from epmoe.parallel.timing import step_timing
from epmoe.train.engine import Engine
from epmoe.train.routing_stats import RoutingCounts, RoutingTrace

OnRouting = Callable[[int, torch.Tensor], None]  # (micro-batch, topk_idx_YTK)


class Trainer(Protocol):
    """What the hooks see of the trainer (trainer.py's Trainer)."""

    cfg: Config
    par: Parallel
    model: nn.Module
    engine: Engine
    start_step: int  # the first step this process runs (after a resume)
    counts: RoutingCounts | None
    trace: RoutingTrace

    def say(self, *args: Any, **kwargs: Any) -> None: ...
    def write(self, line: str) -> None: ...


class Hook:
    """The no-op hook: every point does nothing."""

    def before_step(self, trainer: Trainer, step: int) -> None:
        pass

    def routing(self, step: int) -> OnRouting | None:
        return None

    def after_step(self, trainer: Trainer, step: int, record: dict[str, Any], seconds: float) -> None:
        pass

    def after_update(self, trainer: Trainer, completed: int, record: dict[str, Any], last: bool) -> None:
        pass

    def after_evaluate(self, trainer: Trainer) -> None:
        pass


class FaultDrill(Hook):
    """train.fault.kill_rank / at_step: this rank exits abruptly at the start of that step (or,
    with train.fault.in_save, is SIGKILLed in the middle of that step's checkpoint), on the job's
    first attempt only (a torchrun restart does not repeat the drill)."""

    def before_step(self, trainer: Trainer, step: int) -> None:
        fault, info = trainer.cfg.train.fault, trainer.par.info
        if fault.kill_rank == info.rank and fault.at_step == step + 1 and info.restart == 0 and not fault.in_save:
            print(f"fault drill: rank {info.rank} exits abruptly at step {step + 1}", file=sys.stderr)
            os._exit(17)  # no cleanup, no checkpoint: as if the process had been killed

    @staticmethod
    def in_save(cfg: Config, info: RankInfo, step: int) -> Callable[[], None] | None:
        """The save's `shard_written` callback for the checkpoint of `step`: SIGKILL, where drilled."""
        fault = cfg.train.fault
        if not (fault.in_save and fault.kill_rank == info.rank and fault.at_step == step and info.restart == 0):
            return None

        def kill() -> None:
            print(f"fault drill: rank {info.rank} is killed (SIGKILL) while saving step {step}", file=sys.stderr)
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        return kill


class ChunkTuning(Hook):
    """comm.chunks=auto: the tuner sets each early step's chunk count and keeps the fastest."""

    def before_step(self, trainer: Trainer, step: int) -> None:
        self.chunks_now = trainer.par.tuner.before_step(step - trainer.start_step)

    def after_step(self, trainer: Trainer, step: int, record: dict[str, Any], seconds: float) -> None:
        tuner = trainer.par.tuner
        record["comm_chunks"] = self.chunks_now
        if (chosen := tuner.after_step(step - trainer.start_step, seconds)) is not None:
            medians = ", ".join(f"{c}: {s:.3f}" for c, s in tuner.medians_s.items())
            trainer.say(f"comm.chunks=auto: chose {chosen} (median step seconds summed over ranks: {medians})")


class ExchangeTiming(Hook):
    """Each step's exchange / exposed / expert-compute time per MoE layer, into its record."""

    def after_step(self, trainer: Trainer, step: int, record: dict[str, Any], seconds: float) -> None:
        timing = step_timing(trainer.par.timers)  # per-layer lists (jsonl, plots), and each as a scalar key
        record.update(timing)
        for y, block in enumerate(trainer.moe_blocks):
            record.update({f"moe/L{block}/{key}": values[y] for key, values in timing.items()})

    def after_evaluate(self, trainer: Trainer) -> None:
        step_timing(trainer.par.timers)  # drop evaluation's exchanges


class Rebalancing(Hook):
    """Online re-placement: routing counts over a window, then experts moved every N steps."""

    def __init__(self, counts: RoutingCounts):
        self.counts = counts  # the trainer's: checkpoints save and restore the window

    def routing(self, step: int) -> OnRouting | None:
        return lambda micro, topk_idx_YTK: self.counts.add(topk_idx_YTK)

    def after_update(self, trainer: Trainer, completed: int, record: dict[str, Any], last: bool) -> None:
        par = trainer.par
        if not par.rebalancer.due(completed, last):
            return
        moves = par.rebalance(trainer.model, self.counts.take_global(), trainer.engine.optimizer)
        record.update(moves)
        trainer.write(f"step {completed}: re-placed experts ({par.placement.origin}): imbalance "
                      f"{moves['placement_imbalance_old']:.3f} -> {moves['placement_imbalance_new']:.3f}, "
                      f"{moves['placement_bytes_moved'] / 1e6:.2f} MB moved")  # fmt: skip


class Tracing(Hook):
    """logger.routing_trace_every: the first micro-batch's expert choices of every N-th step."""

    def __init__(self, trace: RoutingTrace):
        self.trace = trace

    def routing(self, step: int) -> OnRouting | None:
        if not self.trace.wants(step + 1):
            return None

        def add(micro: int, topk_idx_YTK: torch.Tensor) -> None:
            if micro == 0:
                self.trace.add(step + 1, topk_idx_YTK)

        return add


def build_hooks(trainer: Trainer) -> list[Hook]:
    """The hooks this run needs, in the order they run."""
    par = trainer.par
    hooks: list[Hook] = [FaultDrill(), Tracing(trainer.trace)]
    if par.tuner is not None:
        hooks.append(ChunkTuning())
    if par.timers:
        hooks.append(ExchangeTiming())
    if par.rebalancer is not None:
        hooks.append(Rebalancing(trainer.counts))
    return hooks


def routing_callback(hooks: list[Hook], step: int) -> OnRouting | None:
    """One callback for every hook that wants step `step`'s routing, or None if none does (then
    the step gathers no expert choices at all)."""
    wanted = [fn for hook in hooks if (fn := hook.routing(step)) is not None]
    if not wanted:
        return None

    def each(micro: int, topk_idx_YTK: torch.Tensor) -> None:
        for fn in wanted:
            fn(micro, topk_idx_YTK)

    return each
