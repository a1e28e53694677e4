"""Initial values that do not depend on where a tensor lives, for models built on the `meta` device.

A training run builds its model on `meta` (no storage), lets parallelism cut it to this rank's
part, and only then materialises what the rank holds (epmoe/parallel/materialize.py). For every
rank to hold what a one-process run holds, each tensor's initial value is a pure function of
(seed, its name, and for a stacked expert weight the global expert id of the row): it is drawn
from its own generator, not from one global stream whose position depends on what was built
before. The one-process run is built and materialised the same way, so EP/FSDP ≡ one process holds.

What each tensor's initial distribution is stays written where it was, in the modules' own
constructors (`nn.init.normal_(..., std=...)`, RMSNorm's ones, nn.Linear's kaiming-uniform):
`build_on_meta` records the last initialising op applied to each tensor while the model is
built (a TorchDispatchMode sees every ATen op, nested ones too) and replays it, per tensor,
with that tensor's generator. A tensor with no recorded op is an error, never a guess.

Shape key: E experts, L local expert rows.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from epmoe.config import ModelConfig, RouterConfig
from epmoe.model.moe import expert_weight_names
from epmoe.model.transformer import Transformer

# in-place ops that set a tensor's values, and factories that make one with set values
_IN_PLACE = {"normal_", "uniform_", "fill_", "zero_"}
_FACTORIES = {"zeros": ("fill_", (0.0,)), "ones": ("fill_", (1.0,))}
_ALIASES = {"detach", "alias"}  # the same values under another tensor object


@dataclass(frozen=True)
class Rule:
    """How a tensor's values were set: `op` ("normal_", "uniform_", "fill_", "zero_") and its arguments."""

    op: str
    args: tuple

    def draw(self, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype)
        if self.op == "normal_":
            return t.normal_(*self.args, generator=generator)
        if self.op == "uniform_":
            return t.uniform_(*self.args, generator=generator)
        return t.fill_(*self.args) if self.op == "fill_" else t.zero_()


class _Recorder(TorchDispatchMode):
    """Records the last initialising op of every tensor made or set while active."""

    def __init__(self) -> None:
        super().__init__()
        # id -> (the tensor, kept alive so that no other object takes its id; its rule)
        self.rules: dict[int, tuple[torch.Tensor, Rule]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _IN_PLACE:
            self.rules[id(args[0])] = (args[0], Rule(name, tuple(args[1:])))
        elif name in _FACTORIES:
            self.rules[id(out)] = (out, Rule(*_FACTORIES[name]))
        elif name in _ALIASES and id(args[0]) in self.rules:
            self.rules[id(out)] = (out, self.rules[id(args[0])][1])
        return out


@dataclass
class InitPlan:
    """{name: Rule} of every parameter and buffer of a model built by `build_on_meta`."""

    rules: dict[str, Rule]
    seed: int

    def value(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, expert_ids_L: list[int] | None = None):
        """The initial value of tensor `name` (whole, on the CPU). expert_ids_L: for a stacked expert
        weight, the global expert id of each of its rows (each row is drawn from its expert's own
        generator, so only the rows a rank holds are drawn)."""
        rule = self.rules[name]
        if expert_ids_L is None:
            return rule.draw(shape, dtype, _generator(self.seed, name))
        rows = [rule.draw(shape[1:], dtype, _generator(self.seed, f"{name}[{e}]")) for e in expert_ids_L]
        return torch.stack(rows) if rows else torch.empty(shape, dtype=dtype)


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


def build_on_meta(model_cfg: ModelConfig, router_cfg: RouterConfig, seed: int) -> tuple[nn.Module, InitPlan]:
    """The model on the `meta` device (no storage) and the plan to initialise it with `seed`."""
    recorder = _Recorder()
    with torch.device("meta"), recorder:
        model = Transformer(model_cfg, router_cfg)
    rules = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) not in recorder.rules:
            raise RuntimeError(f"{name}: no initialisation recorded while the model was built (epmoe/model/init.py)")
        rules[name] = recorder.rules[id(t)][1]
    return model, InitPlan(rules, seed)


def tied(model: nn.Module) -> dict[str, str]:
    """{parameter name: the first name of the same Parameter} of every slot tied to another (the head
    to the embedding under model.tie_embeddings)."""
    first: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            out[name] = first[id(p)]
    return out


def retie(model: nn.Module, ties: dict[str, str]) -> None:
    """Point each tied slot of `ties` (from `tied`) at its first name's Parameter again."""
    for name, first in ties.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(first))


def to_empty(model: nn.Module, device: torch.device) -> None:
    """`model.to_empty(device=device)` with tied parameters kept tied (the embedding and the head).
    NOTE: nn.Module.to_empty gives each module's slot its own new Parameter, untying them (FSDP2's
    modules keep theirs); an untied copy would train as a second weight."""
    ties = tied(model)
    model.to_empty(device=device)
    retie(model, ties)


def load_assigned(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`model.load_state_dict(state, strict=True, assign=True)` (the tensors themselves become the
    parameters: no second copy) with tied parameters kept tied, as `to_empty` keeps them."""
    ties = tied(model)
    model.load_state_dict(state, strict=True, assign=True)
    retie(model, ties)


@torch.no_grad()
def initialise(model: nn.Module, plan: InitPlan, device: torch.device) -> None:
    """Materialise a one-device model built by `build_on_meta` (every expert, in order) on `device`."""
    to_empty(model, device)
    experts = expert_weight_names(model)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        ids = list(range(t.shape[0])) if name in experts else None
        t.copy_(plan.value(name, tuple(t.shape), t.dtype, ids))
