"""Tokens/s of a whole training step, eager vs torch.compile, with and without FSDP2, in one run.

What is measured: the `make train` model and batch (experiment=ep2_cpu: 2 gloo ranks on CPU, EP=2,
one thread per rank, fp32), four variants built side by side on every rank from the same seed:
{parallel.fsdp false, true} x {train.compile false, true}. A step is all of it: forward, backward,
gradient reduction (bucketed all-reduce, or FSDP2's reduce-scatter), clipping, the AdamW update and
the step's metrics (epmoe/train/step.py train_step). The variants take turns step by step (one step
of each per round, so a load spike on the shared CPU hits all of them alike); `--warmup` rounds
first, untimed for the medians. Printed per variant: the first step's seconds (for the compiled
variants, inductor's compile: measured apart from the step time), the median step over `--steps`
rounds (rank 0; the ranks step in lockstep), tokens/s = global tokens per step / median step, and
its ratio to eager at the same FSDP setting. Written to benchmarks/results/train_step.md.

    .venv/bin/python -m benchmarks.train_step [--steps 10] [--warmup 2] [overrides ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from epmoe.launch.commands import free_port
from epmoe.train.cli import load_config

WORLD = 2
RESULTS = Path(__file__).parent / "results"
VARIANTS = {  # name -> overrides on top of experiment=ep2_cpu
    "eager": [],
    "compiled": ["train.compile=true"],
    "fsdp eager": ["parallel.fsdp=true"],
    "fsdp compiled": ["parallel.fsdp=true", "train.compile=true"],
}
BASELINE = {"eager": "eager", "compiled": "eager", "fsdp eager": "fsdp eager", "fsdp compiled": "fsdp eager"}


def _rank(rank: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from epmoe.model.transformer import Transformer
    from epmoe.parallel.parallelize import parallelize
    from epmoe.train.data import load_splits
    from epmoe.train.step import train_step
    from epmoe.train.trainer import build_engine, resolve_device

    runs = {}
    for name, overrides in VARIANTS.items():
        cfg = load_config(["experiment=ep2_cpu", f"train.steps={args.warmup + args.steps}", "logger.wandb=false",
                           *overrides, *args.overrides])  # fmt: skip
        torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        device = resolve_device(cfg.train.device)
        model = Transformer(cfg.model, cfg.router)
        par = parallelize(model, cfg, device)
        runs[name] = (cfg, device, par, build_engine(model, cfg.train, par, device), load_splits(cfg.data,
                      cfg.model.vocab_size))  # fmt: skip
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(args.warmup + args.steps):
        for name, (cfg, device, par, engine, data) in runs.items():
            dist.barrier()  # outside the timed region
            t0 = time.perf_counter()
            train_step(engine, data, cfg, device, step, par=par)
            engine.schedule_step()
            seconds[name].append(time.perf_counter() - t0)
    cfg = runs["eager"][0]
    tokens = WORLD * cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    queue.put((rank, {name: {"first_s": s[0], "step_ms": 1e3 * statistics.median(s[args.warmup :]),
                             "tokens": tokens} for name, s in seconds.items()}))  # fmt: skip
    dist.barrier()
    os._exit(0)  # NOTE: skips torch's C++ teardown, which aborts finished ranks now and then (comm/process.py)


def table(result: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    """The markdown table of rank 0's result."""
    lines = [f"world 2 / EP 2, experiment=ep2_cpu (fp32, 1 thread per rank), medians over {args.steps} steps "
             f"after {args.warmup} warm-up rounds; overrides: {' '.join(args.overrides) or 'none'}", "",
             "| variant | first step (s) | step (ms) | tokens/s | vs eager |", "|---|---|---|---|---|"]  # fmt: skip
    for name, r in result.items():
        tok_s = r["tokens"] / (r["step_ms"] / 1e3)
        ratio = result[BASELINE[name]]["step_ms"] / r["step_ms"]
        lines.append(f"| {name} | {r['first_s']:.1f} | {r['step_ms']:.1f} | {tok_s:,.0f} | {ratio:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (the first compiles)")
    parser.add_argument("--out", default=str(RESULTS / "train_step.md"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides on top of experiment=ep2_cpu")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, args, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=3600) for _ in procs)
    for p in procs:
        p.join()
    text = table(results[0], args)
    print(text, end="")
    Path(args.out).write_text("# Training step: eager vs torch.compile, FSDP2 off / on\n\n"
                              "`python -m benchmarks.train_step` (see its docstring)\n\n" + text)  # fmt: skip
    sys.exit(0 if all(p.exitcode == 0 for p in procs) else 1)


if __name__ == "__main__":
    main()
