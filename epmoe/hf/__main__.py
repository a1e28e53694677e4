"""python -m epmoe.hf import|export: convert between Hugging Face folders and epmoe checkpoints.

    python -m epmoe.hf export <checkpoint or run dir> <hf_dir>   # any EP degree, replicas included
    python -m epmoe.hf import <hf_dir> <run dir>                 # -> <run dir>/checkpoints/step_00000000

An export loads in `transformers.AutoModelForCausalLM.from_pretrained`; an import continues with
`train.resume=<run dir>` (or train directly from the folder with `train.init_from=<hf_dir>`).
Errors (an unsupported option, a missing, extra or misshapen tensor, a bad checkpoint) are one
line and exit 2; nothing half-written is left.

This module is an edge of the layer order (like epmoe/train/__main__.py): it reads and writes
epmoe checkpoints, which live in epmoe.train.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from epmoe.config import ConfigError
from epmoe.exit_codes import EXIT_OK, EXIT_USAGE
from epmoe.hf.convert import from_pretrained, save_pretrained
from epmoe.parallel.parallelize import Parallel
from epmoe.train import checkpoint_files, checkpoint_state
from epmoe.train.checkpoint_model import load_model
from epmoe.train.engine import build_optimizer, build_schedule
from epmoe.train.manifest import ManifestError


def _export(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    loaded = load_model(args.checkpoint)  # every expert, whatever the EP degree it was saved at
    ckpt, cfg, model = loaded.path, loaded.cfg, loaded.model
    source = Path(cfg.train.init_from).expanduser() if cfg.train.init_from else None
    tokenizer = [f for f in (source / n for n in ("tokenizer.json", "tokenizer_config.json")) if f.is_file()] \
        if source and source.is_dir() else []  # fmt: skip
    out = save_pretrained(model, cfg, args.hf_dir, int(args.max_shard_gb * (1 << 30)), tokenizer)
    print(f"exported {ckpt} ({cfg.model.family}, step {loaded.manifest['step']}) to {out} in "
          f"{time.perf_counter() - start:.1f} s")  # fmt: skip
    return EXIT_OK


def _import(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    cfg, model = from_pretrained(args.hf_dir)
    cfg.train.init_from = str(args.hf_dir)
    optimizer = build_optimizer(model, cfg.train)  # fresh, as at step 0: empty moments
    par = Parallel.single(cfg.model.num_experts)
    ckpt = checkpoint_state.save(Path(args.run_dir), 0, model=model, optimizer=optimizer,
                                 scheduler=build_schedule(optimizer, cfg.train), cfg=cfg, rank=0, dims=par.dims,
                                 placement=None)  # fmt: skip
    print(f"imported {args.hf_dir} ({cfg.model.family}) to {ckpt} in {time.perf_counter() - start:.1f} s; "
          f"continue with train.resume={args.run_dir}")  # fmt: skip
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epmoe.hf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="write a checkpoint as a Hugging Face folder (config.json + safetensors)")
    exp.add_argument("checkpoint", type=Path, help="a checkpoint directory, or a run directory (its newest)")
    exp.add_argument("hf_dir", type=Path, help="the folder to create (must not exist or be empty)")
    exp.add_argument("--max-shard-gb", type=float, default=5.0, help="split the weights into files of this size")
    exp.set_defaults(run=_export)
    imp = sub.add_parser("import", help="convert a Hugging Face folder into an epmoe checkpoint at step 0")
    imp.add_argument("hf_dir", type=Path, help="a Hugging Face model folder (config.json + safetensors)")
    imp.add_argument("run_dir", type=Path, help="the run directory to write checkpoints/step_00000000 into")
    imp.set_defaults(run=_import)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, ManifestError, checkpoint_files.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
