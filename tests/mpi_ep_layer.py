"""Run by `mpiexec -n 2 python -m tests.mpi_ep_layer` (from test_expert_parallel.py): the EP
layer cases of the gloo test, exchanged through mpi4py's Ialltoallv instead, with the plain and
the pipelined dispatcher; then the dtypes numpy lacks (bf16, float8) over MPI: raw exchanges
bit-equal to the fp32 exchange of the same values rounded, a bf16 sum, and the bf16 payload
cases of test_payload_dtype.py.

Shape key: N rows sent, M rows received, D row width.
"""

from __future__ import annotations

import torch
from mpi4py import MPI

from epmoe.comm.communicator import MPICommunicator
from epmoe.comm.parallel_dims import ParallelDims
from tests.test_expert_parallel import check_layer_cases
from tests.test_payload_dtype import E as PAYLOAD_EXPERTS
from tests.test_payload_dtype import check_payload_cases

D = 5
# bit patterns a cast or an arithmetic path would change: signed zero, infinities, NaN, a subnormal
SPECIALS = [-0.0, float("inf"), float("-inf"), float("nan"), 1e-40, 3.0e38]
# same-width integers, to compare bits (NaN != NaN as floats)
BITS = {1: torch.uint8, 2: torch.int16}


def _rows(src: int, dst: int) -> int:
    """Rows rank src sends rank dst: with 2 ranks 0->0: 0, 0->1: 4, 1->0: 2, 1->1: 0."""
    return (src + 2 * dst) % 3 * 2


def _send_ND(src: int, world: int) -> torch.Tensor:
    """Rank src's fp32 rows, in destination order (every rank can rebuild every rank's)."""
    n = sum(_rows(src, dst) for dst in range(world))
    x_ND = 100 * torch.randn(n, D, generator=torch.Generator().manual_seed(src))
    x_ND.view(-1)[: len(SPECIALS)] = torch.tensor(SPECIALS)
    return x_ND


def check_dtype_exchanges(rank: int, world: int, comm: MPICommunicator) -> None:
    input_splits = [_rows(rank, dst) for dst in range(world)]
    output_splits = [_rows(src, rank) for src in range(world)]
    x_ND = _send_ND(rank, world)
    # what arrives, built here from the senders' rows: rank s's block destined to this rank
    first = [sum(_rows(src, d) for d in range(rank)) for src in range(world)]
    want_MD = torch.cat([_send_ND(s, world)[first[s] : first[s] + output_splits[s]] for s in range(world)])
    fp32_MD = comm.all_to_all_v(x_ND, output_splits, input_splits).wait()
    assert torch.equal(fp32_MD.view(torch.int32), want_MD.view(torch.int32)), f"rank {rank}: fp32 exchange"
    for dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        bits = BITS[dtype.itemsize]
        got_MD = comm.all_to_all_v(x_ND.to(dtype), output_splits, input_splits).wait()
        assert got_MD.dtype == dtype and got_MD.shape == (sum(output_splits), D), f"rank {rank}: {dtype}"
        assert torch.equal(got_MD.view(bits), fp32_MD.to(dtype).view(bits)), f"rank {rank}: {dtype} exchange"
        # into a view of a larger buffer (the pipelined dispatcher's returns): the rows around it stay
        buffer_MD = torch.full((sum(output_splits) + 2, D), 7.0).to(dtype)
        out_MD = buffer_MD[1:-1]
        assert comm.all_to_all_v(x_ND.to(dtype), output_splits, input_splits, out_MD).wait() is out_MD
        assert torch.equal(out_MD.view(bits), got_MD.view(bits)), f"rank {rank}: {dtype} into a view"
        sevens = torch.full((2, D), 7.0).to(dtype).view(bits)
        assert torch.equal(buffer_MD.view(bits)[[0, -1]], sevens), f"rank {rank}: {dtype} wrote outside the view"
    # bf16 sum: rank r holds (r + 1) x [1.5, 0.25, -3]; with 2 ranks 3 x that, exact in bf16
    total = comm.all_reduce_sum_(torch.tensor([1.5, 0.25, -3.0], dtype=torch.bfloat16) * (rank + 1)).wait()
    scale = world * (world + 1) // 2
    assert total.dtype == torch.bfloat16 and total.tolist() == [1.5 * scale, 0.25 * scale, -3.0 * scale], total


if __name__ == "__main__":
    torch.set_num_threads(1)
    world, rank = MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank()
    dims = ParallelDims(world=world, dp=world, ep=world, num_experts=16)
    comm = MPICommunicator(MPI.COMM_WORLD)
    check_layer_cases(rank, world, dims, comm)
    check_layer_cases(rank, world, dims, comm, chunks=2)  # returns land in place (Ialltoallv into a view)
    check_dtype_exchanges(rank, world, comm)
    check_payload_cases(rank, ParallelDims(world=world, dp=world, ep=world, num_experts=PAYLOAD_EXPERTS), comm)
    print(f"rank {rank}: mpi exchanges: bf16 and float8 bit-exact, bf16 payload layer close to fp32", flush=True)
    print(f"rank {rank}: mpi ep layer: all cases match, all-to-all and pipelined", flush=True)
