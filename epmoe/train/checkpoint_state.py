"""Sharded checkpoints: written atomically by every rank, verified by checksum, resharded on load.

Layout of one checkpoint, `<run_dir>/checkpoints/step_<N>/` (N zero-padded to 8 digits):
  manifest.json       format version, step, config, degrees (world, ep, dp), the placement
                      (expert_of_slot_YS), the data position, and every file's sha256 and size;
                      written last: a directory with a manifest is complete
  common.pt           (rank 0) the non-expert model state (router balancing biases included),
                      the non-expert optimizer state, the LR schedule, the torch RNG state and,
                      under online re-placement, the routing-statistics window summed over ranks
  experts_rank<r>.pt  (EP rank r of expert-data-parallel replica 0; the other replicas hold
                      copies) flat {key: tensor}: "layer<y>.expert<e>.<weight>" is global expert
                      e's row of a stacked expert weight of MoE layer y, "...<weight>.<state>"
                      its optimizer state row (AdamW's exp_avg / exp_avg_sq), and
                      "layer<y>.<weight>.<state>" the per-tensor state (AdamW's step)
Experts are keyed by global id, never by rank, so a checkpoint saved at one (world, ep,
placement) loads at any other: each rank reads the rows of the experts its placement gives it
from whichever file the saved placement names. Every file loads with `weights_only=True`.
The files themselves (names, fsynced writes, checksums, finding, verifying and pruning
checkpoints) are checkpoint_files.py.

A save (a collective: every rank calls it at the same step):
1. rank 0 creates `step_<N>.tmp/`; barrier;
2. EP ranks of replica 0 write their expert file, rank 0 common.pt; each file is fsynced and hashed;
3. one all-reduce gathers the hashes (and is the barrier: every shard is on disk);
4. rank 0 writes the manifest, renames the directory to `step_<N>/`, fsyncs the parent, and
   prunes the oldest complete checkpoints beyond `keep`; barrier.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from epmoe.comm.parallel_dims import ParallelDims
from epmoe.comm.process import all_reduce_sum_
from epmoe.config import Config
from epmoe.model.experts import GroupedExperts
from epmoe.model.moe import named_moe_layers
from epmoe.placement.placement import Placement, RoutingStats
from epmoe.train.checkpoint_files import (
    COMMON,
    FORMAT_VERSION,
    MANIFEST,
    CheckpointError,
    CheckpointWarning,
    checkpoint_dir,
    expert_file,
    fsync_dir,
    load_file,
    prune,
    read_manifest,
    verify,
    write_file,
)


def _expert_params(model: nn.Module) -> dict[str, tuple[int, str]]:
    """{full parameter name: (MoE layer, weight name)} of the stacked expert weights."""
    out = {}
    for y, (prefix, moe) in enumerate(named_moe_layers(model)):
        for w in moe.experts.stacked_weights():
            out[f"{prefix}.experts.{w}"] = (y, w)
    return out


def _identity_placement(num_layers: int, num_experts: int) -> Placement | None:
    """Every expert local (one process, or ep 1): slot e holds expert e."""
    if num_layers == 0:
        return None
    return Placement(torch.arange(num_experts).repeat(num_layers, 1), 1, num_experts, "contiguous")


def _barrier() -> None:
    all_reduce_sum_(torch.zeros(1))


# -- writing ---------------------------------------------------------------------------------------


def _expert_state(model: nn.Module, optimizer: torch.optim.Optimizer, placement: Placement, ep_rank: int) -> dict:
    """This rank's expert rows (weights and optimizer state), keyed by layer and global expert id."""
    out: dict[str, torch.Tensor] = {}
    for y, (_, moe) in enumerate(named_moe_layers(model)):
        ids = placement.experts_on_rank(y, ep_rank).tolist()
        for w, param in moe.experts.stacked_weights().items():
            rows = {"": param.detach()}  # suffix -> [L, ...] tensor
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    rows[f".{key}"] = value
                elif torch.is_tensor(value):  # per-tensor state, e.g. AdamW's step
                    out[f"layer{y}.{w}.{key}"] = value.detach().cpu().clone()
            for local, e in enumerate(ids):
                for suffix, t in rows.items():
                    # NOTE: clone: saving a view would write the whole stacked storage
                    out[f"layer{y}.expert{e}.{w}{suffix}"] = t[local].detach().cpu().clone()
    return out


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """t, copied where it is a view into a larger storage (torch.save writes whole storages;
    DeepSpeed's ZeRO keeps the parameters in flat buffers that hold the experts too)."""
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


def _common_state(model, optimizer, scheduler, routing_window: RoutingStats | None) -> dict:
    """Rank 0's non-expert state; the optimizer's is keyed by parameter name, not position."""
    experts = _expert_params(model)
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    opt = optimizer.state_dict()
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
        for g in opt["param_groups"]
    ]
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    state = {
        "model": {k: _own_storage(v) for k, v in model.state_dict().items() if k not in experts},
        "optimizer": {
            "param_groups": groups,
            "state": {names[i]: s for i, s in opt["state"].items() if names[i] not in experts},
        },
        "scheduler": scheduler.state_dict(),
        "rng": rng,
    }
    if routing_window is not None:
        state["routing_window"] = {"load_YE": routing_window.load_YE, "cooc_YEE": routing_window.cooc_YEE}
    return state


