"""Hugging Face folders in and out: `from_pretrained`, `load_weights` (into a model that may
hold only some experts), `load_parallel` (a rank's shards under expert parallelism),
`save_pretrained`.

Reading goes through `safetensors.safe_open` slices: a rank under expert parallelism reads the
non-expert tensors and its own experts' rows, never the rest (`SafetensorsFolder.bytes_read`
counts what was read, and a test asserts it). Writing goes to a temporary folder renamed at
the end, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from epmoe.config import Config, ConfigError, DataConfig
from epmoe.hf.families import Adapter, family_of
from epmoe.hf.links import HFError, Link, check_complete, their_shape
from epmoe.model.init import to_empty
from epmoe.model.transformer import Transformer
from epmoe.parallel.materialize import is_sharded, set_full
from epmoe.parallel.parallelize import Parallel, allocate_parallel
from epmoe.validate import validate_model

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 << 30  # transformers' customary 5 GB shards


def read_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise HFError(f"{hf_dir} has no config.json; pass a Hugging Face model folder")
    return json.loads(path.read_text())


class SafetensorsFolder:
    """The tensors of a model folder (one model.safetensors, or shards with their index), read lazily."""

    def __init__(self, hf_dir: Path):
        hf_dir = Path(hf_dir)
        if (hf_dir / INDEX).is_file():
            weight_map = json.loads((hf_dir / INDEX).read_text())["weight_map"]
        elif (hf_dir / SINGLE).is_file():
            with safe_open(hf_dir / SINGLE, framework="pt") as f:
                weight_map = {name: SINGLE for name in f.keys()}
        else:
            raise HFError(f"{hf_dir} holds neither {SINGLE} nor {INDEX} (only safetensors weights are read)")
        self.dir, self.file_of = hf_dir, weight_map
        self.bytes_read = 0

    def _path(self, name: str) -> Path:
        path = self.dir / self.file_of[name]
        if not path.is_file():
            raise HFError(f"{path} (holding {name}, says {INDEX}) does not exist")
        return path

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for path in sorted({self._path(name) for name in self.file_of}):
            with safe_open(path, framework="pt") as f:
                mine = [name for name in f.keys() if self.file_of.get(name) == path.name]
                out.update({name: tuple(f.get_slice(name).get_shape()) for name in mine})
        return out

    def read(self, name: str, expert: int | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor `name`, or its row `expert`, or rows [a, b) of that: only those bytes are read."""
        # NOTE: the file is opened for this read only: an open file keeps mapped every page read
        # through it, which counts in the resident set (twice the weights at the end of a load)
        with safe_open(self._path(name), framework="pt") as f:
            piece = f.get_slice(name)
            if expert is not None:
                t = piece[expert : expert + 1, rows[0] : rows[1]] if rows else piece[expert : expert + 1]
                t = t[0]
            else:
                t = piece[rows[0] : rows[1]] if rows else piece[:]
        self.bytes_read += t.numel() * t.element_size()
        return t


def config_from_hf(hf_dir: Path) -> Config:
    """The epmoe Config of a Hugging Face folder: architecture from config.json, the folder's
    tokenizer for text data; everything else epmoe's defaults."""
    hf = read_config(hf_dir)
    model, router = family_of(hf, str(hf_dir)).to_config(hf)
    tokenizer = str(hf_dir) if (Path(hf_dir) / "tokenizer.json").is_file() else None
    cfg = Config(model=model, router=router, data=DataConfig(tokenizer=tokenizer, seq_len=min(256, model.max_seq_len)))
    try:
        validate_model(cfg.model, cfg.router)
    except ConfigError as e:
        raise HFError(f"{hf_dir}: {e}") from None
    return cfg


def full_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry's shape of the single-device model (built on meta: no memory)."""
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.router)
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items() if not _tied_head(cfg, k)}


def _tied_head(cfg: Config, key: str) -> bool:
    return cfg.model.tie_embeddings and key == "head.weight"


def _stacked_layers(adapter: Adapter, cfg: Config, names: Iterable[str]) -> set[int]:
    names = set(names)
    return {i for i in range(cfg.model.n_layers) if f"model.layers.{i}.mlp.experts.gate_up_proj" in names}


def plan(hf_dir: Path, cfg: Config) -> tuple[SafetensorsFolder, list[Link], dict[str, str]]:
    """The folder, its links and its ignored tensors, checked complete before any tensor is read."""
    adapter = family_of(read_config(hf_dir), str(hf_dir))
    folder = SafetensorsFolder(hf_dir)
    shapes = folder.shapes()
    links = adapter.links(cfg.model, _stacked_layers(adapter, cfg, shapes))
    ignored = adapter.ignored(list(shapes), cfg.model)
    ours = full_shapes(cfg)
    if not adapter.score_bias:  # the balancing bias starts at zero where the family has none
        ours = {k: v for k, v in ours.items() if not k.endswith("expert_bias_E")}
    check_complete(links, shapes, ours, ignored)
    return folder, links, ignored


