"""Where a layer's time goes: in-flight exchange, exposed (blocked) exchange, expert compute.

`TimedCommunicator` wraps any Communicator and logs, per all-to-all, when it was issued, how
long the caller blocked in `wait()` and when it completed. Completion is observed by the
caller: when its wait returns, or, if the exchange had already finished, when it came to
wait (an upper bound). With `stamp_completion=True` (benchmarks), a torch.distributed work's
future stamps the exact time instead. NOTE: that puts a Python callback into a C++ future;
one outliving the interpreter can abort the process at exit, so training leaves it off.
From the log of one step:
- exchange: time during which at least one exchange was in flight (union of intervals);
- exposed: time blocked in `wait()`, the part of the exchange compute did not hide;
- hidden = 1 - exposed / exchange.
Timestamps are host time (perf_counter). NOTE: on GPU, NCCL completion is stamped when the
work's future completes on the host side, so the numbers bound, rather than equal, device time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from epmoe.comm.communicator import Communicator, Handle


@dataclass
class Exchange:
    """One exchange as this rank saw it (perf_counter seconds)."""

    issued: float
    wire_bytes: int  # bytes sent to other ranks
    blocked: float = 0.0
    done_callback: float = float("inf")
    wait_returned: float = float("inf")

    @property
    def done(self) -> float:
        return min(self.done_callback, self.wait_returned)


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


class _TimedHandle:
    def __init__(self, inner: Handle, record: Exchange):
        self.inner, self.record = inner, record

    def wait(self) -> torch.Tensor:
        t0 = time.perf_counter()
        future = getattr(self.inner, "future", None)
        finished = future is not None and future.done()  # done before we looked: t0 bounds its end
        result = self.inner.wait()
        t1 = time.perf_counter()
        self.record.blocked += t1 - t0
        self.record.wait_returned = min(self.record.wait_returned, t0 if finished else t1)
        return result


class TimedCommunicator:
    """A Communicator that logs every all-to-all it carries (see the module docstring)."""

    def __init__(self, inner: Communicator, stamp_completion: bool = False):
        self.inner, self.size, self.rank = inner, inner.size, inner.rank
        self.stamp_completion = stamp_completion
        self.log: list[Exchange] = []
        # False while a forward is recomputed in backward (activation checkpointing): its
        # exchanges repeat the step's forward ones and are not logged again
        self.recording = True

    def all_to_all_v(
        self, x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int], out_MD: torch.Tensor | None = None
    ) -> Handle:
        if not self.recording:
            return self.inner.all_to_all_v(x_ND, output_splits, input_splits, out_MD)
        row_bytes = x_ND[:1].numel() * x_ND.element_size()
        sent = sum(n for r, n in enumerate(input_splits) if r != self.rank) * row_bytes
        record = Exchange(time.perf_counter(), sent)
        handle = self.inner.all_to_all_v(x_ND, output_splits, input_splits, out_MD)
        future = getattr(handle, "future", None)
        if future is not None and self.stamp_completion:
            future.add_done_callback(lambda _: setattr(record, "done_callback", time.perf_counter()))
        self.log.append(record)
        return _TimedHandle(handle, record)

    def all_reduce_sum_(self, tensor: torch.Tensor) -> Handle:
        return self.inner.all_reduce_sum_(tensor)

    def take(self) -> dict[str, float]:
        """exchange / exposed seconds and MB sent since the last take; clears the log."""
        log, self.log = self.log, []
        return {
            "exchange_s": union_seconds([(ex.issued, ex.done) for ex in log if ex.done < float("inf")]),
            "exposed_s": sum(ex.blocked for ex in log),
            "sent_mb": sum(ex.wire_bytes for ex in log) / 1e6,
        }
