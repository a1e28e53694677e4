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
  dense/              under FSDP2 instead of common.pt's model and optimizer state: those tensors
                      in torch.distributed.checkpoint's format, each rank's shards in its own file,
                      written with nothing gathered (epmoe/parallel/checkpoint_shards.py), read back resharded
                      to any world with FSDP or whole without it
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
2. under FSDP2 every rank writes its shards into dense/ (a collective); EP ranks of replica 0 write
   their expert file, rank 0 common.pt; each file is fsynced and hashed;
3. one all-reduce gathers the hashes (and is the barrier: every shard is on disk);
4. rank 0 writes the manifest, renames the directory to `step_<N>/`, fsyncs the parent, and
   prunes the oldest complete checkpoints beyond `keep`; barrier.
Each barrier and the all-reduce also carry the errno of a failed write (disk full), so every rank
learns of it in the collective it is already in: rank 0 removes `step_<N>.tmp/`, every rank raises
the same CheckpointError, and the older checkpoints stay as they were.

Under FSDP2 the experts keep their files: each is gathered over its expert-DP group only
(`Shards.full`); a restore cuts each rank's shard from the rows it reads (`Shards.like`).

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
from epmoe.durable import fsync_path, sha256_file
from epmoe.model.experts import GroupedExperts
from epmoe.model.moe import expert_weight_names, named_moe_layers
from epmoe.parallel.checkpoint_shards import DENSE_METADATA, NO_SHARDS, Shards, dense_file
from epmoe.placement.placement import Placement, RoutingStats
from epmoe.train.checkpoint_contents import (
    ExpertRows,
    common_file_state,
    dense_shard_state,
    experts_file_state,
    identity_placement,
    param_names,
    read_non_expert,
)
from epmoe.train.checkpoint_files import (
    COMMON,
    MANIFEST,
    CheckpointError,
    CheckpointWarning,
    checkpoint_dir,
    complete_checkpoints,
    expert_file,
    load_file,
    prune,
    read_manifest,
    verify,
    write_file,
)
from epmoe.train.data import fingerprint
from epmoe.train.manifest import architecture, architecture_differences, build, data_source_changes


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
    placement = placement or identity_placement(len(layers), dims.num_experts)
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

    # one row per file (the EP ranks' expert files, common.pt, under FSDP2 each rank's DCP file
    # and the DCP metadata): 32 sha256 bytes, the size, the errno of a failed write (0: none) and
    # whether it was written; the all-reduce gathers them on every rank
    dense = shards.dense_folder
    names = [expert_file(r) for r in range(ep)] + [COMMON]
    if dense is not None:
        names += [f"{dense}/{dense_file(r)}" for r in range(dims.world)] + [f"{dense}/{DENSE_METADATA}"]
    report_F35 = torch.zeros(len(names), 35, dtype=torch.int64)

    def record(name: str, sha: str, size: int) -> None:
        row = names.index(name)
        report_F35[row, :32] = torch.tensor(list(bytes.fromhex(sha)))
        report_F35[row, 32], report_F35[row, 34] = size, 1

    def write(row: int, state_of) -> None:
        try:
            record(names[row], *write_file(tmp / names[row], state_of()))
        except OSError as e:
            report_F35[row, 33] = _errno(e)

    # under FSDP2 every rank takes part in gathering the expert rows the EP ranks write, and
    # writes its own shards of the rest (DCP: a collective)
    experts_state = common_state = None
    if placement is not None and (rank < ep or shards.collective):
        experts_state = experts_file_state(model, optimizer, placement, dims.ep_rank(rank), shards)
    if main:
        common_state = common_file_state(model, optimizer, scheduler, routing_window, with_dense=dense is None)
    if dense is not None:
        try:
            for name in shards.save_dense(tmp / dense, dense_shard_state(model, optimizer), rank):
                path = tmp / dense / name
                record(f"{dense}/{name}", sha256_file(path), path.stat().st_size)
        except OSError as e:  # raised on every rank: the row of this rank's own file carries it
            report_F35[names.index(f"{dense}/{dense_file(rank)}"), 33] = _errno(e)
    if rank < ep and placement is not None:  # expert-DP replica 0 (rank = dp_index * ep + ep_index)
        write(rank, lambda: experts_state)
    if main and not report_F35[:, 33].any():
        write(ep, lambda: common_state)
    if shard_written is not None:
        shard_written()
    all_reduce_sum_(report_F35)  # NOTE: also the barrier: every shard is on disk after it
    if failed := report_F35[:, 33].nonzero().flatten().tolist():
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _not_saved(final, int(report_F35[failed[0], 33]), f"writing {names[failed[0]]}")

    done_1 = torch.zeros(1, dtype=torch.int64)  # rank 0's errno writing the manifest
    if main:
        files = {
            name: {"sha256": bytes(report_F35[row, :32].tolist()).hex(), "bytes": int(report_F35[row, 32])}
            for row, name in enumerate(names)
            if report_F35[row, 34]
        }
        weights = sorted({w for _, w in expert_weight_names(model).values()}, key=GroupedExperts.WEIGHT_NAMES.index)
        layer_names = [name for name, _ in layers]
        record = build(step, cfg, dims, layer_names, weights, placement, files, data_source, dense)
        try:
            with (tmp / MANIFEST).open("w") as f:
                json.dump(record, f, indent=1, default=str)
                f.flush()
                os.fsync(f.fileno())
            fsync_path(tmp)
        except OSError as e:
            done_1[0] = _errno(e)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            if final.exists():  # a rerun reaching the same step: the new one wins
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(folder)  # make the rename itself durable
            prune(folder, keep)
    all_reduce_sum_(done_1)  # the barrier: every rank returns once the checkpoint is complete
    if errno_ := int(done_1[0]):
        raise _not_saved(final, errno_, f"writing {MANIFEST}")
    return final


