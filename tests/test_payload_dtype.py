"""A bf16 payload (payload_dtype=torch.bfloat16) sends bf16 rows over the wire, computes in fp32.

Both dispatchers (AllToAllDispatcher, PipelinedDispatcher at chunks 1 and 3), 2 gloo ranks
(torch.multiprocessing): the same sharded MoE layer runs with the fp32 payload (the reference)
and with the bf16 payload, and the outputs and gradients (input, router, local experts, shared
experts) are compared. A recording communicator checks the dtype of every row exchange.
tests/mpi_ep_layer.py runs the same cases with the exchanges on mpi4py (`check_payload_cases`).

Tolerance, derived: bf16 keeps 8 significant bits, so rounding to it has relative error at most
u = 2^-9 (round to nearest). A row crosses the wire at most twice per direction in forward (to its
expert, back as an output) and twice in backward (output gradient, input gradient); the products
and K-sums that follow add errors of different signs, which do not grow beyond the per-element
bound. So every tensor is within about 4u = 2^-7 of its largest element; we allow 2x that:
|bf16 - fp32| <= 2^-6 * max|fp32| per tensor (atol = 2^-6 * max|fp32|, rtol = 0; an elementwise
rtol would fail on entries near zero, whose errors scale with the rows, not with the entry).
The results must also differ somewhere (not bit-identical): the cast did happen.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from epmoe.comm.communicator import Communicator, TorchCommunicator
from epmoe.comm.dispatch import AllToAllDispatcher
from epmoe.comm.parallel_dims import ParallelDims
from epmoe.comm.pipelined import PipelinedDispatcher
from epmoe.config import ModelConfig, RouterConfig
from epmoe.model.moe import MoE
from epmoe.parallel.expert_parallel import apply_expert_parallel

D, E, WORLD = 32, 8, 2
TOKENS = [37, 21]  # uneven per-rank tokens
REL_TOL = 2.0**-6  # per tensor, relative to its largest element (see the module docstring)
# (top_k, n_shared_experts)
CASES = [(2, 1), (8, 0)]
DISPATCHERS = ["all_to_all", "pipelined-1", "pipelined-3"]


class _DtypeComm:
    """Passes exchanges through, recording each one's dtype (the counts exchange is int64)."""

    def __init__(self, comm: Communicator):
        self.comm, self.size, self.rank = comm, comm.size, comm.rank
        self.dtypes: list[torch.dtype] = []

    def all_to_all_v(self, x_ND, output_splits, input_splits, out_MD=None):
        self.dtypes.append(x_ND.dtype)
        return self.comm.all_to_all_v(x_ND, output_splits, input_splits, out_MD)


def _dispatcher(name: str, slot_of_expert_E: torch.Tensor, comm, payload_dtype: torch.dtype | None):
    if name == "all_to_all":
        return AllToAllDispatcher(slot_of_expert_E, comm, payload_dtype=payload_dtype)
    chunks = int(name.split("-")[1])
    return PipelinedDispatcher(slot_of_expert_E, comm, chunks, payload_dtype=payload_dtype)


def _run(model: MoE, x_in: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x_in.clone().requires_grad_()
    y, _ = model(x)
    (y * g).sum().backward()
    named = {"y": y.detach(), "x.grad": x.grad, "router": model.router.gate.weight.grad}
    named |= {f"experts.{n}": p.grad for n, p in model.experts.named_parameters()}
    if model.shared is not None:
        named |= {f"shared.{n}": p.grad for n, p in model.shared.named_parameters()}
    return named


def _worker(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    dims = ParallelDims(world=WORLD, dp=WORLD, ep=WORLD, num_experts=E)
    dims.build_groups(rank)
    check_payload_cases(rank, dims, TorchCommunicator(dims.ep_group))
    dist.destroy_process_group()


def check_payload_cases(rank: int, dims: ParallelDims, ep_comm: Communicator) -> None:
    """Every CASE and DISPATCHER on this rank of a 2-rank EP group whose exchanges run on
    `ep_comm` (gloo here; MPI in tests/mpi_ep_layer.py)."""
    comm = _DtypeComm(ep_comm)
    for top_k, shared in CASES:
        cfg = ModelConfig(d_model=D, num_experts=E, expert_hidden=24, n_shared_experts=shared, shared_hidden=16,
                          expert_impl="loop")  # fmt: skip
        torch.manual_seed(0)
        layer = MoE(cfg, RouterConfig(top_k=top_k, capacity_factor=None, aux_loss="none"))
        apply_expert_parallel(layer, dims, rank, comm=comm)
        slot_of_expert_E = layer.dispatcher.slot_of_expert_E
        layer.dispatcher = None  # a process group does not deep-copy; each run installs its own
        models = {None: copy.deepcopy(layer), torch.bfloat16: layer}  # same weights for both payloads
        gen = torch.Generator().manual_seed(1)
        xs = [torch.randn(1, n, D, generator=gen) for n in TOKENS]
        gs = [torch.randn(1, n, D, generator=gen) for n in TOKENS]
        for name in DISPATCHERS:
            case = f"rank {rank} top_k {top_k} shared {shared} {name}"
            results = {}
            for payload in (None, torch.bfloat16):
                model = models[payload]
                model.dispatcher = _dispatcher(name, slot_of_expert_E, comm, payload)
                model.zero_grad(set_to_none=True)
                comm.dtypes.clear()
                results[payload] = _run(model, xs[rank], gs[rank])
                # the counts travel as int64; every row exchange, forward and backward, in the payload dtype
                rows = [dt for dt in comm.dtypes if dt != torch.int64]
                assert len(rows) == (4 if name == "all_to_all" else 4 * int(name.split("-")[1])), f"{case}: {rows}"
                assert set(rows) == {payload or torch.float32}, f"{case}: exchanged {rows}"
            ref, low = results[None], results[torch.bfloat16]
            assert ref.keys() == low.keys()
            differs = False
            for key, want in ref.items():
                got = low[key]
                assert got.dtype == torch.float32, f"{case}: {key} is {got.dtype}, must stay fp32"
                atol = REL_TOL * want.abs().max().item()
                torch.testing.assert_close(got, want, atol=atol, rtol=0.0, msg=f"{case}: {key}")
                differs |= not torch.equal(got, want)
            assert differs, f"{case}: bf16 payload gave bit-identical results: was anything cast?"
            assert not torch.equal(low["y"], ref["y"]), f"{case}: bf16 payload left the outputs bit-identical"


def test_bf16_payload_is_close_to_fp32_and_not_identical_for_both_dispatchers(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)
