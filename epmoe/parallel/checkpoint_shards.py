"""How checkpoints read and write the tensors FSDP2 shards (parallel.fsdp=true): `Shards`, or
`NO_SHARDS` without FSDP. The checkpoint format itself is epmoe/train/checkpoint_state.py.

Under FSDP2 the non-expert state (the model's non-expert tensors and their optimizer state) is
written by torch.distributed.checkpoint (DCP) into the checkpoint's `dense/` folder: every rank
writes only its own shards (`__<rank>_0.distcp`), rank 0 the `.metadata` that describes the
global tensors; nothing is gathered. DCP reshards on load: a run with FSDP at another world size
loads its own shards of the same global tensors, and a run without FSDP (or one process,
`read_dense`) reads them whole. The keys are flat: `model/<name>` and `optim/<param name>/<key>`
(AdamW's exp_avg, exp_avg_sq, step).

The experts keep the format of unsharded runs (one file per EP rank, rows keyed by global expert
id, so that any placement loads them): under FSDP each is gathered over its expert-DP group only
(`Shards.full`), which brings together the rows a rank without FSDP holds anyway.
NOTE: with parallel.ep=1 that is every expert, gathered onto each rank.
NOTE: torch.distributed.checkpoint is imported where it is used: a run without FSDP never touches
DCP files, and the import (DTensor's and sympy's, ~0.9 s) was the largest part of a rank's start.
NOTE: DCP's `.metadata` is a pickle (torch's format, not ours); a restore verifies every file's
sha256 against the manifest before DCP reads it.
"""

from __future__ import annotations

import errno
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from epmoe.parallel.materialize import cut_like, is_sharded

if TYPE_CHECKING:
    from torch.distributed.checkpoint.api import CheckpointException

DENSE = "dense"  # the checkpoint's folder of DCP files
DENSE_METADATA = ".metadata"  # written last, by rank 0: the global tensors and where their shards are
DENSE_FORMAT = "torch.distributed.checkpoint"  # the manifest's name for that format


def dense_file(rank: int) -> str:
    """The DCP file `rank` writes (FileSystemWriter, one file per rank and one thread)."""
    return f"__{rank}_0.distcp"


def model_key(name: str) -> str:
    return f"model/{name}"


def optim_key(param: str, key: str) -> str:
    return f"optim/{param}/{key}"


def split_key(flat: str) -> tuple[str, ...]:
    """("model", name) or ("optim", param name, state key) of a flat DCP key."""
    kind, rest = flat.split("/", 1)
    return (kind, rest) if kind == "model" else (kind, *rest.rsplit("/", 1))


def save_errno(e: CheckpointException) -> int:
    """The errno of the first OSError among a failed DCP save's per-rank failures (EIO if none)."""
    for exc, _ in e.failures.values():
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
    return errno.EIO


def _template(folder: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors to load every key of the DCP checkpoint `folder` into: where `like` {model state name:
    tensor} has the key's parameter and the saved global shape is its shape (the parameter, or
    optimizer state shaped like it), its kind (a DTensor sharded as this run shards it); else whole."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    out = {}
    for key, meta in metadata.items():
        ref = like.get(split_key(key)[1])
        if ref is not None and tuple(ref.shape) == tuple(meta.size):
            out[key] = torch.zeros_like(ref)
        else:
            out[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    return out


def read_dense(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the DCP checkpoint `folder` whole, by flat key; no process group (each
    caller reads every shard)."""
    import torch.distributed.checkpoint as dcp

    state = _template(folder, {})
    with warnings.catch_warnings():  # DCP warns that it reads in one process: that is what is asked here
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
    return state


class Shards:
    """What checkpoints need of FSDP2's DTensors (see the module docstring)."""

    collective = True  # every rank must take part in a save: the experts' gathers and DCP are collectives
    dense_folder: str | None = DENSE  # where the non-expert state goes (None: into common.pt)

    def full(self, t: object) -> object:
        """t whole: a DTensor's full tensor (collective over its mesh), anything else as it is."""
        return t.full_tensor() if is_sharded(t) else t

    def like(self, full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """`full` cut as `param` is (its local shard, no communication: every rank read it whole);
        a DTensor (read by DCP as this run shards it) as it is."""
        return full if is_sharded(full) else cut_like(full, param)

    def save_dense(self, folder: Path, state: dict[str, torch.Tensor], rank: int) -> list[str]:
        """Write `state` (flat keys, this rank's shards) with DCP into `folder` (collective); returns
        the files, relative to `folder`, that this rank wrote. Raises OSError on every rank when a
        write failed on any (DCP gathers the failures)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder), thread_count=1, sync_files=True))
        except CheckpointException as e:  # a BaseException: turn it into what a failed write is
            raise OSError(save_errno(e), f"torch.distributed.checkpoint: {e}") from None
        mine = [dense_file(rank)] + ([DENSE_METADATA] if rank == 0 else [])
        return [name for name in mine if (folder / name).is_file()]

    def load_dense(self, folder: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The DCP checkpoint `folder` by flat key, each tensor cut as its parameter in `like` {model
        state name: tensor} is (collective: DCP plans the reads over the process group)."""
        import torch.distributed.checkpoint as dcp

        state = _template(folder, like)
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)))
        return state


class NoShards(Shards):
    """Without FSDP: every tensor is whole; the non-expert state goes into common.pt."""

    collective = False
    dense_folder = None

    def full(self, t: object) -> object:
        return t

    def like(self, full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        return full

    def load_dense(self, folder: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return read_dense(folder)  # a checkpoint saved with FSDP, read whole


NO_SHARDS = NoShards()