# -- reading ---------------------------------------------------------------------------------------


@dataclass
class Resumed:
    path: Path
    step: int  # the next step to run (the data position)
    placement: Placement | None  # installed now (the saved one where it was kept)
    routing_window: RoutingStats | None  # global counts since the last re-placement, if saved


RESUME_FIX = "resume with the checkpoint's config (drop those overrides)"


def check_architecture(ckpt: Path, manifest: dict, cfg: Config, fix: str = RESUME_FIX) -> None:
    """Raise CheckpointError naming every difference when `cfg` has another architecture than the
    checkpoint (manifest.ARCHITECTURE); `fix` ends the message. Reads no tensor: another
    architecture may load without a shape error (n_heads)."""
    if differences := architecture_differences(manifest["architecture"], architecture(cfg)):
        raise CheckpointError(f"{ckpt}: the checkpoint's architecture differs from this run's: "
                              f"{', '.join(differences)}; {fix}")  # fmt: skip


@dataclass
class LoadedWeights:
    """What `load_weights` read that the optimizer's restore reads on from."""

    common: dict  # common.pt
    rows: ExpertRows  # the expert files
    placement: Placement  # whose experts this rank loaded
    local: dict[int, list[int]]  # {MoE layer index: this rank's global expert ids, in local order}
    dense_optimizer: dict  # the non-expert optimizer state {param name: {key: value}} (read with the model)


def load_weights(
    ckpt: Path,
    manifest: dict,
    model: nn.Module,
    cfg: Config,
    rank: int,
    dims: ParallelDims,
    placement: Placement | None,
    keep_saved_placement: bool = False,
    shards: Shards = NO_SHARDS,
    fix: str = RESUME_FIX,
) -> LoadedWeights:
    """Load the model state of `ckpt` into this rank's (sharded) model: the non-expert state and
    the rows of the experts `placement` gives this rank (None: every expert local), by global id
    from whichever file holds them. keep_saved_placement and shards: see `restore`. Raises
    CheckpointError, before reading a tensor, for another architecture or other MoE layers
    (`fix` ends the message)."""
    check_architecture(ckpt, manifest, cfg, fix)
    layers = named_moe_layers(model)
    if manifest["moe_layers"] != [n for n, _ in layers] or manifest["num_experts"] != dims.num_experts:
        raise CheckpointError(
            f"{ckpt} holds {manifest['num_experts']} experts in MoE layers {manifest['moe_layers']}, this model "
            f"{dims.num_experts} in {[n for n, _ in layers]}: {fix}"
        )
    rows = ExpertRows(ckpt, manifest)
    placement = placement or identity_placement(len(layers), dims.num_experts)
    saved_map = rows.saved
    if keep_saved_placement and saved_map is not None and saved_map.ep == dims.ep:
        if saved_map.slots_per_rank == placement.slots_per_rank:  # same slots (replicas too): continue it
            placement = saved_map
    common = load_file(ckpt / COMMON)
    ep_rank = dims.ep_rank(rank)
    experts = expert_weight_names(model)
    local = {y: placement.experts_on_rank(y, ep_rank).tolist() for y in range(len(layers))}
    like = {k: v for k, v in model.state_dict().items() if k not in experts}
    state, dense_optimizer = read_non_expert(ckpt, manifest, common, like, shards)
    for name, (y, w) in experts.items():
        state[name] = rows.stacked(y, local[y], w)
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights under both names
    state = {k: shards.like(v, params[k]) if k in params else v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt} does not fit this model: {str(e).strip().splitlines()[0]}") from None
    return LoadedWeights(common, rows, placement, local, dense_optimizer)


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
    # 1. model: the non-expert state (common.pt, or DCP's files), the rows of this rank's experts
    loaded = load_weights(ckpt, manifest, model, cfg, rank, dims, placement, keep_saved_placement, shards)
    common, rows, placement, local, dense_optimizer = (loaded.common, loaded.rows, loaded.placement, loaded.local,
                                                       loaded.dense_optimizer)  # fmt: skip
    experts = expert_weight_names(model)
    params = dict(model.named_parameters(remove_duplicate=False))

    # 2. optimizer: state by parameter name; expert state rows stacked in local order
    names = param_names(model, optimizer)
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
        elif name in dense_optimizer:
            opt_state[i] = dense_optimizer[name]
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
    rows = ExpertRows(ckpt, manifest)
    state, _ = read_non_expert(Path(ckpt), manifest, load_file(Path(ckpt) / COMMON), {})
    for y, prefix in enumerate(manifest["moe_layers"]):
        for w in manifest["expert_weights"]:
            state[f"{prefix}.experts.{w}"] = rows.stacked(y, list(range(manifest["num_experts"])), w)
    return state
