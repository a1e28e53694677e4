"""The run's figures, drawn from its metric history (the records of metrics.jsonl).

`plot_run` writes `training.png` (`training_figure`), a 2x2 layout:
    loss (raw, smoothed, validation)   | learning rate and gradient norm
    per-layer imbalance / aux / drops  | expert load over time, one heatmap per MoE layer
A dense model has no bottom row (no empty panels). The trainer rewrites the file at each
evaluation and, on resume, from the whole metrics.jsonl. `plot_runs` overlays several runs'
losses (a sweep); `expert_load_images` renders each layer's heatmap alone for wandb/TensorBoard.

Shape key: T logged steps, E experts, Y MoE layers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from epmoe.config import Config

History = list[dict[str, Any]]
MAX_HEATMAPS = 8  # more MoE layers than this: evenly spaced ones (a 60-layer model's rows would be slivers)
LAYER_KEY = re.compile(r"moe/L(\d+)/imbalance$")
SMOOTHING = 0.9  # TensorBoard's default weight for the debiased moving average


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display), imported at the first
    figure: a process that draws none (every rank but 0; logger.plots=false) skips its ~0.6 s import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smooth(values: list[float], weight: float = SMOOTHING) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing): early points are not
    pulled towards 0."""
    out, avg = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out[i] = avg / (1 - weight ** (i + 1))
    return out


def moe_blocks(history: History) -> list[int]:
    """The block index of each MoE layer, in the order of `expert_load`'s rows (the per-layer keys
    are written in that order)."""
    for record in history:
        blocks = [int(m.group(1)) for key in record if (m := LAYER_KEY.match(key))]
        if blocks:
            return blocks
    return []


def _series(history: History, key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def run_title(run_dir: Path, cfg: Config | None, world: int | None = None) -> str:
    """The run directory and the config a reader needs to tell runs apart."""
    if cfg is None:
        return str(run_dir)
    m, r, t = cfg.model, cfg.router, cfg.train
    experts = f"{m.num_experts} experts top-{r.top_k}" if m.num_experts else "dense"
    where = f"world {world}, ep {cfg.parallel.ep}" if world else f"ep {cfg.parallel.ep}"
    return (f"{run_dir}\n{m.family} d_model {m.d_model}, {m.n_layers} layers, {experts} | {where} | "
            f"{t.steps} steps of {t.batch_size}x{cfg.data.seq_len} tokens/rank, lr {t.lr:g}")  # fmt: skip


def _loss_panel(ax, history: History) -> None:
    steps, loss = _series(history, "loss")
    if steps:
        ax.plot(steps, loss, color="C0", alpha=0.25, lw=0.8, label="train")
        ax.plot(steps, smooth(loss), color="C0", label=f"train (smoothed {SMOOTHING})")
    val_steps, val = _series(history, "val_loss")
    if val_steps:
        ax.plot(val_steps, val, "o-", color="C3", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)


def _lr_panel(ax, history: History) -> None:
    steps, lr = _series(history, "lr")
    ax.plot(steps, lr, color="C2")
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate and gradient norm")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.yaxis.label.set_color("C2")
    ax_norm = ax.twinx()
    norm_steps, norm = _series(history, "grad_norm")
    ax_norm.plot(norm_steps, norm, color="C1", alpha=0.7, lw=0.8)
    ax_norm.set_ylabel("gradient norm (before clipping)")
    ax_norm.yaxis.label.set_color("C1")
    ax.grid(alpha=0.3)


def _routing_panels(fig, cell, history: History, blocks: list[int]) -> None:
    """Three stacked axes sharing the step axis: imbalance, aux loss and drop fraction per layer."""
    plt = pyplot()
    axes = cell.subgridspec(3, 1, hspace=0.08).subplots(sharex=True)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(blocks)))
    names = (("imbalance", "imbalance (max/mean)"), ("aux_loss", "aux loss"), ("drop_frac", "drop fraction"))
    for ax, (key, label) in zip(axes, names):
        for block, color in zip(blocks, colors):
            ax.plot(*_series(history, f"moe/L{block}/{key}"), color=color, lw=0.9, label=f"L{block}")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("per MoE layer (L = block index)")
    axes[0].legend(ncol=min(len(blocks), 8), fontsize="x-small", loc="upper right")
    if not any(v for block in blocks for v in _series(history, f"moe/L{block}/drop_frac")[1]):
        axes[2].text(0.5, 0.5, "no tokens dropped (dropless)", ha="center", va="center", transform=axes[2].transAxes)
    axes[2].set_xlabel("step")


