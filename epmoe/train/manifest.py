"""The checkpoint manifest: what it records, its schema, and what a resume compares against it.

`build` makes the manifest a save writes (the layout is in checkpoint_state.py's docstring);
`check` is the schema `checkpoint_files.read_manifest` applies to every manifest it reads, so
that a damaged or edited manifest is one CheckpointError naming the file and its first problem,
never a KeyError later. The names of the files it lists live here too (checkpoint_files
re-exports them), because the schema checks that the files table is complete.

Two fingerprints let a resume notice a changed run: `architecture(cfg)`, the model and router
fields that define the function the weights compute (a resume into another one is refused),
and the data source's `epmoe.train.data.fingerprint` (a resume on other data is warned about).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, fields
from typing import Any

import torch

from epmoe.comm.parallel_dims import ParallelDims
from epmoe.config import Config
from epmoe.model.experts import GroupedExperts
from epmoe.parallel.checkpoint_shards import DENSE_FORMAT, DENSE_METADATA
from epmoe.placement.placement import Placement
from epmoe.train.data import FINGERPRINT_ENDS

FORMAT_VERSION = 3  # 3: schema-checked, with the architecture and the data source's fingerprint
MANIFEST = "manifest.json"
COMMON = "common.pt"


def expert_file(ep_rank: int) -> str:
    return f"experts_rank{ep_rank}.pt"


# The fields that define the architecture: each changes a parameter's shape or the function the
# weights compute (n_heads changes no shape, but splits the same weights into other heads).
ARCHITECTURE = (
    *(f"model.{f}" for f in ("vocab_size", "d_model", "n_layers", "n_heads", "rope_theta", "norm_eps",
                             "num_experts", "moe_every", "first_dense_layers", "dense_hidden", "expert_hidden",
                             "activation", "n_shared_experts", "shared_hidden", "exchange_dim", "tie_embeddings",
                             "n_kv_heads", "head_dim", "qk_norm", "qkv_bias", "out_bias", "rope_interleaved",
                             "attention", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                             "v_head_dim", "shared_gate")),
    *(f"router.{f}" for f in ("top_k", "score_func", "renormalize", "routed_scaling", "n_groups", "topk_groups",
                              "group_score", "capacity_factor", "drop_policy")),
)  # fmt: skip
# Fields added to ARCHITECTURE after format 3 was first written, with the value that computes what
# a checkpoint from before them computed: a manifest without one holds that value.
ADDED_LATER = {
    **{f"model.{f}": v for f, v in (("n_kv_heads", 0), ("head_dim", 0), ("qk_norm", "none"), ("qkv_bias", False),
                                    ("out_bias", False), ("rope_interleaved", True), ("attention", "standard"),
                                    ("q_lora_rank", 0), ("kv_lora_rank", 0), ("qk_nope_head_dim", 0),
                                    ("qk_rope_head_dim", 0), ("v_head_dim", 0), ("shared_gate", False))},
    "router.group_score": "top2_sum",
}  # fmt: skip
# Every other model and router field, and why a resume may change it.
NOT_ARCHITECTURE = {
    "model.max_seq_len": "bounds the input length only (a non-persistent RoPE table): on every sequence both "
    "lengths accept the function is the same, so a resume may extend the context",
    "model.expert_impl": "an implementation (loop, grouped) of the same expert function",
    "model.family": "which Hugging Face family an export writes; the function is the other fields'",
    "router.aux_loss": "a training loss: changes the gradients, not the function",
    "router.aux_loss_coef": "a training loss coefficient",
    "router.z_loss_coef": "a training loss coefficient",
    "router.bias_update_rate": "how fast training moves the balancing biases; the biases themselves are saved",
}
# (tests/test_checkpoint_manifest.py checks that the two name every field of ModelConfig and RouterConfig)


class ManifestError(ValueError):
    """A manifest that fails the schema; the message names its first problem (read_manifest adds the file)."""


def architecture(cfg: Config) -> dict[str, Any]:
    """{"model.n_heads": 4, ...}: the ARCHITECTURE fields' values, as the manifest's JSON holds them."""
    sections = {"model": asdict(cfg.model), "router": asdict(cfg.router)}
    values = {key: sections[key.split(".")[0]][key.split(".")[1]] for key in ARCHITECTURE}
    return json.loads(json.dumps(values))  # Choice members become their strings, as in the file


def architecture_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """["model.n_heads 4 (saved) vs 2 (now)", ...] in ARCHITECTURE order; empty when they agree."""
    saved = {**ADDED_LATER, **saved}
    return [f"{k} {saved.get(k)} (saved) vs {now[k]} (now)" for k in ARCHITECTURE if saved.get(k) != now[k]]


def _names(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _tokenizer(source: dict) -> str:
    """A fingerprint's tokenizer in words; absent = bytes (also in manifests from before tokenizers)."""
    t = source.get("tokenizer")
    return "bytes" if t is None else f"{t['path']} (sha256 {t['sha256'][:12]})"


