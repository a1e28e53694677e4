"""Bucketed gradient reduction (parallel/gradients.py) against one all-reduce per parameter.

Two gloo ranks train the same small MoE model on different tokens; after backward the
gradients reduced by `GradientReducer` (issued during backward) and by `reduce_gradients`
without one must equal, bit for bit, what a plain per-parameter all-reduce / world gives.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from epmoe.comm.parallel_dims import ParallelDims
from epmoe.config import ModelConfig, RouterConfig
from epmoe.model.transformer import Transformer
from epmoe.parallel.gradients import GradientReducer, buckets, reduce_gradients, split_params


def test_buckets_close_at_the_size_and_at_a_dtype_change() -> None:
    params = [nn.Parameter(torch.zeros(n, dtype=dt)) for n, dt in
              [(10, torch.float32), (20, torch.float32), (5, torch.float32), (100, torch.float32),
               (3, torch.float64), (1, torch.float32)]]  # fmt: skip
    # 100 bytes per bucket: 40 + 80 bytes reach it; 20 + 400; a float64 one; a float32 one
    sizes = [[p.numel() for p in b] for b in buckets(params, bucket_bytes=100)]
    assert sizes == [[10, 20], [5, 100], [3], [1]]


def _model() -> Transformer:
    cfg = ModelConfig(
        vocab_size=32, d_model=16, n_layers=3, n_heads=2, max_seq_len=8, num_experts=4, expert_hidden=8,
        first_dense_layers=1, dense_hidden=16, n_shared_experts=1, shared_hidden=8,
    )  # fmt: skip
    torch.manual_seed(0)
    return Transformer(cfg, RouterConfig(top_k=2, aux_loss="none", z_loss_coef=0.0))


def _backward(model: Transformer, rank: int) -> None:
    tokens = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(rank))
    model(tokens).logits_BSV.square().mean().backward()


def _worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    dims = ParallelDims(world=world, dp=world, ep=1, num_experts=4)
    dims.build_groups(rank)
    reference, bucketed, during = _model(), _model(), _model()
    for model in (reference, bucketed, during):
        _backward(model, rank)
    for p in reference.parameters():  # the rule, one parameter at a time
        dist.all_reduce(p.grad)
        p.grad.div_(world)
    reduce_gradients(bucketed, dims, bucket_bytes=1000)  # no reducer: buckets issued after backward

    reducer = GradientReducer(during, dims, bucket_bytes=1000)
    for p in during.parameters():
        p.grad = None
    reducer.arm()
    _backward(during, rank)
    issued_during_backward = len(reducer._in_flight)
    reduce_gradients(during, dims, reducer)
    for name, p in reference.named_parameters():
        for other in (bucketed, during):
            assert torch.equal(dict(other.named_parameters())[name].grad, p.grad), f"rank {rank}: {name}"
    replicated, _ = split_params(during)
    torch.save({"issued": issued_during_backward, "buckets": len(reducer.buckets), "params": len(replicated)},
               f"{out}.{rank}")  # fmt: skip
    dist.destroy_process_group()


def test_bucketed_reduction_equals_one_all_reduce_per_parameter(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, join=True)
    for rank in range(2):
        seen = torch.load(tmp_path / f"out.{rank}", weights_only=True)
        assert seen["buckets"] > 2  # small buckets: several collectives
        assert 0 < seen["issued"] <= seen["buckets"]  # some went out while backward still ran


def test_a_reducer_that_is_not_armed_issues_nothing() -> None:
    """Earlier micro-batches of a step (grad_accum > 1) accumulate locally: no collective."""
    model = _model()
    reducer = GradientReducer(model, ParallelDims(world=1, dp=1, ep=1, num_experts=4), bucket_bytes=1000)
    _backward(model, 0)
    assert reducer._ready == [0] * len(reducer.buckets) and reducer._in_flight == []
