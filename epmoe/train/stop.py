"""Stopping a run on a signal without losing work: the ranks agree to stop after the same step,
and every rank joins the checkpoint.

A signal is one rank's (or every rank's) news: Ctrl-C in a terminal (SIGINT), a scheduler's
SIGTERM before it kills the job (Slurm, Kubernetes), or the SIGUSR1 that `sbatch --signal` sends
ahead of the time limit. The handler only records it; each training step's one reduction
carries every rank's record (`flags`), so all ranks learn of it after the same step, stop there
and save a complete checkpoint together. Then the run ends with `Preempted` (SIGTERM, SIGUSR1:
exit status EXIT_PREEMPTED) or KeyboardInterrupt (SIGINT). While stopping, a second SIGTERM or
SIGUSR1 is ignored so the save completes; a second Ctrl-C stops at once, without a checkpoint
(the previous complete one stays valid: a checkpoint only exists once it is whole).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # the order of `flags`


class Preempted(RuntimeError):
    """The run stopped after a SIGTERM or SIGUSR1 and saved where it stands; rerun to continue."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None, run_dir: Path, main: bool):
        self.step, self.checkpoint, self.main = step, checkpoint, main
        saved = f"checkpoint {checkpoint}" if checkpoint is not None else "no new checkpoint (no step since the last)"
        super().__init__(f"stopped by {signal_name} after step {step}: {saved}; continue with train.resume={run_dir}")


class StopRequest:
    """This rank's stop signals (its handlers), and the ranks' agreement on them.

    Installed for the life of one run (`close` restores the previous handlers); a no-op outside
    the main thread, where Python cannot install signal handlers.
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None  # the first stop signal on this rank
        self.agreed: signal.Signals | None = None  # set from the last step's reduction: some rank's
        self._previous: dict[signal.Signals, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        sig = signal.Signals(signum)
        if self.received is None:
            self.received = sig
        elif sig == signal.SIGINT == self.received:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        # any other signal while stopping: ignored, so the checkpoint being written completes

    def flags(self, like: torch.Tensor) -> torch.Tensor:
        """One indicator per STOP_SIGNALS entry (1 where this rank received it), for the step's
        reduction; summed over ranks it says which signals any rank got."""
        return torch.tensor([float(self.received == s) for s in STOP_SIGNALS], dtype=like.dtype, device=like.device)

    def agree(self, summed_flags: list[float]) -> None:
        """Record what the ranks agreed on: a preemption signal wins over Ctrl-C (it asks for a requeue)."""
        got = [s for s, n in zip(STOP_SIGNALS, summed_flags) if n > 0]
        preempt = [s for s in got if s != signal.SIGINT]
        self.agreed = (preempt or got or [None])[0]

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
