"""`python -m epmoe.plot RUN_DIR [RUN_DIR ...]`: redraw a run's figures from its metrics.jsonl.

    python -m epmoe.plot outputs/2026-12-03/17-10-24            # rewrites its training.png
    python -m epmoe.plot multirun/2026-12-03/17-20-00/*         # overlays a sweep's jobs: compare.png
    python -m epmoe.plot RUN_A RUN_B --out a_vs_b.png

One run: the 2x2 training.png the trainer writes (epmoe/train/plots.py), into the run directory
unless --out says otherwise. Several: their smoothed training and validation losses on one figure,
each labelled by the Hydra overrides that set it apart (its directory name where none do), written
to --out (default: compare.png in the runs' common parent directory). A directory without a
metrics.jsonl is one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from epmoe.config import ConfigError
from epmoe.exit_codes import EXIT_USAGE
from epmoe.train import checkpoint_files, runs
from epmoe.train.checkpoint_files import CheckpointError
from epmoe.train.plots import plot_run, plot_runs, run_title


def _history(run_dir: Path) -> list[dict]:
    records = runs.history(run_dir)
    if not records:
        raise ConfigError(f"{run_dir} has no records in {runs.METRICS}: pass a run directory (outputs/<date>/<time>) "
                          "of a run with logger.jsonl=true")  # fmt: skip
    return records


def _world(run_dir: Path) -> int | None:
    """The world size of the run's newest checkpoint (the config does not hold it), if any."""
    try:
        return checkpoint_files.readable(run_dir)[1]["world"]
    except CheckpointError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epmoe.plot", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))  # fmt: skip
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run directories")
    parser.add_argument("--out", type=Path, help="the PNG to write (default: see above)")
    args = parser.parse_args(argv)
    try:
        histories = [_history(d) for d in args.run_dirs]
        if len(args.run_dirs) == 1:
            run_dir = args.run_dirs[0]
            title = run_title(run_dir, runs.run_config(run_dir), _world(run_dir))
            out = plot_run(histories[0], args.out or run_dir / "training.png", title)
        else:
            common = Path(os.path.commonpath([d.resolve() for d in args.run_dirs]))
            labelled = dict(zip(runs.labels(args.run_dirs), histories))
            out = plot_runs(labelled, args.out or common / "compare.png")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
