"""MoE vs a dense model with the same active parameters per token: same data, steps and seed.

    .venv/bin/python -m benchmarks.moe_vs_dense [hydra overrides for both runs]

Trains `model=moe_small` (top-2 of 8 experts of hidden 256 plus one shared expert of 256)
and `model=dense_small` (every FFN hidden 768 = 2 x 256 + 256, so the same FFN FLOPs per
token), then prints both held-out losses, bits per byte and wall times. The MoE model has
more total parameters at equal active parameters: that is the bet MoE makes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from epmoe.model.transformer import Transformer
from epmoe.train.cli import load_config
from epmoe.train.trainer import train

MODELS = ("moe_small", "dense_small")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="hydra overrides applied to both runs")
    parser.add_argument("--out", type=Path, default=None, help="run directories go here (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="moe_vs_dense_"))

    rows = []
    for model in MODELS:
        cfg = load_config([f"model={model}", "logger.plots=false", "train.sample_bytes=0", *args.overrides])
        t0 = time.perf_counter()
        result = train(cfg, out / model)
        seconds = time.perf_counter() - t0
        net = Transformer(cfg.model, cfg.router)
        total = sum(p.numel() for p in net.parameters())
        rows.append((model, total, result.val_loss, result.val_bpb, seconds))

    print(f"\n{'model':<12} {'params':>9} {'val loss':>9} {'bits/byte':>10} {'wall s':>8}")
    for model, total, loss, bpb, seconds in rows:
        print(f"{model:<12} {total / 1e6:>8.2f}M {loss:>9.4f} {bpb:>10.4f} {seconds:>8.1f}")
    print(f"MoE - dense held-out loss: {rows[0][2] - rows[1][2]:+.4f} nats/byte (runs under {out})")


if __name__ == "__main__":
    main()
