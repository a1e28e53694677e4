"""python -m epmoe.upcycle: a dense model -> an MoE checkpoint at step 0 (console script epmoe-upcycle).

    python -m epmoe.upcycle <dense source> <run dir> [key=value ...]
        dense source: a Hugging Face folder (llama, qwen3) or an epmoe checkpoint / run directory
                      of a dense model (model.num_experts=0)
        key=value:    model.* router.* data.* train.* overrides of the dense model's config
                      (model.num_experts=8 router.top_k=2 model.first_dense_layers=1 ...) and
                      upcycle.method=copy|granular|clusters, upcycle.granularity=G,
                      upcycle.shared_units=N, upcycle.calib_tokens=N, upcycle.eval_tokens=N,
                      upcycle.kmeans_iters=N, upcycle.seed=S

It writes `<run dir>/checkpoints/step_00000000` with a fresh optimizer (empty moments) and its
LR schedule at step 0, as `python -m epmoe.hf import` does. Train from it as a new run with
`python -m epmoe.train train.init_from=<run dir> [train.* parallel.* ...]` (its model, router and
data; the command line's train.*), or continue its saved config with `train.resume=<run dir>`.
It prints the deviation from the
dense model (relative logits error and loss on held-out tokens of the configured data). Errors
(a missing source, one that already has experts, sizes the method cannot build) are one line and
exit 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from epmoe.config import ConfigError
from epmoe.data.errors import DataError
from epmoe.exit_codes import EXIT_OK, EXIT_USAGE
from epmoe.parallel.parallelize import Parallel
from epmoe.train import checkpoint_files, checkpoint_state
from epmoe.train.data import load_splits
from epmoe.train.engine import build_optimizer, build_schedule
from epmoe.train.manifest import ManifestError
from epmoe.upcycle.assemble import Report, load_dense, upcycle
from epmoe.upcycle.options import UpcycleError, split_overrides, target_config


def run(source: Path, run_dir: Path, overrides: list[str]) -> tuple[Path, Report]:
    """Upcycle `source` into `run_dir`; returns the checkpoint written and the deviation report.
    Raises the one-line errors."""
    start = time.perf_counter()
    opts, user = split_overrides(overrides)
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise UpcycleError(f"{run_dir} already holds checkpoints; give a new run directory")
    dense_cfg, dense = load_dense(source)
    cfg = target_config(dense_cfg, opts, user)
    splits = load_splits(cfg.data, cfg.model.vocab_size)
    model, report = upcycle(dense, cfg, opts, splits)
    optimizer = build_optimizer(model, cfg.train)  # fresh, as at step 0: empty moments
    par = Parallel.single(cfg.model.num_experts)
    ckpt = checkpoint_state.save(run_dir, 0, model=model, optimizer=optimizer,
                                 scheduler=build_schedule(optimizer, cfg.train), cfg=cfg, rank=0, dims=par.dims,
                                 placement=None)  # fmt: skip
    m = cfg.model
    print(f"upcycled {source} by {opts.method} into {m.num_experts} experts of {m.expert_hidden} units "
          f"(top-{cfg.router.top_k}, {m.n_shared_experts} shared of {m.shared_hidden if m.n_shared_experts else 0}) "
          f"in {time.perf_counter() - start:.1f} s")  # fmt: skip
    for line in report.lines():
        print(line)
    print(f"wrote {ckpt}; train from it with train.init_from={run_dir} (or continue it with train.resume=)")
    return ckpt, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epmoe.upcycle", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))  # fmt: skip
    parser.add_argument("source", type=Path, help="the dense model: a Hugging Face folder or an epmoe checkpoint")
    parser.add_argument("run_dir", type=Path, help="the run directory to write checkpoints/step_00000000 into")
    parser.add_argument("overrides", nargs="*", help="model.*, router.*, data.*, train.* and upcycle.* key=value")
    args = parser.parse_args(argv)
    try:
        run(args.source.expanduser(), args.run_dir.expanduser(), args.overrides)
    except (ConfigError, DataError, ManifestError, checkpoint_files.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
