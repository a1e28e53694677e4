"""Run by `mpiexec -n 2 python -m tests.mpi_ep_layer` (from test_expert_parallel.py): the EP
layer cases of the gloo test, exchanged through mpi4py's Ialltoallv instead."""

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
    check_layer_cases(rank, world, dims, MPICommunicator(MPI.COMM_WORLD))
    print(f"rank {rank}: mpi ep layer: all cases match", flush=True)
