"""`epmoe-checkpoint inspect|verify|consolidate`: look at, check and export checkpoints.

    epmoe-checkpoint inspect RUN_DIR|CHECKPOINT_DIR      # manifest summary and file sizes
    epmoe-checkpoint verify RUN_DIR|CHECKPOINT_DIR       # sha256 of every file; exit 1 if bad
    epmoe-checkpoint consolidate CHECKPOINT OUT.pt       # one single-device model state dict

(`python -m epmoe.train.checkpoint_cli ...` is the same command.)

A run directory names its newest complete checkpoint. `consolidate` writes every expert in global
order: `Transformer(cfg.model, cfg.router).load_state_dict(torch.load(OUT.pt, weights_only=True))`.
Exit codes: 0 ok, 1 a checkpoint that fails verification, 2 a path that is not a checkpoint.
The format and the logic live in epmoe/train/checkpoint_state.py; this is only the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from epmoe.train import checkpoint_files, checkpoint_state
from epmoe.train.checkpoint_files import CheckpointError

EXIT_BAD_CHECKPOINT, EXIT_USAGE = 1, 2


def summary(ckpt: Path) -> str:
    """A human-readable account of the manifest and the files' sizes."""
    m = checkpoint_files.read_manifest(ckpt)
    model = m["config"]["model"]
    lines = [
        f"checkpoint {ckpt}",
        f"  format {m['format_version']}, step {m['step']} (next data step {m['data']['next_step']}), "
        f"saved {m['saved_at']} with torch {m['torch']}",
        f"  world {m['world']}, ep {m['ep']}, dp {m['dp']}; global batch {m['data']['global_batch']} x "
        f"grad_accum {m['data']['grad_accum']}, seed {m['data']['seed']}",
        f"  model: d_model {model['d_model']}, {model['n_layers']} layers, {m['num_experts']} experts in "
        f"{len(m['moe_layers'])} MoE layers ({', '.join(m['expert_weights'])})",
    ]
    if (p := m["placement"]) is not None:
        lines.append(f"  placement ({p['origin']}, ep {p['ep']}): layer 0 slots -> experts {p['expert_of_slot_YS'][0]}")
    total = 0
    for name, meta in m["files"].items():
        total += meta["bytes"]
        on_disk = (Path(ckpt) / name).stat().st_size if (Path(ckpt) / name).is_file() else "missing"
        lines.append(f"  {name:<20} {meta['bytes'] / 1e6:10.3f} MB  (on disk: {on_disk})  sha256 {meta['sha256'][:16]}")
    lines.append(f"  total {total / 1e6:.3f} MB in {len(m['files'])} files")
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    print(summary(checkpoint_files.latest(args.path)))
    return 0


def _verify(args: argparse.Namespace) -> int:
    ckpt = checkpoint_files.latest(args.path)
    try:
        manifest = checkpoint_files.verify(ckpt)
    except CheckpointError as e:
        print(f"bad: {e}", file=sys.stderr)
        return EXIT_BAD_CHECKPOINT
    size = sum(f["bytes"] for f in manifest["files"].values())
    print(f"ok: {ckpt} ({len(manifest['files'])} files, {size / 1e6:.3f} MB, sha256 verified)")
    return 0


def _consolidate(args: argparse.Namespace) -> int:
    ckpt = checkpoint_files.latest(args.path)
    try:
        state = checkpoint_state.consolidate(ckpt)
    except CheckpointError as e:
        print(f"bad: {e}", file=sys.stderr)
        return EXIT_BAD_CHECKPOINT
    out = Path(args.out)
    if not out.parent.is_dir():
        raise CheckpointError(f"{out.parent} is not a directory; pass OUT.pt in an existing one")
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as f:  # atomic, like the checkpoints themselves
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(out)
    n = sum(t.numel() for t in {t.data_ptr(): t for t in state.values()}.values())  # tied weights once
    print(f"wrote {out}: {len(state)} tensors, {n / 1e6:.2f}M parameters, from {ckpt}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="epmoe-checkpoint", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, run, help_ in (
        ("inspect", _inspect, "print the manifest summary and the files' sizes"),
        ("verify", _verify, "check every file's size and sha256 against the manifest"),
        ("consolidate", _consolidate, "write one single-device model state dict (all experts)"),
    ):
        cmd = sub.add_parser(name, help=help_)
        cmd.add_argument("path", type=Path, help="a checkpoint directory, or a run directory (its newest)")
        if name == "consolidate":
            cmd.add_argument("out", type=Path, help="the .pt file to write")
        cmd.set_defaults(run=run)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
