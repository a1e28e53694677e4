"""train.init_from: the weights a fresh run starts from — a Hugging Face folder or an epmoe checkpoint.

A fresh run (step 0, a new optimizer and LR schedule, its own run directory) takes the
architecture from its starting point and everything else from the command line:
- a Hugging Face folder (config.json + safetensors): model and router from config.json, the
  folder's tokenizer for text data (epmoe/hf/convert.py); every rank reads only its shards;
- an epmoe checkpoint, or a run directory's newest one (`python -m epmoe.upcycle`'s output, or any
  training run's): model, router and data as saved; its weights only, resharded to this run's
  (world, ep, fsdp, placement) as a resume reshards them, its optimizer state, schedule, step
  and placement left behind. (`train.resume` continues a run instead: all of its state.)
A model.* or router.* override that changes the architecture is refused before ranks start,
as a resume refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from epmoe.config import Config
from epmoe.hf.convert import config_from_hf, load_parallel
from epmoe.hf.convert import plan as hf_plan
from epmoe.model.transformer import Transformer
from epmoe.parallel.parallelize import Parallel, allocate_parallel
from epmoe.train import checkpoint_files, checkpoint_state
from epmoe.train.checkpoint_files import MANIFEST, CheckpointError
from epmoe.train.checkpoint_model import saved_config

HF_CONFIG = "config.json"  # what makes a folder a Hugging Face model
INIT_FIX = "train.init_from takes the checkpoint's model and router: drop those overrides"


class StartingPoint(Protocol):
    """Where a fresh run's weights come from."""

    def config(self) -> Config:
        """epmoe's defaults under what the starting point fixes (its architecture, its data)."""

    def check(self, cfg: Config) -> None:
        """Raise the one-line error if `cfg`'s model cannot start from it (no tensor read)."""

    def load(self, cfg: Config, device: torch.device) -> tuple[Transformer, Parallel, str]:
        """This rank's part of the model, read from it (a collective when world > 1), its Parallel,
        and a line for the console."""


def starting_point(path: Path) -> StartingPoint:
    """The starting point at `path`: a Hugging Face folder if it holds config.json, else an epmoe
    checkpoint (a checkpoint directory, or a run or checkpoints directory's newest)."""
    path = Path(path).expanduser()
    if (path / HF_CONFIG).is_file():
        return HuggingFaceFolder(path)
    if not path.exists():
        raise CheckpointError(f"train.init_from={path} does not exist; give a Hugging Face folder ({HF_CONFIG} and "
                              f"safetensors) or an epmoe checkpoint or run directory ({MANIFEST})")  # fmt: skip
    return EpmoeCheckpoint(path)


@dataclass
class HuggingFaceFolder:
    path: Path

    def config(self) -> Config:
        return config_from_hf(self.path)

    def check(self, cfg: Config) -> None:
        hf_plan(self.path, cfg)  # every tensor of the folder fits the model and none is missing (headers only)

    def load(self, cfg: Config, device: torch.device) -> tuple[Transformer, Parallel, str]:
        model, par, folder = load_parallel(cfg, self.path, device)
        return model, par, (f"imported {self.path} ({cfg.model.family}): rank 0 read "
                            f"{folder.bytes_read / 1e6:,.1f} MB of its tensors")  # fmt: skip


@dataclass
class EpmoeCheckpoint:
    path: Path  # a checkpoint, or a run / checkpoints directory (its newest complete checkpoint)

    def config(self) -> Config:
        ckpt, manifest = checkpoint_files.readable(self.path)
        saved = saved_config(manifest, ckpt)
        return Config(model=saved.model, router=saved.router, data=saved.data)

    def check(self, cfg: Config) -> None:
        ckpt, manifest = checkpoint_files.readable(self.path)
        checkpoint_state.check_architecture(ckpt, manifest, cfg, INIT_FIX)

    def load(self, cfg: Config, device: torch.device) -> tuple[Transformer, Parallel, str]:
        model, par = allocate_parallel(cfg, device)
        # rank 0 verifies the checksums and picks the checkpoint; every rank reads its part
        ckpt = checkpoint_files.agree(self.path, par.info.is_main)
        manifest = checkpoint_files.read_manifest(ckpt)
        checkpoint_state.load_weights(ckpt, manifest, model, cfg, par.info.rank, par.dims, par.placement,
                                      shards=par.shards, fix=INIT_FIX)  # fmt: skip
        return model, par, (f"initialised from the weights of {ckpt} (step {manifest['step']}); "
                            "a fresh optimizer and schedule from step 0")  # fmt: skip
