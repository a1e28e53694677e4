"""The pipelined dispatcher (comm/pipelined.py) computes what the all-to-all dispatcher computes.

Chunk layouts are checked by hand without process groups. Multi-rank tests spawn gloo ranks
(torch.multiprocessing): every rank shards the same MoE layer with `apply_expert_parallel`
(AllToAllDispatcher), makes a copy whose dispatcher is a PipelinedDispatcher on the same
placement and communicator, and compares outputs and gradients (input, router, local experts,
shared experts); a recording communicator checks the order of the pipeline's stages.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from epmoe.comm.communicator import TorchCommunicator
from epmoe.comm.parallel_dims import ParallelDims
from epmoe.comm.pipelined import PipelinedDispatcher, _Plan, _transpose_segments, split_counts
from epmoe.config import ModelConfig, RouterConfig
from epmoe.model.moe import MoE
from epmoe.parallel.expert_parallel import apply_expert_parallel

D, E = 16, 16
# uneven per-rank token counts, one rank with none; the all-zero row sends empty chunks everywhere
TOKENS = {2: [[7, 0], [0, 0]], 4: [[6, 0, 9, 3]]}
# (top_k, n_shared_experts, capacity_factor); 16 experts and few tokens leave experts without tokens
CASES = [(1, 0, None), (2, 1, None), (8, 0, None), (1, 1, 1.0), (2, 0, 1.0), (8, 1, 1.0)]
CHUNKS = [1, 2, 3, 4]
TOL = {"atol": 1e-5, "rtol": 1e-5}  # fp32; only the order of the expert-gradient sums differs


def test_split_counts_cuts_segments_into_contiguous_pieces_by_hand() -> None:
    # 8 rows in segments [3, 0, 5], 3 pieces: rows [0, 2), [2, 5), [5, 8)
    assert split_counts([3, 0, 5], 3) == [[2, 0, 0], [1, 0, 2], [0, 0, 3]]
    # fewer rows than pieces: the first pieces are empty, the last takes the row
    assert split_counts([1, 0], 3) == [[0, 0], [0, 0], [1, 0]]
    assert split_counts([4, 2], 1) == [[4, 2]]
    assert split_counts([0, 0, 0], 2) == [[0, 0, 0], [0, 0, 0]]


def test_send_runs_merge_adjacent_ranks_rows_by_hand() -> None:
    # rank 1 of 3 sends 4 rows to rank 0, keeps 2 (its own, never exchanged), sends 6 to rank 2:
    # x_ND rows [0, 4) -> rank 0, [4, 6) local, [6, 12) -> rank 2
    plan = _Plan.build([[4], [2], [6]], [[1], [2], [3]], me=1, chunks=2)
    assert plan.local_rows() == slice(4, 6)
    assert plan.send_runs(0) == [slice(0, 2), slice(6, 9)]  # the first half of each peer's rows
    assert plan.send_runs(1) == [slice(2, 4), slice(9, 12)]
    # rank 0 of 3: its peers' rows are adjacent, so one chunk is one run (sent as a view, no copy)
    plan = _Plan.build([[2], [3], [1]], [[2], [0], [5]], me=0, chunks=1)
    assert plan.send_runs(0) == [slice(2, 6)]
    assert plan.send_splits(0) == [0, 3, 1] and plan.recv_splits(0) == [0, 0, 5]


def test_transpose_segments_regroups_and_skips_the_copy_when_already_in_order() -> None:
    rows = torch.arange(6.0).unsqueeze(1)
    # (a, b)-major segments a0b0=[0], a0b1=[1, 2], a1b0=[3, 4], a1b1=[5] -> (b, a)-major
    assert _transpose_segments(rows, [[1, 2], [2, 1]]).squeeze(1).tolist() == [0, 3, 4, 1, 2, 5]
    # only a=1 has rows (one peer sends them): the order is already (b, a)-major
    assert _transpose_segments(rows, [[0, 0], [4, 2]]) is rows


def test_all_to_all_lands_in_the_given_rows_and_rejects_a_wrong_buffer(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        comm = TorchCommunicator(None)
        out_ND = torch.zeros(5, 2)
        x_ND = torch.arange(6.0).view(3, 2)
        assert comm.all_to_all_v(x_ND, [3], [3], out_ND[1:4]).wait().data_ptr() == out_ND[1].data_ptr()
        assert out_ND.tolist() == [[0, 0], [0, 1], [2, 3], [4, 5], [0, 0]]
        with pytest.raises(ValueError, match=r"out_MD must be contiguous torch.float32 of shape \(3, 2\)"):
            comm.all_to_all_v(x_ND, [3], [3], out_ND[:2])
    finally:
        dist.destroy_process_group()


class _FakeComm:
    size, rank = 2, 0


def test_chunks_below_one_is_an_error_that_says_what_works() -> None:
    with pytest.raises(ValueError, match=r"chunks \(0\) must be >= 1"):
        PipelinedDispatcher(torch.arange(E), _FakeComm(), chunks=0)


def _pipelined_copy(model: MoE, chunks: int) -> MoE:
    """A deep copy of an expert-parallel model whose dispatchers pipeline (same map, same comm)."""
    comm = model.dispatcher.comm
    model.dispatcher.comm = None  # a process group does not deep-copy
    twin = copy.deepcopy(model)
    model.dispatcher.comm = comm
    for module in twin.modules():
        if isinstance(module, MoE):
            module.dispatcher = PipelinedDispatcher(model.dispatcher.slot_of_expert_E, comm, chunks)
    return twin


def _grads(model: MoE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    named = {"x": x.grad, "router": model.router.gate.weight.grad}
    named |= {f"experts.{n}": p.grad for n, p in model.experts.named_parameters()}
    if model.shared is not None:
        named |= {f"shared.{n}": p.grad for n, p in model.shared.named_parameters()}
    return named


def _run(model: MoE, x_in: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x_in.clone().requires_grad_()
    y, _ = model(x)
    (y * g).sum().backward()
    return y.detach(), _grads(model, x)


def _setup(rank: int, world: int, store: str) -> tuple[ParallelDims, TorchCommunicator]:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    dims = ParallelDims(world=world, dp=world, ep=world, num_experts=E)
    dims.build_groups(rank)
    return dims, TorchCommunicator(dims.ep_group)


def _layer(top_k: int, shared: int, capacity: float | None) -> MoE:
    cfg = ModelConfig(d_model=D, num_experts=E, expert_hidden=8, n_shared_experts=shared, shared_hidden=8,
                      expert_impl="loop")  # fmt: skip
    torch.manual_seed(0)
    return MoE(cfg, RouterConfig(top_k=top_k, capacity_factor=capacity, aux_loss="none"))


def _equality_worker(rank: int, world: int, store: str) -> None:
    dims, comm = _setup(rank, world, store)
    for tokens, (top_k, shared, capacity) in itertools.product(TOKENS[world], CASES):
        reference = _layer(top_k, shared, capacity)
        gen = torch.Generator().manual_seed(1)
        xs = [torch.randn(1, n, D, generator=gen) for n in tokens]
        gs = [torch.randn(1, n, D, generator=gen) for n in tokens]
        if top_k == 1 and sum(tokens) > 0:  # the case does cover experts that receive no token
            assert (reference.router(torch.cat(xs, 1).view(-1, D)).counts_E == 0).any()
        apply_expert_parallel(reference, dims, rank, comm=comm)
        for chunks in CHUNKS:
            reference.zero_grad(set_to_none=True)
            pipelined = _pipelined_copy(reference, chunks)
            y_ref, grads_ref = _run(reference, xs[rank], gs[rank])
            y, grads = _run(pipelined, xs[rank], gs[rank])
            case = f"rank {rank} ep {world} tokens {tokens} top_k {top_k} shared {shared} cap {capacity} C {chunks}"
            torch.testing.assert_close(y, y_ref, **TOL, msg=case)
            assert grads.keys() == grads_ref.keys()
            for name, grad in grads.items():
                assert grad is not None and grads_ref[name] is not None, f"{case}: no grad of {name}"
                torch.testing.assert_close(grad, grads_ref[name], **TOL, msg=f"{case}: grad of {name}")

    # torch.autograd.grad(loss, params): the gradients come from the Function, not from .grad
    for chunks in CHUNKS:
        reference = _layer(2, 1, None)
        apply_expert_parallel(reference, dims, rank, comm=comm)
        pipelined = _pipelined_copy(reference, chunks)
        gen = torch.Generator().manual_seed(2)
        x_in, g = torch.randn(1, 5 + 3 * rank, D, generator=gen), torch.randn(1, 5 + 3 * rank, D, generator=gen)
        results = []
        for model in (reference, pipelined):
            x = x_in.clone().requires_grad_()
            leaves = [x, model.router.gate.weight, *model.experts.parameters()]
            results.append(torch.autograd.grad((model(x)[0] * g).sum(), leaves))
        assert all(p.grad is None for p in pipelined.parameters())
        for i, (grad, grad_ref) in enumerate(zip(*reversed(results))):
            torch.testing.assert_close(grad, grad_ref, **TOL, msg=f"rank {rank} chunks {chunks} leaf {i}")
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_pipelined_equals_all_to_all_outputs_and_gradients(world: int, tmp_path: Path) -> None:
    mp.spawn(_equality_worker, args=(world, str(tmp_path / "store")), nprocs=world, join=True)


# --- the order of the stages ---


class _RecordingComm:
    """A communicator that logs `issue i` / `wait i` for its i-th all-to-all (0 = the counts)."""

    def __init__(self, comm: TorchCommunicator, log: list[str]):
        self.comm, self.size, self.rank, self.log = comm, comm.size, comm.rank, log
        self.issued = itertools.count()

    def all_to_all_v(self, x_ND, output_splits, input_splits, out_MD=None):
        i = next(self.issued)
        self.log.append(f"issue {i}")
        handle = self.comm.all_to_all_v(x_ND, output_splits, input_splits, out_MD)
        log = self.log

        class _Logged:
            def wait(self) -> torch.Tensor:
                log.append(f"wait {i}")
                return handle.wait()

        return _Logged()


class _LogBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, log: list[str], label: str) -> torch.Tensor:  # noqa: D102
        ctx.log, ctx.label = log, label
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: D102
        ctx.log.append(f"{ctx.label} backward")
        return g, None, None


class _RecordingShared(nn.Module):
    """The layer's shared experts, logging each call and each call's backward."""

    def __init__(self, shared: nn.Module, log: list[str]):
        super().__init__()
        self.inner, self.log = shared, log

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        self.log.append("shared")
        return _LogBackward.apply(self.inner(x_TD), self.log, "shared")


class _RecordingExperts(nn.Module):
    """The layer's experts, logging each call and each call's backward."""

    def __init__(self, experts: nn.Module, log: list[str]):
        super().__init__()
        self.inner, self.log = experts, log

    def forward(self, x_ND: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        self.log.append("experts")
        return _LogBackward.apply(self.inner(x_ND, counts_L), self.log, "experts")


# chunks = 3. All-to-alls in issue order: 0 the counts, 1 chunk 0's rows, 2 chunk 1's rows,
# 3 chunk 0's outputs back, 4 chunk 2's rows, 5 chunk 1's outputs back, 6 chunk 2's outputs back
FORWARD = ["issue 0", "wait 0",  # the counts (the one host sync)
           "issue 1", "shared", "experts",  # chunk 0 travels while the shared experts and local rows compute
           "wait 1", "issue 2", "experts", "issue 3",  # chunk 1 travels while chunk 0 computes
           "wait 2", "issue 4", "experts", "issue 5",  # chunk 2 and chunk 0's outputs travel while 1 computes
           "wait 4", "experts", "issue 6",
           "wait 3", "wait 5", "wait 6"]  # fmt: skip
# backward, the same pipeline on gradients: 7, 8, 10 output gradients of chunks 0, 1, 2; 9, 11, 12 their dx
BACKWARD = ["issue 7", "shared backward", "experts backward",  # chunk 0's gradients travel meanwhile
            "wait 7", "issue 8", "experts backward", "issue 9",
            "wait 8", "issue 10", "experts backward", "issue 11",  # chunk 0's dx travels during chunk 1's
            "wait 10", "experts backward", "issue 12",
            "wait 9", "wait 11", "wait 12"]  # fmt: skip


def _order_worker(rank: int, world: int, store: str) -> None:
    dims, comm = _setup(rank, world, store)
    log: list[str] = []
    moe = _layer(2, 1, None)
    apply_expert_parallel(moe, dims, rank, comm=comm)
    moe.dispatcher = PipelinedDispatcher(moe.dispatcher.slot_of_expert_E, _RecordingComm(comm, log), chunks=3)
    moe.experts = _RecordingExperts(moe.experts, log)
    moe.shared = _RecordingShared(moe.shared, log)
    x = torch.randn(1, 40, D, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    y, _ = moe(x)
    assert log == FORWARD, f"rank {rank}: {log}"
    log.clear()
    y.square().sum().backward()
    assert log == BACKWARD, f"rank {rank}: {log}"
    dist.destroy_process_group()


def test_pipeline_overlaps_each_exchange_with_expert_compute(tmp_path: Path) -> None:
    mp.spawn(_order_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)
