"""What each file of a checkpoint holds (the layout is checkpoint_state.py's docstring), taken
from this rank's model and optimizer, and read back: the expert rows by global id, the
non-expert state from common.pt or (FSDP2) from DCP's files. checkpoint_state.py runs the
save and restore protocol around these.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from epmoe.model.moe import expert_weight_names, named_moe_layers
from epmoe.parallel.checkpoint_shards import NO_SHARDS, Shards, model_key, optim_key, split_key
from epmoe.placement.placement import Placement, RoutingStats
from epmoe.train.checkpoint_files import CheckpointError, load_file


def identity_placement(num_layers: int, num_experts: int) -> Placement | None:
    """Every expert local (one process, or ep 1): slot e holds expert e."""
    if num_layers == 0:
        return None
    return Placement(torch.arange(num_experts).repeat(num_layers, 1), 1, num_experts, "contiguous")


def experts_file_state(
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


def own_storage(t: torch.Tensor) -> torch.Tensor:
    """t, copied where it is a view into a larger storage (torch.save writes whole storages;
    DeepSpeed's ZeRO keeps the parameters in flat buffers that hold the experts too)."""
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each of the optimizer's parameters, in its order."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def common_file_state(model, optimizer, scheduler, routing_window: RoutingStats | None, with_dense: bool) -> dict:
    """Rank 0's common.pt; the optimizer's state is keyed by parameter name, not position.
    with_dense: it holds the non-expert model and optimizer state too (without FSDP; with it they
    are `dense_state`, written by every rank)."""
    experts = expert_weight_names(model)
    names = param_names(model, optimizer)
    opt = optimizer.state_dict()
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
        for g in opt["param_groups"]
    ]
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    state = {"optimizer": {"param_groups": groups}, "scheduler": scheduler.state_dict(), "rng": rng}
    if with_dense:
        state["model"] = {k: own_storage(v) for k, v in model.state_dict().items() if k not in experts}
        state["optimizer"]["state"] = {names[i]: s for i, s in opt["state"].items() if names[i] not in experts}
    if routing_window is not None:
        state["routing_window"] = {"load_YE": routing_window.load_YE, "cooc_YEE": routing_window.cooc_YEE}
    return state


def dense_shard_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """This rank's shards of the non-expert model and optimizer state, by flat DCP key
    (epmoe/parallel/checkpoint_shards.py)."""
    experts = expert_weight_names(model)
    out = {model_key(k): v for k, v in model.state_dict().items() if k not in experts}
    for name, param in model.named_parameters():
        if name not in experts:
            out.update({optim_key(name, k): v for k, v in optimizer.state.get(param, {}).items()})
    return out


class ExpertRows:
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


def read_non_expert(
    ckpt: Path, manifest: dict, common: dict, like: dict, shards: Shards = NO_SHARDS
) -> tuple[dict, dict]:
    """(non-expert model state {name: tensor}, its optimizer state {param name: {key: value}}):
    from common.pt, or (saved under FSDP2) from the DCP folder, there cut as this run's `like`
    {name: tensor} shards each tensor (a collective under FSDP2) or read whole (without it)."""
    if "dense" not in manifest:
        return dict(common["model"]), common["optimizer"]["state"]
    flat = shards.load_dense(ckpt / manifest["dense"]["folder"], like)
    model_state, optimizer_state = {}, {}
    for key, t in flat.items():
        kind, name, *state_key = split_key(key)
        if kind == "model":
            model_state[name] = t
        else:
            optimizer_state.setdefault(name, {})[state_key[0]] = t
    return model_state, optimizer_state
