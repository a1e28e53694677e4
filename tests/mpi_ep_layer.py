"""Run by `mpiexec -n 2 python -m tests.mpi_ep_layer` (from test_expert_parallel.py): the EP
layer cases of the gloo test, exchanged through mpi4py's Ialltoallv instead, with the plain and
the pipelined dispatcher."""

from __future__ import annotations

import torch
from mpi4py import MPI

from epmoe.comm.communicator import MPICommunicator
from epmoe.comm.parallel_dims import ParallelDims
from tests.test_expert_parallel import check_layer_cases

if __name__ == "__main__":
    torch.set_num_threads(1)
    world, rank = MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank()
    dims = ParallelDims(world=world, dp=world, ep=world, num_experts=16)
    comm = MPICommunicator(MPI.COMM_WORLD)
    check_layer_cases(rank, world, dims, comm)
    check_layer_cases(rank, world, dims, comm, chunks=2)  # returns land in place (Ialltoallv into a view)
    print(f"rank {rank}: mpi ep layer: all cases match, all-to-all and pipelined", flush=True)
