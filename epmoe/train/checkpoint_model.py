"""A checkpoint as one single-device model: every expert in global order, whatever the EP degree
and placement it was saved at, with the Config it was saved with. What export
(`python -m epmoe.hf export`), generation (`python -m epmoe.generate`) and evaluation
(`python -m epmoe.eval`) read a checkpoint into; training resumes through checkpoint_state.restore.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from epmoe.config import Config
from epmoe.model.init import load_assigned
from epmoe.model.transformer import Transformer
from epmoe.train import checkpoint_files, checkpoint_state
from epmoe.train.checkpoint_files import CheckpointError


@dataclass
class CheckpointModel:
    path: Path  # the checkpoint directory read
    manifest: dict  # its manifest (epmoe/train/manifest.py)
    cfg: Config  # the config it was saved with
    model: Transformer  # fp32 on CPU, every expert, in training mode as built


def saved_config(manifest: dict, ckpt: Path) -> Config:
    """The Config a checkpoint was saved with (the dataclass defaults under what it stores)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), manifest["config"]))
    except Exception as e:  # a checkpoint of an older schema: OmegaConf's own errors
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"the config saved in {ckpt} does not fit this version's: {first_line}") from None


def load_model(path: Path) -> CheckpointModel:
    """The checkpoint `path` names (a checkpoint directory, or a run directory's newest that
    reads) as one single-device model. Verifies the checksums; raises CheckpointError (one line)
    for a path that is no checkpoint, a corrupt file or a state that does not fit the config."""
    ckpt, manifest = checkpoint_files.readable(Path(path))
    cfg = saved_config(manifest, ckpt)
    state = checkpoint_state.consolidate(ckpt)  # every expert in global order, whatever the EP degree
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.router)
    try:
        load_assigned(model, state)  # the loaded tensors themselves: no second copy; tied stay tied
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt} does not fit its own config: {str(e).strip().splitlines()[0]}") from None
    return CheckpointModel(ckpt, manifest, cfg, model)
