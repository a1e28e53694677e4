"""Process-group lifetime and the few whole-tensor collectives the trainer needs.

Everything outside comm/ calls these instead of torch.distributed.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch.distributed import TCPStore


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the job, as the launcher put it in the environment."""

    rank: int
    world: int
    restart: int = 0  # restarts of this job so far (see `restart_count`)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def restart_count() -> int:
    """How often this job was restarted: by torchrun (TORCHELASTIC_RESTART_COUNT) or by a Slurm
    requeue (SLURM_RESTART_COUNT). A restarted job continues from its run's newest checkpoint."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) + int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def launched_rank() -> int:
    """This process's rank as its launcher set it (RANK, or MPI's), before any process group."""
    _map_mpi_env()
    return int(os.environ.get("RANK") or 0)


def ranks_on_this_node() -> int:
    """The ranks sharing this node (torchrun's LOCAL_WORLD_SIZE; MPI's and others' WORLD_SIZE)."""
    _map_mpi_env()
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1)


def die_with_parent(sig: int) -> None:
    """Have the kernel send this process `sig` when its parent (torchrun, mpiexec, the launcher)
    dies, so that no rank outlives its launcher as an orphan, however the launcher ended (also
    SIGKILL). Linux only (prctl PR_SET_PDEATHSIG); elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


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


def init_from_env(device: torch.device, timeout_s: float = 600.0) -> RankInfo:
    """Join the process group a launcher described in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT as torchrun sets them, or an MPI launcher's variables plus
    MASTER_ADDR/MASTER_PORT); a single process needs none. The one place that reads the
    launcher's variables (also the restart counts, into RankInfo.restart).

    `timeout_s` (train.collective_timeout_s) bounds the rendezvous and every collective on the
    world group: with gloo a collective whose peer is gone raises after it (or at once when the
    peer's connection closes) instead of waiting forever; see `peer_failures_as_errors`.
    """
    _map_mpi_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    restart = restart_count()
    if world == 1:
        return RankInfo(0, 1, restart)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if attempt is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # NOTE: torchrun's agent keeps one store for every restart of the job; process-group
            # keys (the groups' rank addresses) left by the failed attempt would send the new
            # ranks to dead peers, so each attempt gets its own key space
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False,
                                  timeout=timeout)  # fmt: skip
            dist.init_process_group(backend, store=dist.PrefixStore(f"epmoe/attempt_{attempt}", store),
                                    rank=int(os.environ["RANK"]), world_size=world, timeout=timeout)  # fmt: skip
        else:
            dist.init_process_group(backend, timeout=timeout)
    return RankInfo(dist.get_rank(), dist.get_world_size(), restart)


def bound_store(addr: str, port: int = 0, read_timeout_s: float = 60.0) -> TCPStore:
    """A TCPStore server listening on `addr` only (port 0: one the kernel picks), for the
    launcher's rendezvous (launch/torchrun.py).

    NOTE: TCPStore binds the wildcard address whatever host it is given; a socket bound by the
    caller (`master_listen_fd`) is the one way to keep it to one interface."""
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted job can take its port again
    sock.bind((addr, port))
    sock.listen(128)
    return TCPStore(addr, sock.getsockname()[1], is_master=True, multi_tenant=True, wait_for_workers=False,
                    timeout=datetime.timedelta(seconds=read_timeout_s), master_listen_fd=sock.detach())  # fmt: skip


def ensure_process_group() -> None:
    """A one-rank process group where there is none: for libraries that need one even in a
    single process (DeepSpeed's engine); the launcher's group is kept where it exists."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


class PeerLostError(RuntimeError):
    """A collective failed because another rank died, hung or lost its connection."""


# what torch.distributed's backends put in a collective's error when a peer is gone or late
# (gloo raises a plain RuntimeError: "[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer ...")
_PEER_FAILURE = re.compile(r"gloo/|connection (closed|reset) by peer|timed out", re.IGNORECASE)


def is_peer_failure(e: BaseException) -> bool:
    """Whether `e` is a process group's report of a failed collective (not a bug of our own)."""
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and bool(_PEER_FAILURE.search(str(e))))


@contextmanager
def peer_failures_as_errors(timeout_s: float) -> Iterator[None]:
    """Turn a collective's failure inside the block into a one-line PeerLostError naming the timeout.

    NOTE: a rank that dies closes its connections, so gloo fails at once; a rank that hangs (or a
    machine that vanishes) is noticed after `timeout_s`. NCCL's watchdog may end the process itself.
    """
    try:
        yield
    except PeerLostError:
        raise
    except Exception as e:
        if not is_peer_failure(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]  # drop gloo's "[file.cc:553] " prefix
        raise PeerLostError(
            f"a collective failed ({first}): another rank probably died or hung; see its log "
            f"(collectives wait at most train.collective_timeout_s={timeout_s:g} s)"
        ) from None


def end_process(code: int) -> NoReturn:
    """End a rank's process whose work is done and written: flush, then exit without running
    the interpreter's teardown.

    NOTE: torch's C++ teardown of a finished rank (process-group and store threads, destroyed
    at interpreter exit) has aborted it now and then on these 2-core machines ("terminate called
    without an active exception", SIGABRT), after its last step, checkpoint and log line; a
    launcher would count that finished rank as a crash and restart the job.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(code)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over `group` (the world when None); a no-op without a process group.

    NOTE: NCCL reduces GPU tensors only: a CPU tensor (a scalar metric) makes a round trip.
    """
    return _all_reduce_(tensor, dist.ReduceOp.SUM, group)


def all_reduce_max_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place maximum over `group` (the world when None), as all_reduce_sum_."""
    return _all_reduce_(tensor, dist.ReduceOp.MAX, group)


def _all_reduce_(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if not dist.is_initialized():
        return tensor
    if tensor.device.type == "cpu" and dist.get_backend(group) == "nccl":
        on_gpu = tensor.cuda()
        dist.all_reduce(on_gpu, op=op, group=group)
        return tensor.copy_(on_gpu)
    dist.all_reduce(tensor, op=op, group=group)
    return tensor
    if tensor.device.type == "cpu" and dist.get_backend(group) == "nccl":
        on_gpu = tensor.cuda()
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM, group=group)
        return tensor.copy_(on_gpu)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor
