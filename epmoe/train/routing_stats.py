"""What the routers decided, kept for placement: per-layer counts and sampled traces.

Shape key: Y MoE layers, T tokens of one micro-batch on this rank, K top-k, E experts,
N trace samples.

- `RoutingCounts` accumulates, every micro-batch, tokens per expert and the co-occurrence of
  expert choices between consecutive MoE layers (`placement.RoutingStats`): counts only, a
  few E x E bincounts per step. `take_global()` sums them over all ranks (a collective: every
  rank calls it at the same step) and starts a new window.
- `RoutingTrace` keeps the first `tokens` tokens' choices of every `every`-th step (rank 0's
  slice of the global batch) and writes them to <run dir>/routing_trace.pt for offline study
  (benchmarks/placement_sim.py replays them). Format (a dict, loadable with weights_only=True):
  format (1), num_experts, top_k, ep, world, steps [N] (1-based), topk_idx_NYTK (int16).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from epmoe.comm.process import all_reduce_sum_
from epmoe.placement.placement import RoutingStats

TRACE_FILE = "routing_trace.pt"
TRACE_FORMAT = 1


def topk_of_layers(routings: list) -> torch.Tensor:
    """topk_idx_YTK of one forward pass: every MoE layer's choices for the same T tokens.
    NOTE: a host sync; the trainer asks for it only on steps whose hooks want the choices."""
    return torch.stack([r.topk_idx_TK for r in routings]).cpu()


class RoutingCounts:
    """Per-layer expert load and cross-layer co-occurrence since the last `take_global()`."""

    def __init__(self, num_layers: int, num_experts: int):
        self.num_layers, self.num_experts = num_layers, num_experts
        self._reset()

    def _reset(self) -> None:
        Y, E = self.num_layers, self.num_experts
        self.local = RoutingStats(torch.zeros(Y, E, dtype=torch.int64), torch.zeros(max(Y - 1, 0), E, E,
                                                                                    dtype=torch.int64))  # fmt: skip

    def add(self, topk_idx_YTK: torch.Tensor) -> None:
        self.local = self.local + RoutingStats.from_topk(topk_idx_YTK, self.num_experts)

    def take_global(self) -> RoutingStats:
        """The window's counts summed over all ranks (collective); the window starts anew."""
        load_YE, cooc_YEE = self.local.load_YE.clone(), self.local.cooc_YEE.clone()
        all_reduce_sum_(load_YE)
        all_reduce_sum_(cooc_YEE)
        self._reset()
        return RoutingStats(load_YE, cooc_YEE)


class RoutingTrace:
    """Sampled token -> expert choices of every MoE layer, saved for offline placement studies."""

    def __init__(self, every: int, tokens: int, num_experts: int, ep: int, world: int):
        self.every, self.tokens = every, tokens
        self.meta = {"format": TRACE_FORMAT, "num_experts": num_experts, "ep": ep, "world": world}
        self.steps: list[int] = []
        self.samples: list[torch.Tensor] = []

    def wants(self, step: int) -> bool:
        """Whether 1-based `step` is sampled."""
        return self.every > 0 and step % self.every == 0

    def add(self, step: int, topk_idx_YTK: torch.Tensor) -> None:
        self.steps.append(step)
        self.samples.append(topk_idx_YTK[:, : self.tokens].to(torch.int16))

    def save(self, run_dir: Path) -> Path | None:
        """Write <run_dir>/routing_trace.pt atomically (temporary file, fsync, rename)."""
        if not self.samples:
            return None
        T = min(s.shape[1] for s in self.samples)  # the last micro-batch may be shorter
        state = {**self.meta, "top_k": self.samples[0].shape[2], "steps": torch.tensor(self.steps),
                 "topk_idx_NYTK": torch.stack([s[:, :T] for s in self.samples])}  # fmt: skip
        path = run_dir / TRACE_FILE
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        return path


def load_trace(path: Path) -> dict:
    """A saved trace (see the module docstring); ValueError if it is not one."""
    state = torch.load(path, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != TRACE_FORMAT:
        raise ValueError(f"{path} is not an epmoe routing trace (format {TRACE_FORMAT})")
    return state
