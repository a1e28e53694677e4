"""End-of-run PNG: the loss curves and the expert-load heatmap (MoE layers x experts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_run(history: list[dict[str, Any]], path: Path) -> Path:
    """Write the plot of a run's metric history to `path` and return it."""
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    loads = [np.asarray(r["expert_load"], dtype=float) for r in history if r.get("expert_load")]

    fig, (ax_loss, ax_load) = plt.subplots(1, 2, figsize=(12, 4.5))
    if train:
        ax_loss.plot(*zip(*train), label="train")
    if val:
        ax_loss.plot(*zip(*val), "o-", label="val")
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)

    if loads:
        total_LE = np.sum(loads, axis=0)  # tokens per (MoE layer, expert) over the run
        share_LE = total_LE / total_LE.sum(axis=1, keepdims=True)
        im = ax_load.imshow(share_LE, aspect="auto", cmap="viridis")
        fig.colorbar(im, ax=ax_load, label="share of routed tokens")
        ax_load.set(xlabel="expert", ylabel="MoE layer", title="expert load over the run")
        ax_load.set_yticks(range(share_LE.shape[0]))
    else:
        ax_load.text(0.5, 0.5, "dense model: no experts", ha="center", va="center")
        ax_load.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
