"""Per-MoE-layer timing under expert parallelism, attached from outside the model.

For every MoE layer: its dispatcher's communicator is wrapped in a `TimedCommunicator`
(exchange in flight, exposed exchange, bytes), and its routed experts get forward and
backward hooks that record when they compute (expert compute time, the union of those
intervals). `take()` returns one step's numbers per layer and starts the next step.
While a forward is recomputed in backward (activation checkpointing) the timers are `paused()`:
a step reports one forward's exchanges and expert calls per layer, with or without recomputation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from epmoe.comm.timing import TimedCommunicator, union_seconds
from epmoe.model.moe import MoE, moe_layers

STEP_KEYS = ("exchange_ms", "exposed_ms", "expert_ms")  # per-layer lists in a step's metrics


class LayerTimer:
    """Exchange / exposed / expert-compute seconds of one MoE layer since the last take()."""

    def __init__(self, moe: MoE):
        self.moe = moe
        self.comm = TimedCommunicator(moe.dispatcher.comm)
        moe.dispatcher.comm = self.comm
        self.intervals: list[tuple[float, float]] = []
        self._started: list[float] = []
        experts = moe.experts
        experts.register_forward_pre_hook(lambda *_: self._start())
        experts.register_forward_hook(lambda *_: self._stop())
        experts.register_full_backward_pre_hook(lambda *_: self._start())
        experts.register_full_backward_hook(lambda *_: self._stop())

    def _start(self) -> None:
        if self.comm.recording:
            self._started.append(time.perf_counter())

    def _stop(self) -> None:
        if self._started and self.comm.recording:
            self.intervals.append((self._started.pop(), time.perf_counter()))

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Record no exchange and no expert call meanwhile (a recomputed forward)."""
        self.comm.recording = False
        try:
            yield
        finally:
            self.comm.recording = True

    def take(self) -> dict[str, float]:
        intervals, self.intervals = self.intervals, []
        return {**self.comm.take(), "expert_s": union_seconds(intervals)}


def attach_timers(model: nn.Module) -> list[LayerTimer]:
    """One LayerTimer per MoE layer; the layers' dispatchers must exchange (expert parallelism)."""
    return [LayerTimer(m) for m in moe_layers(model)]


def step_timing(timers: list[LayerTimer]) -> dict[str, list[float]]:
    """This step's per-layer numbers in milliseconds, for the metrics stream."""
    taken = [t.take() for t in timers]
    return {
        "exchange_ms": [round(1e3 * t["exchange_s"], 3) for t in taken],
        "exposed_ms": [round(1e3 * t["exposed_s"], 3) for t in taken],
        "expert_ms": [round(1e3 * t["expert_s"], 3) for t in taken],
    }


def run_summary(records: list[dict]) -> dict[str, list[float]]:
    """Mean per-layer exchange / exposed / expert milliseconds over the steps that logged them,
    and the fraction of each layer's exchange that compute hid."""
    timed = [r for r in records if "exchange_ms" in r]
    if not timed:
        return {}
    mean = {k: [sum(col) / len(timed) for col in zip(*(r[k] for r in timed))] for k in STEP_KEYS}
    mean["hidden_frac"] = [1 - e / x if x > 0 else 0.0 for e, x in zip(mean["exposed_ms"], mean["exchange_ms"])]
    return {f"mean_{k}" if k != "hidden_frac" else k: [round(v, 3) for v in vs] for k, vs in mean.items()}