def data_source_changes(saved: dict, now: dict) -> list[str]:
    """What differs between two `data.fingerprint`s: kind, path, tokenizer, files added / removed /
    changed.

    A file changed if its size or its hashed ends differ, or its mtime where the hash does not
    cover the whole file (a copy of a small file with a new mtime is the same data)."""
    out = [f"data.{k} {saved[k]} (saved) -> {now[k]} (now)" for k in ("kind", "path") if saved[k] != now[k]]
    if (was := _tokenizer(saved)) != (is_ := _tokenizer(now)):
        out.append(f"data.tokenizer {was} (saved) -> {is_} (now)")
    old, new = saved["files"], now["files"]

    def changed(a: dict, b: dict) -> bool:
        partial = a["bytes"] > 2 * FINGERPRINT_ENDS
        return (a["bytes"], a["sha256_ends"]) != (b["bytes"], b["sha256_ends"]) or (
            partial and a["mtime_ns"] != b["mtime_ns"]
        )

    for what, names in (
        ("added", sorted(new.keys() - old.keys())),
        ("removed", sorted(old.keys() - new.keys())),
        ("changed", sorted(k for k in old.keys() & new.keys() if changed(old[k], new[k]))),
    ):
        if names:
            out.append(f"files {what}: {_names(names)}")
    return out


def build(
    step: int,
    cfg: Config,
    dims: ParallelDims,
    moe_layers: list[str],
    expert_weights: list[str],
    placement: Placement | None,
    files: dict[str, dict],
    data_source: dict,
    dense: str | None = None,
) -> dict:
    """The manifest of a checkpoint of `step`; `files` is {name: {"sha256", "bytes"}} of every file.
    dense: the folder of the non-expert state's torch.distributed.checkpoint files (FSDP2), whose
    files `files` lists as "<folder>/<file>"; None: that state is in common.pt."""
    t = cfg.train
    record = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "world": dims.world,
        "ep": dims.ep,
        "dp": dims.dp,
        "num_experts": dims.num_experts,
        "moe_layers": moe_layers,
        "expert_weights": expert_weights,
        "placement": None
        if placement is None
        else {
            "expert_of_slot_YS": placement.expert_of_slot_YS.tolist(),
            "ep": placement.ep,
            "slots_per_rank": placement.slots_per_rank,
            "origin": placement.origin,
        },
        "expert_files": [expert_file(r) for r in range(dims.ep)] if placement is not None else [],
        # the data stream is a pure function of (seed, micro, step, global batch): see sample_batch
        "data": {
            "next_step": step,
            "seed": t.seed,
            "global_batch": t.batch_size * dims.world,
            "grad_accum": t.grad_accum,
            "source": data_source,
        },
        "files": files,
        "architecture": architecture(cfg),
        "config": asdict(cfg),
        "torch": torch.__version__,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if dense is not None:  # absent in checkpoints saved without FSDP (and before it)
        record["dense"] = {"format": DENSE_FORMAT, "folder": dense}
    return record


