"""comm.chunks=auto: try a few chunk counts in the first training steps and keep the fastest.

How many chunks hide the exchange best depends on the link and the layer (on loopback 2 was
best in benchmarks/overlap.py, on a 1 Gbit/s link 4), so it is measured, not guessed: each
candidate runs one warm-up step and then `trials` timed steps; a candidate's time is the
median of its timed steps, summed over ranks (so every rank takes the same decision, and the
slowest ranks weigh in). The choice never changes the math, only the order of the work.
"""

from __future__ import annotations

import statistics

import torch

from epmoe.comm.pipelined import PipelinedDispatcher
from epmoe.comm.process import all_reduce_sum_

CANDIDATES = (1, 2, 4)


class ChunkTuner:
    def __init__(self, dispatchers: list[PipelinedDispatcher], candidates=CANDIDATES, trials: int = 2):
        """dispatchers: every MoE layer's (they stay installed across re-placements)."""
        self.dispatchers, self.candidates = dispatchers, tuple(candidates)
        # (candidate, timed?) per tuning step: one warm-up step, then `trials` timed ones
        self.schedule = [(c, i > 0) for c in self.candidates for i in range(1 + trials)]
        self.seconds: dict[int, list[float]] = {c: [] for c in self.candidates}
        self.chosen: int | None = None
        self.medians_s: dict[int, float] = {}

    def before_step(self, index: int) -> int:
        """Set the chunk count for tuning step `index` (0-based from the run's first step)."""
        chunks = self.schedule[index][0] if index < len(self.schedule) else self.chosen
        self._set(chunks)
        return chunks

    def _set(self, chunks: int) -> None:
        for dispatcher in self.dispatchers:
            dispatcher.chunks = chunks

    def after_step(self, index: int, seconds: float) -> int | None:
        """Record the step's time; returns the chosen chunk count on the step that decides it."""
        if index >= len(self.schedule):
            return None
        candidate, timed = self.schedule[index]
        if timed:
            self.seconds[candidate].append(seconds)
        if index + 1 < len(self.schedule):
            return None
        # NOTE: a collective; every rank reaches it at the same step
        medians_C = torch.tensor([statistics.median(self.seconds[c]) for c in self.candidates], dtype=torch.float64)
        all_reduce_sum_(medians_C)
        self.medians_s = dict(zip(self.candidates, medians_C.tolist()))
        self.chosen = self.candidates[int(medians_C.argmin())]
        self._set(self.chosen)
        return self.chosen
