"""One interface for the exchanges expert parallelism needs, two implementations.

- `TorchCommunicator`: a torch.distributed process group (nccl on GPU, gloo on CPU);
- `MPICommunicator`: an mpi4py communicator (`Ialltoallv` on CPU tensors), for clusters
  whose fast path is MPI (installed with the `mpich` wheel, so no system MPI is needed). Rows
  travel as same-width integers, so dtypes numpy lacks (bf16, float8) exchange too.
Calls are raw (no autograd); `collectives.py` wraps them in autograd Functions. Each
returns a handle whose `wait()` gives the result, so callers can overlap work with it.

Shape key: N rows sent, M rows received, D row width, R elements per row, W integer words per row.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.distributed as dist

from epmoe.comm.parallel_dims import ParallelConfigError, ParallelDims


class Handle(Protocol):
    def wait(self) -> torch.Tensor: ...


class _Pending:
    """A handle: `wait()` finishes the exchange (if `finish` is given) and returns its result.
    `future` (torch.distributed only) completes when the exchange does, without waiting."""

    def __init__(self, result: torch.Tensor, finish=None, future: torch.futures.Future | None = None):
        self.result, self.finish, self.future = result, finish, future

    def wait(self) -> torch.Tensor:
        if self.finish is not None:
            self.finish()
        return self.result


def _receive_buffer(x_ND: torch.Tensor, output_splits: list[int], out_MD: torch.Tensor | None) -> torch.Tensor:
    shape = (sum(output_splits), *x_ND.shape[1:])
    if out_MD is None:
        return x_ND.new_empty(shape)
    if out_MD.shape != shape or out_MD.dtype != x_ND.dtype or not out_MD.is_contiguous():
        raise ValueError(
            f"all_to_all_v: out_MD must be contiguous {x_ND.dtype} of shape {shape}, got {out_MD.dtype} "
            f"{tuple(out_MD.shape)} (contiguous: {out_MD.is_contiguous()})"
        )
    return out_MD


class Communicator(Protocol):
    size: int  # ranks in the group
    rank: int  # this process's index in the group

    def all_to_all_v(
        self, x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int], out_MD: torch.Tensor | None = None
    ) -> Handle:
        """Send input_splits[r] rows of x_ND to rank r, receive output_splits[r] from it, into
        out_MD (contiguous, M = sum(output_splits) rows, x_ND's dtype) or a new tensor."""
        ...

    def all_reduce_sum_(self, tensor: torch.Tensor) -> Handle: ...


class TorchCommunicator:
    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def all_to_all_v(self, x_ND, output_splits, input_splits, out_MD=None) -> Handle:
        y_MD = _receive_buffer(x_ND, output_splits, out_MD)
        work = dist.all_to_all_single(y_MD, x_ND.contiguous(), output_splits, input_splits, group=self.group,
                                      async_op=True)  # fmt: skip
        return _Pending(y_MD, work.wait, work.get_future())

    def all_reduce_sum_(self, tensor) -> Handle:
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        return _Pending(tensor, work.wait)


# an exchange moves bytes, so any dtype travels as the integer dtype of its width
_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_words(x_ND: torch.Tensor) -> torch.Tensor:
    """x_ND's memory (contiguous) as (N, W) integers of x_ND's element width (bytes for a width
    numpy lacks an integer of): numpy, hence mpi4py, has no bfloat16 or float8, and an
    all-to-all only copies bits, so the values arrive bit-exact (NaN payloads and -0.0 too)."""
    rows_NR = x_ND.view(x_ND.shape[0], math.prod(x_ND.shape[1:]))  # (N, ...) -> (N, R elements)
    return rows_NR.view(_INT_OF_WIDTH.get(x_ND.element_size(), torch.uint8))  # (N, W), W = R or R x width


class MPICommunicator:
    """mpi4py on CPU tensors (the buffers are shared with numpy, no copies)."""

    def __init__(self, mpi_comm):
        self.comm = mpi_comm
        self.size, self.rank = mpi_comm.Get_size(), mpi_comm.Get_rank()

    def all_to_all_v(self, x_ND, output_splits, input_splits, out_MD=None) -> Handle:
        from mpi4py import MPI

        x_ND = x_ND.contiguous()
        if x_ND.device.type != "cpu":
            raise RuntimeError("comm.backend=mpi exchanges CPU tensors; use comm.backend=torch (nccl) on GPU")
        y_MD = _receive_buffer(x_ND, output_splits, out_MD)
        # NOTE: the MPI buffers are integer views of x_ND's and y_MD's memory (see _as_words):
        # the receive lands in y_MD itself, also when out_MD is a view into a larger buffer
        send_NW, recv_MW = _as_words(x_ND), _as_words(y_MD)
        row = send_NW.shape[1]  # words per row (works for 0 rows too)
        kind = MPI._typedict[send_NW.numpy().dtype.char]  # noqa: SLF001  (mpi4py's dtype table)

        def layout(splits: list[int]) -> tuple[list[int], list[int]]:
            counts = [n * row for n in splits]
            displs = [sum(counts[:i]) for i in range(len(counts))]
            return counts, displs

        request = self.comm.Ialltoallv(
            [send_NW.numpy(), layout(input_splits), kind], [recv_MW.numpy(), layout(output_splits), kind]
        )
        return _Pending(y_MD, request.Wait)

    def all_reduce_sum_(self, tensor) -> Handle:
        from mpi4py import MPI

        if tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.float32, torch.float64):
            # NOTE: numpy (so MPI here) cannot add bf16 or float8: sum in fp32, round once into `tensor`
            wide = tensor.float()
            self.comm.Allreduce(MPI.IN_PLACE, wide.numpy(), op=MPI.SUM)
            tensor.copy_(wide)
        else:
            self.comm.Allreduce(MPI.IN_PLACE, tensor.numpy(), op=MPI.SUM)
        return _Pending(tensor)  # Allreduce is blocking: already done


def ep_communicator(backend: str, dims: ParallelDims, rank: int) -> Communicator:
    """The communicator of `rank`'s EP group for `comm.backend` (torch | mpi).

    torch: the EP process group dims.build_groups made. mpi: MPI_COMM_WORLD split into the
    same groups (EP-major: color = rank // ep); needs MPI's ranks to be torch.distributed's,
    which holds when mpiexec started the ranks (launcher=mpirun).
    """
    if backend == "torch":
        return TorchCommunicator(dims.ep_group)
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if (world.Get_size(), world.Get_rank()) != (dims.world, rank):
        raise ParallelConfigError(
            f"comm.backend=mpi: MPI sees rank {world.Get_rank()} of {world.Get_size()} but torch.distributed "
            f"rank {rank} of {dims.world}; start the ranks with mpiexec (launcher=mpirun)"
        )
    return MPICommunicator(world.Split(color=rank // dims.ep, key=rank))