# -- the schema ------------------------------------------------------------------------------------

_SHA256 = re.compile(r"[0-9a-f]{64}")
_TYPE_NAMES = {int: "an int", str: "a string", list: "a list", dict: "an object", bool: "a bool"}


def _field(obj: dict, key: str, kind: type | tuple, where: str = "", least: int | None = None) -> Any:
    """obj[key], which must exist and be of `kind` (a bool is not an int) and, for ints, >= least."""
    name = f"{where}{key}"
    if key not in obj:
        raise ManifestError(f"key '{name}' is missing")
    value, kinds = obj[key], kind if isinstance(kind, tuple) else (kind,)
    is_int_as_bool = isinstance(value, bool) and bool not in kinds
    if not isinstance(value, kinds) or is_int_as_bool:
        wanted = " or ".join(_TYPE_NAMES.get(k, "null") for k in kinds)
        raise ManifestError(f"'{name}' must be {wanted}, not {json.dumps(value)[:60]}")
    if least is not None and value < least:
        raise ManifestError(f"'{name}' must be >= {least}, not {value}")
    return value


def _str_list(obj: dict, key: str) -> list[str]:
    value = _field(obj, key, list)
    if not all(isinstance(v, str) for v in value) or len(set(value)) != len(value):
        raise ManifestError(f"'{key}' must be a list of distinct strings, not {json.dumps(value)[:60]}")
    return value


def _check_placement(m: dict, layers: list[str], ep: int, num_experts: int) -> None:
    """One row per MoE layer, ep x slots_per_rank expert ids in [0, num_experts), every expert present."""
    p = _field(m, "placement", dict)
    if _field(p, "ep", int, "placement.") != ep:
        raise ManifestError(f"'placement.ep' ({p['ep']}) differs from 'ep' ({ep})")
    slots = ep * _field(p, "slots_per_rank", int, "placement.", least=1)
    _field(p, "origin", str, "placement.")
    rows = _field(p, "expert_of_slot_YS", list, "placement.")
    if len(rows) != len(layers):
        raise ManifestError(f"'placement.expert_of_slot_YS' has {len(rows)} rows for {len(layers)} MoE layers")
    for y, row in enumerate(rows):
        where = f"'placement.expert_of_slot_YS' row {y}"
        if not isinstance(row, list) or len(row) != slots:
            raise ManifestError(f"{where} must list {slots} expert ids (ep {ep} x slots_per_rank), not {row}")
        if not all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e < num_experts for e in row):
            raise ManifestError(f"{where} holds ids outside [0, {num_experts}): {row}")
        if missing := sorted(set(range(num_experts)) - set(row)):
            raise ManifestError(f"{where} places no slot for experts {missing}")


def _dense_files(m: dict, files: dict) -> list[str]:
    """The files of the manifest's DCP folder (none without one); the folder must hold its metadata."""
    if "dense" not in m:
        return []
    dense = _field(m, "dense", dict)
    if (kind := _field(dense, "format", str, "dense.")) != DENSE_FORMAT:
        raise ManifestError(f"'dense.format' must be {DENSE_FORMAT!r}, not {kind!r}")
    folder = _field(dense, "folder", str, "dense.")
    if f"{folder}/{DENSE_METADATA}" not in files:
        raise ManifestError(f"'files' lacks {folder}/{DENSE_METADATA}")
    return [f for f in files if f.startswith(f"{folder}/")]


