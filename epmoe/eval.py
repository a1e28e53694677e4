"""python -m epmoe.eval: the held-out loss of a checkpoint, in nats/token, bits/token and bits/byte.

    python -m epmoe.eval <checkpoint or run dir>                         # the run's own held-out data
    python -m epmoe.eval <run dir> data=text data.path=~/books train.eval_batches=32

One process, every expert in it (a checkpoint saved at any EP degree is consolidated). The
config is the checkpoint's, composed as `train.resume` composes it (epmoe/train/cli.py), with
the command line's overrides on top: data.* (and the data group) and the evaluation's train.*
keys, EVAL_KEYS; any other key is a one-line error. The tokenizer and the sequence length stay
the checkpoint's unless named (a data group resets them). Unless train.batch_size is given, a batch
is the run's global batch (batch_size x world), so the batches are the ones its evaluations
drew (step.evaluate: train.eval_batches of them, seeded by train.seed), and the loss is the
one the run reported at that step, to float rounding. Bits per byte need the bytes behind the
tokens: text data has them; token files (data.kind=bin) do not.
Errors (no checkpoint, a bad override, unusable data) are one line and exit 2.

In the layer order (tests/test_layering.py) this command line sits below epmoe.train: it reads
epmoe checkpoints and evaluates as the trainer does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from epmoe.config import Config, ConfigError
from epmoe.data.errors import DataError
from epmoe.exit_codes import EXIT_OK, EXIT_USAGE
from epmoe.parallel.parallelize import Parallel
from epmoe.train import checkpoint_files
from epmoe.train.checkpoint_files import CheckpointError
from epmoe.train.checkpoint_model import load_model
from epmoe.train.cli import hydra_quoted, load_config
from epmoe.train.data import load_splits
from epmoe.train.manifest import ManifestError
from epmoe.train.step import evaluate
from epmoe.train.trainer import TrainResult, resolve_device

USER_ERRORS = (ConfigError, CheckpointError, ManifestError, DataError)
# the train.* keys an evaluation reads: what it draws, how many, at what precision, where
EVAL_KEYS = ("train.batch_size", "train.eval_batches", "train.seed", "train.precision", "train.device",
             "train.threads")  # fmt: skip


def _key(override: str) -> str:
    if "=" not in override:
        raise ConfigError(f"{override!r} is not an override: give key=value (data.path=..., train.eval_batches=...)")
    return override.split("=", 1)[0].lstrip("+~")


# what the model itself fixes: a data group chosen on the command line (data=text) would reset
# them to the defaults (bytes, 256 tokens), so they stay the checkpoint's unless named
MODEL_DATA_KEYS = ("data.tokenizer", "data.seq_len")


def _quoted(value: object) -> str:
    """A value for Hydra's override grammar: null, a number, or a quoted string (a path may hold =)."""
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    return hydra_quoted(str(value))


def eval_config(ckpt: Path, manifest: dict, overrides: list[str]) -> Config:
    """The checkpoint's config with `overrides` on top (data.* and EVAL_KEYS only); MODEL_DATA_KEYS
    and train.batch_size (the run's global batch) the checkpoint's unless given."""
    keys = [_key(o) for o in overrides]
    for key in keys:
        if not (key == "data" or key.startswith("data.") or key in EVAL_KEYS):
            raise ConfigError(f"{key} cannot be overridden in an evaluation: give data=<group>, data.<key> or "
                              f"{', '.join(EVAL_KEYS)}")  # fmt: skip
    saved = manifest["config"]["data"]
    kept = [f"{k}={_quoted(saved.get(k.split('.', 1)[1]))}" for k in MODEL_DATA_KEYS if k not in keys]
    cfg = load_config([f"train.resume={_quoted(ckpt)}", *overrides, *kept])
    if "train.batch_size" not in keys:
        cfg.train.batch_size = manifest["data"]["global_batch"]
    return cfg


def evaluate_checkpoint(path: Path, overrides: list[str]) -> tuple[TrainResult, Config, str]:
    """(result with val_loss and val_bytes_per_token, the config used, the data's description)."""
    ckpt, manifest = checkpoint_files.readable(path)
    cfg = eval_config(ckpt, manifest, overrides)  # a bad override fails before anything is read
    device = resolve_device(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    data = load_splits(cfg.data, cfg.model.vocab_size)
    model = load_model(ckpt).model.to(device)
    loss = evaluate(model, data, cfg, device, Parallel.single(cfg.model.num_experts))
    return TrainResult(ckpt, val_loss=loss, val_bytes_per_token=data.val_bytes_per_token), cfg, data.description


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epmoe.eval", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory, or a run directory (its newest)")
    parser.add_argument("overrides", nargs="*", help=f"data=<group>, data.<key>=value, or {', '.join(EVAL_KEYS)}")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        result, cfg, description = evaluate_checkpoint(args.checkpoint, args.overrides)
    except USER_ERRORS as e:
        print("error: " + str(e).replace("\n", "\\n"), file=sys.stderr)
        return EXIT_USAGE
    t = cfg.train
    bpb = "bits/byte unknown (token ids)" if result.val_bpb is None else f"{result.val_bpb:.6f} bits/byte"
    print(f"checkpoint {result.run_dir}; held-out data: {description}")
    print(f"held-out loss {result.val_loss:.6f} nats/token, {result.val_bits_per_token:.6f} bits/token, {bpb} "
          f"({t.eval_batches} batches of {t.batch_size} x {cfg.data.seq_len} tokens, seed {t.seed}, {t.precision}; "
          f"{time.perf_counter() - start:.1f} s)")  # fmt: skip
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
