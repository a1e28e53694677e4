"""Sharded checkpoints: written atomically by every rank, verified by checksum, resharded on load.

Layout of one checkpoint, `<run_dir>/checkpoints/step_<N>/` (N zero-padded to 8 digits):
  manifest.json       format version, step, config, the architecture fingerprint, degrees
                      (world, ep, dp), the placement (expert_of_slot_YS), the data position and
                      the data source's fingerprint, and every file's sha256 and size; written
                      last: a directory with a manifest is complete. Its schema, and what a
                      resume compares against it, is epmoe/train/manifest.py
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
1. rank 0 creates `step_<N>.tmp/` and fingerprints the data source; barrier;
2. EP ranks of replica 0 write their expert file, rank 0 common.pt; each file is fsynced and hashed;
3. one all-reduce gathers the hashes (and is the barrier: every shard is on disk);
4. rank 0 writes the manifest, renames the directory to `step_<N>/`, fsyncs the parent, and
   prunes the oldest complete checkpoints beyond `keep`; barrier.
Each barrier and the all-reduce also carry the errno of a failed write (disk full), so every rank
learns of it in the collective it is already in: rank 0 removes `step_<N>.tmp/`, every rank raises
the same CheckpointError, and the older checkpoints stay as they were.

Under FSDP2 (parallel.fsdp=true) the format is the same: NOTE: interim: every rank gathers each
sharded tensor whole (`Shards.full`, a collective) so that rank 0 and the EP ranks write what an
unsharded run writes, and a restore cuts each rank's shard from the whole tensor it reads
(`Shards.like`); a checkpoint saved with FSDP loads without it and back. torch.distributed.checkpoint
(each rank writing its own shards) is the follow-up.

A restore refuses a checkpoint of another architecture before it reads a tensor, and warns
(CheckpointWarning) when the data stream or the data source differs from the saved one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from epmoe.comm.parallel_dims import ParallelDims
from epmoe.comm.process import all_reduce_sum_
from epmoe.config import Config
from epmoe.model.experts import GroupedExperts
from epmoe.model.moe import named_moe_layers
from epmoe.parallel.fsdp import NO_SHARDS, Shards
from epmoe.placement.placement import Placement, RoutingStats
from epmoe.train.checkpoint_files import (
    COMMON,
    MANIFEST,
    CheckpointError,
    CheckpointWarning,
    checkpoint_dir,
    complete_checkpoints,
    expert_file,
    fsync_dir,
    load_file,
    prune,
    read_manifest,
    verify,
    write_file,
)
from epmoe.train.data import fingerprint
from epmoe.train.manifest import architecture, architecture_differences, build, data_source_changes


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


# -- writing ---------------------------------------------------------------------------------------


def _expert_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, placement: Placement, ep_rank: int, shards: Shards = NO_SHARDS
) -> dict:
    """This rank's expert rows (weights and optimizer state), keyed by layer and global expert id.
    shards: how to read a sharded stacked weight whole (collective under FSDP2)."""
    out: dict[str, torch.Tensor] = {}
    for y, (_, moe) in enumerate(named_moe_layers(model)):
        ids = placement.experts_on_rank(y, ep_rank).tolist()
        for w, param in moe.experts.stacked_weights().items():
            rows = {"": shards.full(param.detach())}  # suffix -> [L, ...] tensor
            for key, value in optimizer.state.get(param, {}).items():
                value = shards.full(value)
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


def _common_state(model, optimizer, scheduler, routing_window: RoutingStats | None, shards: Shards = NO_SHARDS) -> dict:
    """Rank 0's non-expert state; the optimizer's is keyed by parameter name, not position.
    shards: how to read sharded tensors whole (collective under FSDP2: every rank calls it then)."""
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
        "model": {k: _own_storage(shards.full(v)) for k, v in model.state_dict().items() if k not in experts},
        "optimizer": {
            "param_groups": groups,
            "state": {
                names[i]: {k: shards.full(v) for k, v in s.items()}
                for i, s in opt["state"].items()
                if names[i] not in experts
            },
        },
        "scheduler": scheduler.state_dict(),
        "rng": rng,
    }
    if routing_window is not None:
        state["routing_window"] = {"load_YE": routing_window.load_YE, "cooc_YEE": routing_window.cooc_YEE}
    return state


def _not_saved(final: Path, errno_: int, doing: str) -> CheckpointError:
    """The one-line error of a save that failed on some rank, naming what stays usable."""
    previous = complete_checkpoints(final.parent)
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no previous checkpoint"
    return CheckpointError(f"checkpoint {final.name} not saved: {os.strerror(errno_)} {doing}; {kept}")


def _errno(e: OSError) -> int:
    return e.errno or errno.EIO


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
    shard_written: Callable[[], None] | None = None,
    data_source: dict | None = None,
    shards: Shards = NO_SHARDS,
) -> Path:
    """Write the checkpoint of `step` (collective: every rank calls it); returns its directory.

    placement: the installed placement (None: every expert local, ep 1). routing_window: this
    rank's routing counts since the last re-placement (summed over ranks here), or None.
    keep: keep the newest `keep` complete checkpoints (0 = all), pruned after this one is complete.
    shard_written: called once this rank's files are written, before the checkpoint is complete
    (the fault drill train.fault.in_save kills the rank there). data_source: the data's
    `fingerprint`, as a caller that saves often takes it once; None: rank 0 takes it here.
    An OSError on any rank's write (disk full, file too large, I/O error) reaches every rank
    through the save's own collectives: rank 0 removes `step_<N>.tmp/` and every rank raises the
    same one-line CheckpointError; the older checkpoints are untouched.
    shards: FSDP2's sharded tensors, gathered whole by every rank (see the module docstring).
    """
    folder = checkpoint_dir(run_dir)
    final, tmp = folder / f"step_{step:08d}", folder / f"step_{step:08d}.tmp"
    main, ep = rank == 0, dims.ep
    layers = named_moe_layers(model)
    placement = placement or _identity_placement(len(layers), dims.num_experts)
    # NOTE: each barrier below is an all-reduce carrying rank 0's errno (0: fine), so a failure
    # costs no collective of its own and no rank is left waiting in one
    started_2 = torch.zeros(2, dtype=torch.int64)  # errno, what failed (0: creating tmp, 1: reading the data)
    if main:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob("step_*.tmp"):  # left by a crash: never complete
                shutil.rmtree(stale)
            tmp.mkdir()
            started_2[1] = 1
            data_source = fingerprint(cfg.data) if data_source is None else data_source
        except OSError as e:
            started_2[0] = _errno(e)
    if routing_window is not None:  # collective: the window's counts over all ranks
        load_YE, cooc_YEE = routing_window.load_YE.clone(), routing_window.cooc_YEE.clone()
        routing_window = RoutingStats(all_reduce_sum_(load_YE), all_reduce_sum_(cooc_YEE))
    all_reduce_sum_(started_2)  # the barrier: the temporary directory exists before anyone writes into it
    if errno_ := int(started_2[0]):
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        doing = f"reading the data source {cfg.data.path or 'stdlib'}" if int(started_2[1]) else f"creating {tmp}"
        raise _not_saved(final, errno_, doing)

    # one row per file (the EP ranks' expert files, then common.pt): 32 sha256 bytes, the size,
    # and the errno of a failed write (0: written); the all-reduce gathers them on every rank
    names = [expert_file(r) for r in range(ep)] + [COMMON]
    report_F34 = torch.zeros(ep + 1, 34, dtype=torch.int64)

    def write(row: int, state_of) -> None:
        try:
            sha, size = write_file(tmp / names[row], state_of())
            report_F34[row, :32] = torch.tensor(list(bytes.fromhex(sha)))
            report_F34[row, 32] = size
        except OSError as e:
            report_F34[row, 33] = _errno(e)

    # under FSDP2 every rank takes part in gathering what rank 0 and the EP ranks write
    experts_state = common_state = None
    if placement is not None and (rank < ep or shards.collective):
        experts_state = _expert_state(model, optimizer, placement, dims.ep_rank(rank), shards)
    if main or shards.collective:
        common_state = _common_state(model, optimizer, scheduler, routing_window, shards)
    if rank < ep and placement is not None:  # expert-DP replica 0 (rank = dp_index * ep + ep_index)
        write(rank, lambda: experts_state)
    if main and not report_F34[:, 33].any():
        write(ep, lambda: common_state)
    if shard_written is not None:
        shard_written()
    all_reduce_sum_(report_F34)  # NOTE: also the barrier: every shard is on disk after it
    if failed := report_F34[:, 33].nonzero().flatten().tolist():
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _not_saved(final, int(report_F34[failed[0], 33]), f"writing {names[failed[0]]}")

    done_1 = torch.zeros(1, dtype=torch.int64)  # rank 0's errno writing the manifest
    if main:
        files = {
            name: {"sha256": bytes(report_F34[row, :32].tolist()).hex(), "bytes": int(report_F34[row, 32])}
            for row, name in enumerate(names)
            if name == COMMON or placement is not None
        }
        weights = sorted({w for _, w in _expert_params(model).values()}, key=GroupedExperts.WEIGHT_NAMES.index)
        layer_names = [name for name, _ in layers]
        record = build(step, cfg, dims, layer_names, weights, placement, files, data_source)
        try:
            with (tmp / MANIFEST).open("w") as f:
                json.dump(record, f, indent=1, default=str)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
        except OSError as e:
            done_1[0] = _errno(e)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            if final.exists():  # a rerun reaching the same step: the new one wins
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(folder)  # make the rename itself durable
            prune(folder, keep)
    all_reduce_sum_(done_1)  # the barrier: every rank returns once the checkpoint is complete
    if errno_ := int(done_1[0]):
        raise _not_saved(final, errno_, f"writing {MANIFEST}")
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
    data_source: dict | None = None,
    shards: Shards = NO_SHARDS,
) -> Resumed:
    """Load `ckpt` into this rank's (sharded) model, optimizer and schedule, and set the RNG.

    The optimizer must have been built over the sharded model (stepped or not). placement: the
    one installed (None: every expert local). keep_saved_placement: where the saved placement
    has this run's ep, load its experts instead; online re-placement wants that. The caller points
    the dispatchers at the returned placement (`Parallel.apply_placement`).
    Raises CheckpointError, before reading a tensor, when `cfg` has another architecture than the
    checkpoint (manifest.ARCHITECTURE); warns (CheckpointWarning, rank 0 for the source) when the
    data stream or the data source differ from the saved ones. data_source: the data's
    `fingerprint` where the caller has it; None: rank 0 takes it here. shards: FSDP2's sharded
    parameters, each cut from the whole tensor read (no communication).
    """
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    # before any tensor is read: another architecture may load without a shape error (n_heads)
    if differences := architecture_differences(manifest["architecture"], architecture(cfg)):
        raise CheckpointError(
            f"{ckpt}: the checkpoint's architecture differs from this run's: {', '.join(differences)}; "
            "resume with the checkpoint's config (drop those overrides)"
        )
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
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights under both names
    state = {k: shards.like(v, params[k]) if k in params else v for k, v in state.items()}
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
        if i in opt_state:  # state shaped like its parameter is cut as the parameter is (FSDP2)
            p = params[name]
            opt_state[i] = {k: shards.like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v
                            for k, v in opt_state[i].items()}  # fmt: skip
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
    if rank == 0 and (changes := data_source_changes(data["source"], data_source or fingerprint(cfg.data))):
        warnings.warn(
            f"resuming {ckpt} on a changed data source: {'; '.join(changes)}; the batches will not be those of "
            "the saved run",
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