def _load_shares(history: History) -> tuple[list[int], np.ndarray]:
    """Steps and the share of each expert in its layer's routed tokens, share_YTE."""
    rows = [(r["step"], r["expert_load"]) for r in history if r.get("expert_load")]
    steps = [s for s, _ in rows]
    load_TYE = np.asarray([load for _, load in rows], dtype=float)
    share_TYE = load_TYE / np.maximum(load_TYE.sum(axis=2, keepdims=True), 1e-9)
    return steps, share_TYE.transpose(1, 0, 2)


def _draw_heatmap(ax, steps: list[int], share_TE: np.ndarray, block: int, vmax: float):
    """One layer's load over time: x steps, y experts, colour centred (white) on the uniform 1/E,
    blue below it, red above, up to `vmax` (at least 2/E)."""
    from matplotlib.colors import TwoSlopeNorm

    E = share_TE.shape[1]
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0 / E, vmax=max(vmax, 2.0 / E))
    im = ax.imshow(share_TE.T, aspect="auto", origin="lower", cmap="RdBu_r", norm=norm, interpolation="nearest",
                   extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, E - 0.5))  # fmt: skip
    ax.set_ylabel(f"L{block}\nexpert")
    return im


def _heatmap_panels(fig, cell, history: History, blocks: list[int]) -> None:
    steps, share_YTE = _load_shares(history)
    shown = list(range(len(blocks)))
    if len(shown) > MAX_HEATMAPS:
        shown = sorted({round(i) for i in np.linspace(0, len(blocks) - 1, MAX_HEATMAPS)})
    axes = np.atleast_1d(cell.subgridspec(len(shown), 1, hspace=0.1).subplots(sharex=True))
    vmax = share_YTE[shown].max()  # one colour scale for every layer: the colour bar is shared
    for ax, y in zip(axes, shown):
        im = _draw_heatmap(ax, steps, share_YTE[y], blocks[y], vmax)
    of = f", {len(shown)} of {len(blocks)} layers" if len(shown) < len(blocks) else ""
    axes[0].set_title(f"expert load over time (share of tokens; white = uniform 1/E{of})")
    axes[-1].set_xlabel("step")
    fig.colorbar(im, ax=list(axes), label="share of the layer's routed tokens", fraction=0.04)


def plot_run(history: History, path: Path, title: str = "") -> Path:
    """Write the figure of one run's metric history to `path` and return it."""
    return _save(training_figure(history, title), path)


def training_figure(history: History, title: str = ""):
    """The 2x2 figure of one run's metric history (1x2 for a dense model): see the module docstring."""
    plt = pyplot()
    blocks = moe_blocks(history) if any(r.get("expert_load") for r in history) else []
    if blocks:
        fig = plt.figure(figsize=(15, 10), layout="constrained")
        grid = fig.add_gridspec(2, 2)
    else:  # dense: the routing row would be empty
        fig = plt.figure(figsize=(15, 5), layout="constrained")
        grid = fig.add_gridspec(1, 2)
    _loss_panel(fig.add_subplot(grid[0, 0]), history)
    _lr_panel(fig.add_subplot(grid[0, 1]), history)
    if blocks:
        _routing_panels(fig, grid[1, 0], history, blocks)
        _heatmap_panels(fig, grid[1, 1], history, blocks)
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig


def plot_runs(histories: dict[str, History], path: Path) -> Path:
    """Overlay several runs (a sweep): smoothed training loss and validation loss, one colour per
    run, labelled by the dict's keys."""
    plt = pyplot()
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(15, 5), layout="constrained")
    for i, (label, history) in enumerate(histories.items()):
        steps, loss = _series(history, "loss")
        if steps:
            ax_train.plot(steps, smooth(loss), color=f"C{i % 10}", label=label)
        val_steps, val = _series(history, "val_loss")
        if val_steps:
            ax_val.plot(val_steps, val, "o-", color=f"C{i % 10}", label=label)
    ax_train.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=f"training loss (smoothed {SMOOTHING})")
    ax_val.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="validation loss")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def expert_load_images(history: History) -> dict[str, np.ndarray]:
    """{"expert_load/L{block}": an RGB image_HW3 (uint8) of that layer's load over time} for the
    dashboards; empty for a dense model."""
    if not any(r.get("expert_load") for r in history):
        return {}
    plt = pyplot()
    blocks = moe_blocks(history)
    steps, share_YTE = _load_shares(history)
    images = {}
    for y, block in enumerate(blocks):
        fig, ax = plt.subplots(figsize=(6, 3), layout="constrained", dpi=80)
        im = _draw_heatmap(ax, steps, share_YTE[y], block, share_YTE[y].max())
        fig.colorbar(im, ax=ax, label="share (white = 1/E)")
        ax.set(xlabel="step", title=f"expert load, MoE layer at block {block}")
        fig.canvas.draw()
        images[f"expert_load/L{block}"] = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        plt.close(fig)
    return images


def _save(fig, path: Path) -> Path:
    """Write atomically: a reader (or a kill) never sees a half-written PNG."""
    plt = pyplot()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
