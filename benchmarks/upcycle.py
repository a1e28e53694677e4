"""Dense -> MoE upcycling against continuing dense and against an MoE from scratch.

    .venv/bin/python -m benchmarks.upcycle --dense-steps N --steps M [hydra overrides for every run]

One small dense model (`model=dense_small` shrunk to d_model 128, 2 layers, FFN hidden 512; fp32,
byte-level, the built-in stdlib corpus) trains N steps. From its weights, each of these then trains
M steps with the same recipe (a fresh AdamW, warmup, cosine schedule over M steps, same batches):
  (a) dense     the dense model itself (restarted at step 0, like the others)
  (b) copy      8 copies of each FFN, top-2 (sparse upcycling; twice the dense FFN's active units)
  (c) granular  granularity 4, 8 experts of 128 units (2 copies), top-4: the dense active units
  (d) clusters  Read-ME-style: 8 co-activation clusters of 64 units, top-4: half the active units
  (e) scratch   the granular architecture (8 x 128, top-4) randomly initialised, M steps only
and the table gives each model's active FFN units per token, total parameters, held-out bits per
byte at its start (the upcycler's measurement, on its own held-out sample) and after the M steps.
Writes benchmarks/results/upcycle.md.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from epmoe.parallel.parallelize import Parallel
from epmoe.train import checkpoint_state
from epmoe.train.checkpoint_model import load_model
from epmoe.train.cli import load_config
from epmoe.train.engine import build_optimizer, build_schedule
from epmoe.train.trainer import train
from epmoe.upcycle.__main__ import run as upcycle_run

RESULTS = Path(__file__).parent / "results"
DENSE = ["model=dense_small", "model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.dense_hidden=512",
         "model.max_seq_len=128", "data.seq_len=128", "train.batch_size=8", "train.precision=fp32",
         "train.sample_bytes=0", "logger.progress=false", "logger.plots=false", "train.log_every=50"]  # fmt: skip
UPCYCLED = {  # name: (upcycle overrides, active FFN units per token)
    "copy": (["upcycle.method=copy", "model.num_experts=8", "router.top_k=2"], 2 * 512),
    "granular": (["upcycle.method=granular", "model.num_experts=8", "upcycle.granularity=4"], 512),
    "clusters": (["upcycle.method=clusters", "model.num_experts=8", "router.top_k=4"], 4 * 64),
}
SCRATCH = ["model.num_experts=8", "model.expert_hidden=128", "router.top_k=4", "model.n_shared_experts=0",
           "model.first_dense_layers=0"]  # fmt: skip
LN2 = math.log(2)


def _recipe(steps: int) -> list[str]:
    return [f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}", f"train.eval_every={steps}"]


def _restart(dense_run: Path, out: Path) -> Path:
    """The trained dense model at step 0 with a fresh optimizer (the recipe every continuation gets)."""
    loaded = load_model(dense_run)
    opt = build_optimizer(loaded.model, loaded.cfg.train)
    checkpoint_state.save(out, 0, model=loaded.model, optimizer=opt, scheduler=build_schedule(opt, loaded.cfg.train),
                          cfg=loaded.cfg, rank=0, dims=Parallel.single(0).dims, placement=None)  # fmt: skip
    return out


def _params(run_dir: Path) -> int:
    return sum(p.numel() for p in load_model(run_dir).model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense-steps", type=int, default=300, help="N: steps of the dense model before the split")
    parser.add_argument("--steps", type=int, default=150, help="M: steps of each continuation")
    parser.add_argument("--calib-tokens", type=int, default=8192, help="clusters' calibration tokens")
    parser.add_argument("overrides", nargs="*", help="hydra overrides applied to every run")
    parser.add_argument("--out", type=Path, default=None, help="run directories go here (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="upcycle_"))
    N, M = args.dense_steps, args.steps

    t0 = time.perf_counter()
    dense = train(load_config([*DENSE, *_recipe(N), *args.overrides]), out / "dense")
    print(f"dense: {N} steps, held-out {dense.val_bpb:.4f} bits/byte in {time.perf_counter() - t0:.0f} s")
    rows = []  # (name, active units, params, start bpb, end bpb, seconds)
    starts = {"dense": (_restart(out / "dense", out / "a_dense"), float("nan"))}
    for name, (overrides, _) in UPCYCLED.items():
        ckpt, report = upcycle_run(out / "dense", out / f"up_{name}",
                                   [*overrides, f"upcycle.calib_tokens={args.calib_tokens}"])  # fmt: skip
        starts[name] = (ckpt.parents[1], report.moe_loss / LN2)
        starts["dense"] = (starts["dense"][0], report.dense_loss / LN2)  # the same held-out sample
    active = {"dense": 512, **{n: a for n, (_, a) in UPCYCLED.items()}, "scratch": 512}
    for name, (run_dir, start_bpb) in starts.items():
        t = time.perf_counter()
        result = train(load_config([f"train.resume={run_dir}", *_recipe(M), *args.overrides]), out / f"{name}_train")
        rows.append((name, active[name], _params(run_dir), start_bpb, result.val_bpb, time.perf_counter() - t))
    t = time.perf_counter()
    scratch = train(load_config([*DENSE, *SCRATCH, *_recipe(M), *args.overrides]), out / "scratch")
    rows.append(("scratch", 512, _params(out / "scratch"), float("nan"), scratch.val_bpb, time.perf_counter() - t))

    head = f"| model | active FFN units / token | params | bits/byte at start | bits/byte after {M} steps | wall s |"
    lines = [head, "|---|---:|---:|---:|---:|---:|"]
    for name, units, params, start, end, seconds in rows:
        start_s = "-" if math.isnan(start) else f"{start:.4f}"
        lines.append(f"| {name} | {units} | {params / 1e6:.2f}M | {start_s} | {end:.4f} | {seconds:.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    cmd = f".venv/bin/python -m benchmarks.upcycle --dense-steps {N} --steps {M}" + "".join(
        f" {o}" for o in args.overrides
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "upcycle.md").write_text(
        f"# Dense -> MoE upcycling\n\n`{cmd}` (dense trained {N} steps, held-out {dense.val_bpb:.4f} bits/byte; "
        f"then {M} steps each; start bits/byte of upcycled models: their own held-out sample)\n\n{table}\n"
    )
    print(f"runs under {out}; wrote {RESULTS / 'upcycle.md'}")


if __name__ == "__main__":
    main()