def save(
    run_dir: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: Config,
    rank: int,
    dims: ParallelDims,
    placement: Placement | None,
    routing_window: RoutingStats | None = None,
    keep: int = 0,
) -> Path:
    """Write the checkpoint of `step` (collective: every rank calls it); returns its directory.

    placement: the installed placement (None: every expert local, ep 1). routing_window: this
    rank's routing counts since the last re-placement (summed over ranks here), or None.
    keep: keep the newest `keep` complete checkpoints (0 = all), pruned after this one is complete.
    """
    folder = checkpoint_dir(run_dir)
    final, tmp = folder / f"step_{step:08d}", folder / f"step_{step:08d}.tmp"
    main, ep = rank == 0, dims.ep
    placement = placement or _identity_placement(len(named_moe_layers(model)), dims.num_experts)
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("step_*.tmp"):  # left by a crash: never complete
            shutil.rmtree(stale)
        tmp.mkdir()
    if routing_window is not None:  # collective: the window's counts over all ranks
        load_YE, cooc_YEE = routing_window.load_YE.clone(), routing_window.cooc_YEE.clone()
        routing_window = RoutingStats(all_reduce_sum_(load_YE), all_reduce_sum_(cooc_YEE))
    _barrier()  # the temporary directory exists before anyone writes into it

    # one row per EP rank: 32 sha256 bytes, then the size; the all-reduce gathers them on every rank
    digests_R33 = torch.zeros(ep, 33, dtype=torch.int64)
    if rank < ep and placement is not None:  # expert-DP replica 0 (rank = dp_index * ep + ep_index)
        sha, size = write_file(tmp / expert_file(rank), _expert_state(model, optimizer, placement, rank))
        digests_R33[rank, :32] = torch.tensor(list(bytes.fromhex(sha)))
        digests_R33[rank, 32] = size
    if main:
        common = write_file(tmp / COMMON, _common_state(model, optimizer, scheduler, routing_window))
    all_reduce_sum_(digests_R33)  # NOTE: also the barrier: every shard is on disk after it

    if main:
        files = {COMMON: {"sha256": common[0], "bytes": common[1]}}
        expert_files = [expert_file(r) for r in range(ep)] if placement is not None else []
        for r, name in enumerate(expert_files):
            files[name] = {"sha256": bytes(digests_R33[r, :32].tolist()).hex(), "bytes": int(digests_R33[r, 32])}
        t = cfg.train
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world": dims.world,
            "ep": ep,
            "dp": dims.dp,
            "num_experts": dims.num_experts,
            "moe_layers": [name for name, _ in named_moe_layers(model)],
            "expert_weights": sorted(
                {w for _, w in _expert_params(model).values()}, key=GroupedExperts.WEIGHT_NAMES.index
            ),  # fmt: skip
            "placement": None
            if placement is None
            else {
                "expert_of_slot_YS": placement.expert_of_slot_YS.tolist(),
                "ep": placement.ep,
                "origin": placement.origin,
            },
            "expert_files": expert_files,
            # the data stream is a pure function of (seed, micro, step, global batch): see sample_batch
            "data": {
                "next_step": step,
                "seed": t.seed,
                "global_batch": t.batch_size * dims.world,
                "grad_accum": t.grad_accum,
            },
            "files": files,
            "config": asdict(cfg),
            "torch": torch.__version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        with (tmp / MANIFEST).open("w") as f:
            json.dump(manifest, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():  # a rerun reaching the same step: the new one wins
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(folder)  # make the rename itself durable
        prune(folder, keep)
    _barrier()  # every rank returns once the checkpoint is complete
    return final


# -- reading ---------------------------------------------------------------------------------------


class _ExpertRows:
    """Reads expert rows by (layer, global expert id) from the files the saved placement names."""

    def __init__(self, ckpt: Path, manifest: dict):
        self.ckpt, self.files, self._open = Path(ckpt), manifest["expert_files"], {}
        p = manifest["placement"]
        self.saved = (
            None
            if p is None
            else Placement(torch.tensor(p["expert_of_slot_YS"]), p["ep"], manifest["num_experts"], p["origin"])
        )

    def file_of(self, layer: int, expert: int) -> dict:
        slot = int(self.saved.replica_slots_EM(layer)[expert, 0])  # its first slot names the file
        name = self.files[slot // self.saved.slots_per_rank]
        if name not in self._open:
            self._open[name] = load_file(self.ckpt / name, mmap=True)
        return self._open[name]

    def row(self, layer: int, expert: int, key: str) -> torch.Tensor:
        try:
            return self.file_of(layer, expert)[f"layer{layer}.expert{expert}.{key}"]
        except KeyError:
            raise CheckpointError(f"{self.ckpt} has no row layer{layer}.expert{expert}.{key}") from None

    def stacked(self, layer: int, experts: list[int], key: str) -> torch.Tensor:
        return torch.stack([self.row(layer, e, key) for e in experts])

    def state_keys(self, layer: int, expert: int, weight: str) -> tuple[list[str], dict[str, torch.Tensor]]:
        """(per-row optimizer state keys, per-tensor optimizer state) of `weight` in `layer`."""
        f = self.file_of(layer, expert)
        row_prefix, tensor_prefix = f"layer{layer}.expert{expert}.{weight}.", f"layer{layer}.{weight}."
        rows = [k[len(row_prefix) :] for k in f if k.startswith(row_prefix)]
        return rows, {k[len(tensor_prefix) :]: v for k, v in f.items() if k.startswith(tensor_prefix)}


@dataclass
class Resumed:
    path: Path
    step: int  # the next step to run (the data position)
    placement: Placement | None  # installed now (the saved one where it was kept)
    routing_window: RoutingStats | None  # global counts since the last re-placement, if saved


def restore(
    ckpt: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: Config,
    rank: int,
    dims: ParallelDims,
    placement: Placement | None,
    keep_saved_placement: bool = False,
) -> Resumed:
    """Load `ckpt` into this rank's (sharded) model, optimizer and schedule, and set the RNG.

    The optimizer must have been built over the sharded model (stepped or not). placement: the
    one installed (None: every expert local). keep_saved_placement: where the saved placement
    has this run's ep, load its experts instead; online re-placement wants that. The caller points
    the dispatchers at the returned placement (`Parallel.apply_placement`).
    """
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    layers = named_moe_layers(model)
    if manifest["moe_layers"] != [n for n, _ in layers] or manifest["num_experts"] != dims.num_experts:
        raise CheckpointError(
            f"{ckpt} holds {manifest['num_experts']} experts in MoE layers {manifest['moe_layers']}, this model "
            f"{dims.num_experts} in {[n for n, _ in layers]}: resume with the checkpoint's model config"
        )
    rows = _ExpertRows(ckpt, manifest)
    placement = placement or _identity_placement(len(layers), dims.num_experts)
    saved_map = rows.saved
    if keep_saved_placement and saved_map is not None and saved_map.ep == dims.ep:
        if saved_map.slots_per_rank == placement.slots_per_rank:  # same slots (replicas too): continue it
            placement = saved_map
    common = load_file(ckpt / COMMON)
    ep_rank = dims.ep_rank(rank)

    # 1. model: non-expert state from common.pt, the rows of this rank's experts from the shards
    experts = _expert_params(model)
    local = {y: placement.experts_on_rank(y, ep_rank).tolist() for y in range(len(layers))}
    state = dict(common["model"])
    for name, (y, w) in experts.items():
        state[name] = rows.stacked(y, local[y], w)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt} does not fit this model: {str(e).strip().splitlines()[0]}") from None

    # 2. optimizer: state by parameter name; expert state rows stacked in local order
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    current = optimizer.state_dict()["param_groups"]
    saved = common["optimizer"]
    if [g["params"] for g in saved["param_groups"]] != [[names[i] for i in g["params"]] for g in current]:
        raise CheckpointError(f"{ckpt}: the optimizer's parameter groups differ from this run's")
    opt_state: dict[int, dict] = {}
    for i, name in enumerate(names):
        if name in experts:
            y, w = experts[name]
            row_keys, per_tensor = rows.state_keys(y, local[y][0], w) if local[y] else ([], {})
            if row_keys:
                opt_state[i] = {**per_tensor, **{k: rows.stacked(y, local[y], f"{w}.{k}") for k in row_keys}}
        elif name in saved["state"]:
            opt_state[i] = saved["state"][name]
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": c["params"]}
        for g, c in zip(saved["param_groups"], current)
    ]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict(common["scheduler"])

    # 3. RNG, placement, routing window, data position
    torch.set_rng_state(common["rng"]["torch"])
    if "cuda" in common["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(common["rng"]["cuda"])
    window = common.get("routing_window")
    data, t = manifest["data"], cfg.train
    now = {"seed": t.seed, "global_batch": t.batch_size * dims.world, "grad_accum": t.grad_accum}
    if changed := {k: (data[k], v) for k, v in now.items() if data.get(k) != v}:
        warnings.warn(
            f"resuming {ckpt} with another data stream than it was saved with: {changed} "
            "(saved, now); losses will not continue those of the saved run",
            CheckpointWarning,
            stacklevel=2,
        )
    return Resumed(
        ckpt,
        data["next_step"],
        placement if dims.ep_enabled else None,
        None if window is None else RoutingStats(window["load_YE"], window["cooc_YEE"]),
    )


# -- export and inspection -------------------------------------------------------------------------


def consolidate(ckpt: Path) -> dict[str, torch.Tensor]:
    """One single-device model state dict, every expert in global order; loads into
    `Transformer(cfg.model, cfg.router)`. Verifies the checksums first."""
    manifest = verify(ckpt)
    rows = _ExpertRows(ckpt, manifest)
    state = dict(load_file(Path(ckpt) / COMMON)["model"])
    for y, prefix in enumerate(manifest["moe_layers"]):
        for w in manifest["expert_weights"]:
            state[f"{prefix}.experts.{w}"] = rows.stacked(y, list(range(manifest["num_experts"])), w)
    return state
