"""The training step outside the MoE layers: time per step minus the MoE layers' time, and collectives.

What is measured: the `make train` model and batch (experiment=ep2_cpu: 2 gloo ranks on CPU, EP=2,
one thread per rank, bf16 autocast), `--steps` training steps after `--warmup` untimed ones, in
one run. Per step on every rank:
- step_ms: wall time of one training step (forward, backward, gradient reduction, clipping, the
  AdamW update, the bias update and the step's metrics);
- moe_ms: time inside the MoE layers, forward (module hooks) and backward (the layers' full
  backward hooks), exchanges included;
- outside_ms = step_ms - moe_ms: everything the MoE layers do not account for;
- collectives per step, outside the MoE layers (gradient reduction, metrics, norm) and inside
  them (the token exchange), counted by wrapping torch.distributed's collectives.
Printed: the median over steps of each, per rank, and the medians over ranks.

    .venv/bin/python -m benchmarks.step_overhead [--steps 12] [--warmup 3] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from epmoe.launch.commands import free_port
from epmoe.train.cli import load_config

COLLECTIVES = ("all_reduce", "all_to_all_single", "all_gather", "all_gather_into_tensor", "broadcast",
               "reduce_scatter_tensor", "barrier")  # fmt: skip


class StepProbe:
    """Counts torch.distributed collectives (inside / outside the MoE layers) and times the MoE layers."""

    def __init__(self, moe_layers: list[torch.nn.Module]):
        self.inside = 0  # > 0 while a MoE layer computes
        self.started = 0.0
        self.moe_s = 0.0
        self.calls = {"inside": 0, "outside": 0}
        for name in COLLECTIVES:
            setattr(dist, name, self._counted(getattr(dist, name)))
        for moe in moe_layers:
            moe.register_forward_pre_hook(lambda *_: self._enter())
            moe.register_forward_hook(lambda *_: self._leave())
            moe.register_full_backward_pre_hook(lambda *_: self._enter())
            moe.register_full_backward_hook(lambda *_: self._leave())

    def _counted(self, fn):
        def call(*args, **kwargs):
            self.calls["inside" if self.inside else "outside"] += 1
            return fn(*args, **kwargs)

        return call

    def _enter(self) -> None:
        if self.inside == 0:
            self.started = time.perf_counter()
        self.inside += 1

    def _leave(self) -> None:
        self.inside -= 1
        if self.inside == 0:
            self.moe_s += time.perf_counter() - self.started

    def take(self) -> tuple[float, dict[str, int]]:
        moe_s, calls = self.moe_s, dict(self.calls)
        self.moe_s, self.calls = 0.0, {"inside": 0, "outside": 0}
        return moe_s, calls


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from epmoe.model.moe import moe_layers
    from epmoe.model.transformer import Transformer
    from epmoe.parallel.parallelize import parallelize
    from epmoe.train.data import load_splits
    from epmoe.train.step import train_step
    from epmoe.train.trainer import build_engine, resolve_device

    cfg = load_config(["experiment=ep2_cpu", f"train.steps={args.warmup + args.steps}", *args.overrides])
    torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    data = load_splits(cfg.data, cfg.model.vocab_size)
    model = Transformer(cfg.model, cfg.router)
    par = parallelize(model, cfg, device)
    engine = build_engine(model, cfg.train, par, device)
    probe = StepProbe(moe_layers(model))
    rows = []
    for step in range(args.warmup + args.steps):
        probe.take()
        t0 = time.perf_counter()
        train_step(engine, data, cfg, device, step, par=par)
        engine.schedule_step()
        step_s = time.perf_counter() - t0
        moe_s, calls = probe.take()
        if step >= args.warmup:
            rows.append((step_s, moe_s, calls["outside"], calls["inside"]))
    med = [statistics.median(col) for col in zip(*rows)]
    queue.put((rank, {"step_ms": 1e3 * med[0], "moe_ms": 1e3 * med[1], "outside_ms": 1e3 * (med[0] - med[1]),
                      "collectives_outside": med[2], "collectives_inside": med[3]}))  # fmt: skip
    dist.barrier()
    os._exit(0)  # NOTE: skips torch's C++ teardown, which aborts finished ranks now and then (comm/process.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides on top of experiment=ep2_cpu")
    args = parser.parse_args()
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, args.procs, port, args, queue)) for r in range(args.procs)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    keys = ("step_ms", "moe_ms", "outside_ms", "collectives_outside", "collectives_inside")
    print(f"{'rank':>6} " + " ".join(f"{k:>20}" for k in keys))
    for r in sorted(results):
        print(f"{r:>6} " + " ".join(f"{results[r][k]:>20.1f}" for k in keys))
    summary = {k: statistics.median(results[r][k] for r in results) for k in keys}
    print(f"{'median':>6} " + " ".join(f"{summary[k]:>20.1f}" for k in keys))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ranks": results, "median": summary, "steps": args.steps, "warmup": args.warmup}, f, indent=1)
    sys.exit(0 if all(p.exitcode == 0 for p in procs) else 1)


if __name__ == "__main__":
    main()