@torch.no_grad()
def load_weights(
    model: nn.Module, cfg: Config, hf_dir: Path, expert_ids: dict[str, list[int]] | None = None
) -> SafetensorsFolder:
    """Fill `model` (possibly holding only some experts, possibly on `meta`-built storage
    materialised by `to_empty`) from `hf_dir`; returns the folder (its `bytes_read`).

    expert_ids: {"blocks.<i>.ffn": global id of each local expert row} of every MoE layer
    (replicas repeat an id); None = every expert, in order. Buffers without a Hugging Face
    tensor (the balancing bias of families that have none) are zeroed.
    """
    folder, links, _ = plan(hf_dir, cfg)
    state = model.state_dict(keep_vars=True)
    for key, t in state.items():
        if not t.requires_grad and key.endswith("expert_bias_E"):
            t.zero_()
    rows_of: dict[str, dict[int, list[int]]] = {}  # "blocks.i.ffn.experts.w" -> {global id: local rows}
    for link in links:
        if link.expert is None or link.ours in rows_of:
            continue
        layer = link.ours.rsplit(".experts.", 1)[0]
        ids = expert_ids[layer] if expert_ids is not None else range(state[link.ours].shape[0])
        rows_of[link.ours] = {}
        for row, e in enumerate(ids):
            rows_of[link.ours].setdefault(int(e), []).append(row)
    # what this rank reads: another rank's expert is not read
    reads = [(link, rows) for link in links
             if (rows := [None] if link.expert is None else rows_of[link.ours].get(link.expert, []))]  # fmt: skip
    last = {link.ours: i for i, (link, _) in enumerate(reads)}  # after it, a tensor assembled whole is complete
    # a tensor FSDP2 shards is assembled whole on the CPU (one at a time), then cut to this rank's shard
    whole: dict[str, torch.Tensor] = {}
    for i, (link, rows) in enumerate(reads):
        piece = folder.read(link.theirs, link.expert if link.their_expert else None, link.their_rows)
        if link.transpose:
            piece = piece.t()
        target = state[link.ours]
        if is_sharded(target):
            target = whole.setdefault(link.ours, torch.empty(target.shape, dtype=target.dtype))
        for row in rows:
            dest = target if row is None else target[row]
            if link.ours_rows is not None:
                dest = dest[link.ours_rows[0] : link.ours_rows[1]]
            dest.copy_(piece)
        if link.ours in whole and last[link.ours] == i:
            set_full(state[link.ours], whole.pop(link.ours))
    return folder


def load_parallel(cfg: Config, hf_dir: Path, device: torch.device) -> tuple[Transformer, Parallel, SafetensorsFolder]:
    """train.init_from: the model built on `meta`, parallelised (a collective when world > 1),
    then only this rank's shards materialised and read from the files (its own experts, never
    the others'). Returns the model, its Parallel and the folder (its `bytes_read`)."""
    model, par = allocate_parallel(cfg, device)
    return model, par, load_weights(model, cfg, hf_dir, par.local_expert_ids(model))


def from_pretrained(hf_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Config, Transformer]:
    """A single-device epmoe model (fp32) and its Config from a Hugging Face folder."""
    cfg = config_from_hf(Path(hf_dir))
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.router)
    to_empty(model, torch.device(device))
    load_weights(model, cfg, Path(hf_dir))
    return cfg, model


# -- export ------------------------------------------------------------------------------------------


def hf_state(model: nn.Module, cfg: Config) -> dict[str, torch.Tensor]:
    """The Hugging Face tensors of a single-device model (every expert), by walking the links."""
    adapter = family_of({"model_type": str(cfg.model.family)}, "model.family")
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    by_theirs: dict[str, list[Link]] = {}
    for link in adapter.links(cfg.model):
        by_theirs.setdefault(link.theirs, []).append(link)
    out = {}
    for name, group in by_theirs.items():
        t = torch.empty(their_shape(group, shapes), dtype=state[group[0].ours].dtype)
        for link in group:
            src = state[link.ours] if link.expert is None else state[link.ours][link.expert]
            if link.ours_rows is not None:
                src = src[link.ours_rows[0] : link.ours_rows[1]]
            dest = t[link.expert] if link.their_expert else t
            if link.their_rows is not None:
                dest = dest[link.their_rows[0] : link.their_rows[1]]
            dest.copy_(src.t() if link.transpose else src)
        out[name] = t.contiguous()
    return out


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def save_pretrained(model: nn.Module, cfg: Config, hf_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    extra_files: Iterable[Path] = ()) -> Path:  # fmt: skip
    """Write `model` (single-device, every expert) as a Hugging Face folder that
    `transformers.AutoModelForCausalLM.from_pretrained` loads: config.json and safetensors
    (sharded above max_shard_bytes, with the index). extra_files (a tokenizer) are copied in.
    Written to `<hf_dir>.tmp` and renamed: an error leaves no partial folder."""
    hf_dir = Path(hf_dir)
    if str(cfg.model.family) == "epmoe":
        raise HFError("model.family=epmoe has no Hugging Face family to export to (import a family's model first)")
    if hf_dir.exists() and any(hf_dir.iterdir()):
        raise HFError(f"{hf_dir} exists and is not empty; export into a new folder")
    adapter = family_of({"model_type": str(cfg.model.family)}, "model.family")
    tmp = hf_dir.with_name(hf_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shards = _shards(hf_state(model, cfg), max_shard_bytes)
        names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                   for i in range(len(shards))]  # fmt: skip
        for name, shard in zip(names, shards):
            save_file(shard, tmp / name, metadata={"format": "pt"})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": {t: n for n, s in zip(names, shards) for t in s}}  # fmt: skip
            (tmp / INDEX).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(adapter.to_hf_config(cfg.model, cfg.router), indent=2))
        for f in extra_files:
            shutil.copy2(f, tmp / Path(f).name)
        if hf_dir.exists():
            hf_dir.rmdir()
        os.replace(tmp, hf_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return hf_dir