def _check_files(m: dict, expert_files: list[str]) -> None:
    files = _field(m, "files", dict)
    expected = [COMMON, *expert_files, *_dense_files(m, files)]
    if missing := [f for f in expected if f not in files]:
        raise ManifestError(f"'files' lacks {', '.join(missing)}")
    if extra := sorted(set(files) - set(expected)):
        raise ManifestError(f"'files' lists {', '.join(extra)}, which is not a file of this checkpoint")
    for name in expected:
        meta = _field(files, name, dict, "files.")
        sha = _field(meta, "sha256", str, f"files.{name}.")
        if not _SHA256.fullmatch(sha):
            raise ManifestError(f"'files.{name}.sha256' is not 64 hex digits: {sha[:70]}")
        _field(meta, "bytes", int, f"files.{name}.", least=0)


def _check_data(m: dict, step: int) -> None:
    data = _field(m, "data", dict)
    if (next_step := _field(data, "next_step", int, "data.")) != step:
        raise ManifestError(f"'data.next_step' ({next_step}) differs from 'step' ({step})")
    _field(data, "seed", int, "data.")
    _field(data, "global_batch", int, "data.", least=1)
    _field(data, "grad_accum", int, "data.", least=1)
    source = _field(data, "source", dict, "data.")
    _field(source, "kind", str, "data.source.")
    _field(source, "path", str, "data.source.")
    for name, meta in _field(source, "files", dict, "data.source.").items():
        where = f"data.source.files.{name}."
        if not isinstance(meta, dict):
            raise ManifestError(f"'{where[:-1]}' must be an object, not {json.dumps(meta)[:60]}")
        for key in ("bytes", "mtime_ns"):
            _field(meta, key, int, where, least=0)
        if not _SHA256.fullmatch(_field(meta, "sha256_ends", str, where)):
            raise ManifestError(f"'{where}sha256_ends' is not 64 hex digits")


def _check_architecture(m: dict) -> None:
    """Every ARCHITECTURE field, each a JSON scalar that agrees with the recorded config."""
    arch, config = _field(m, "architecture", dict), _field(m, "config", dict)
    for section in (f.name for f in fields(Config)):
        _field(config, section, dict, "config.")
    for key in ARCHITECTURE:
        section, name = key.split(".")
        if key in ADDED_LATER and key not in arch and name not in config[section]:
            continue  # written before the field existed (its config lacks it too): it held ADDED_LATER's value
        value = _field(arch, key, (int, float, str, bool, type(None)), "architecture.")
        if name not in config[section] or config[section][name] != value:
            raise ManifestError(f"'architecture.{key}' ({value}) differs from 'config.{key}'")


def check(m: Any, dir_step: int | None) -> None:
    """Raise ManifestError naming the first key that is missing, of the wrong type or shape, or
    inconsistent. dir_step: the N of the directory step_<N> (None: not so named)."""
    if not isinstance(m, dict):
        raise ManifestError(f"the manifest must be a JSON object, not {type(m).__name__}")
    step = _field(m, "step", int, least=0)
    if dir_step is not None and step != dir_step:
        raise ManifestError(f"'step' ({step}) differs from the directory's step ({dir_step})")
    ep = _field(m, "ep", int, least=1)
    _field(m, "world", int, least=1)
    _field(m, "dp", int, least=1)
    num_experts = _field(m, "num_experts", int, least=0)
    layers = _str_list(m, "moe_layers")
    if unknown := sorted(set(_str_list(m, "expert_weights")) - set(GroupedExperts.WEIGHT_NAMES)):
        raise ManifestError(f"'expert_weights' holds {unknown}, not weights of {GroupedExperts.WEIGHT_NAMES}")
    expert_files = _str_list(m, "expert_files")
    if layers:
        _check_placement(m, layers, ep, num_experts)
        expected = [expert_file(r) for r in range(ep)]
    else:  # a dense model: no experts, no placement
        if _field(m, "placement", type(None)) is not None:
            raise ManifestError("'placement' must be null without MoE layers")
        expected = []
    if expert_files != expected:
        raise ManifestError(f"'expert_files' must be {expected} (one per EP rank), not {expert_files}")
    _check_files(m, expert_files)
    _check_data(m, step)
    _check_architecture(m)
    _field(m, "torch", str)
    _field(m, "saved_at", str)
