"""Exchange timing: interval unions, the timed communicator's log, per-layer step records."""

from __future__ import annotations

import time

import torch

from epmoe.comm.timing import TimedCommunicator, union_seconds
from epmoe.parallel.timing import run_summary


def test_union_of_intervals_counts_overlaps_once() -> None:
    assert union_seconds([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]) == 4.0  # [0, 3] and [5, 6]
    assert union_seconds([(1.0, 2.0), (0.0, 4.0)]) == 4.0  # nested
    assert union_seconds([]) == 0.0


class _SlowComm:
    """Two ranks; every exchange returns its input after blocking the waiter for `delay` seconds."""

    size, rank = 2, 0

    def __init__(self, delay: float):
        self.delay = delay

    def all_to_all_v(self, x_ND, output_splits, input_splits, out_MD=None):
        delay = self.delay

        class Handle:
            def wait(self):
                time.sleep(delay)
                return x_ND

        return Handle()

    def all_reduce_sum_(self, tensor):
        return tensor


def test_timed_communicator_logs_blocked_time_and_bytes_sent_to_others() -> None:
    comm = TimedCommunicator(_SlowComm(delay=0.05))
    x_ND = torch.zeros(6, 4)  # 16 bytes a row
    y = comm.all_to_all_v(x_ND, [3, 3], [2, 4]).wait()  # 4 rows go to rank 1 (rank 0 keeps 2)
    assert y is x_ND
    taken = comm.take()
    assert taken["sent_mb"] == 4 * 16 / 1e6
    assert 0.05 <= taken["exposed_s"] < 0.5
    assert taken["exposed_s"] <= taken["exchange_s"] + 1e-6  # without a future, done = when the wait returned
    assert comm.take() == {"exchange_s": 0.0, "exposed_s": 0.0, "sent_mb": 0.0}  # the log starts anew


def test_run_summary_averages_each_layer_over_the_timed_steps() -> None:
    records = [
        {"step": 1, "exchange_ms": [10.0, 20.0], "exposed_ms": [5.0, 0.0], "expert_ms": [30.0, 40.0]},
        {"step": 2, "loss": 1.0},  # a record without timing (e.g. single process) is skipped
        {"step": 3, "exchange_ms": [30.0, 20.0], "exposed_ms": [15.0, 10.0], "expert_ms": [50.0, 40.0]},
    ]
    summary = run_summary(records)
    assert summary["mean_exchange_ms"] == [20.0, 20.0]
    assert summary["mean_exposed_ms"] == [10.0, 5.0]
    assert summary["mean_expert_ms"] == [40.0, 40.0]
    assert summary["hidden_frac"] == [0.5, 0.75]
    assert run_summary([{"step": 1}]) == {}


def test_chunk_tuner_tries_each_candidate_then_keeps_the_fastest() -> None:
    from epmoe.comm.pipelined import PipelinedDispatcher
    from epmoe.config import ModelConfig, RouterConfig
    from epmoe.model.moe import MoE
    from epmoe.parallel.chunk_tuner import ChunkTuner

    class TwoRanks:
        size, rank = 2, 0

    moe = MoE(ModelConfig(d_model=8, num_experts=4, expert_hidden=4, n_shared_experts=0), RouterConfig(top_k=1))
    moe.dispatcher = PipelinedDispatcher(torch.arange(4), TwoRanks(), chunks=1)
    tuner = ChunkTuner([moe.dispatcher], candidates=(1, 2, 4), trials=2)
    # per step: (chunks the tuner sets, seconds the step took); warm-up steps are not counted
    steps = [(1, 9.0), (1, 3.0), (1, 3.2), (2, 9.0), (2, 2.0), (2, 2.4), (4, 0.1), (4, 2.9), (4, 3.1)]
    for index, (expected, seconds) in enumerate(steps):
        assert tuner.before_step(index) == expected == moe.dispatcher.chunks
        chosen = tuner.after_step(index, seconds)
        assert chosen == (2 if index == len(steps) - 1 else None)
    assert tuner.medians_s == {1: 3.1, 2: 2.2, 4: 3.0}  # one process: the sum over ranks is its own
    assert tuner.before_step(9) == 2 == moe.dispatcher.chunks
