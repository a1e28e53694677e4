"""Process-group lifetime and the few whole-tensor collectives the trainer needs.

Everything outside comm/ calls these instead of torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# rank / world variables of MPI launchers, mapped onto torch.distributed's RANK / WORLD_SIZE
_MPI_ENV = (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"))


def _map_mpi_env() -> None:
    """Under mpiexec (MPICH's PMI or Open MPI), fill RANK, WORLD_SIZE and LOCAL_RANK from it."""
    if "RANK" in os.environ:
        return
    for rank_var, size_var in _MPI_ENV:
        if rank_var in os.environ:
            os.environ["RANK"], os.environ["WORLD_SIZE"] = os.environ[rank_var], os.environ[size_var]
            local = os.environ.get("MPI_LOCALRANKID") or os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
            os.environ.setdefault("LOCAL_RANK", local)
            return


def init_from_env(device: torch.device) -> RankInfo:
    """Join the process group a launcher described in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT as torchrun sets them, or an MPI launcher's variables plus
    MASTER_ADDR/MASTER_PORT); a single process needs none."""
    _map_mpi_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return RankInfo(0, 1)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return RankInfo(dist.get_rank(), dist.get_world_size())


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over `group` (the world when None); a no-op without a process group.

    NOTE: NCCL reduces GPU tensors only: a CPU tensor (a scalar metric) makes a round trip.
    """
    if not dist.is_initialized():
        return tensor
    if tensor.device.type == "cpu" and dist.get_backend(group) == "nccl":
        on_gpu = tensor.cuda()
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM, group=group)
        return tensor.copy_(on_gpu)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor
