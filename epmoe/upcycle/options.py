"""What an upcycling run is asked for: the `upcycle.*` options, and the MoE model's Config — the
dense model's own, with the command line's `model.* router.* train.* data.*` overrides on top and
the sizes the method implies (expert_hidden, shared experts, top_k).

The upcycle options are parsed here, never added to the training Config: the output is an
ordinary checkpoint of an ordinary MoE model.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import yaml
from omegaconf import OmegaConf

from epmoe.choices import Family
from epmoe.config import Config, ConfigError
from epmoe.validate import validate

METHODS = ("copy", "granular", "clusters")
# the dense family's MoE sibling in epmoe/hf (same attention, norms and router), so that an
# upcycled Hugging Face model exports back; with shared experts the native family (epmoe)
MOE_FAMILY = {Family.llama: Family.mixtral, Family.qwen3: Family.qwen3_moe}


class UpcycleError(ConfigError):
    """A request upcycling cannot meet (one line, naming the value and the fix)."""


@dataclass
class UpcycleOptions:
    method: str = "copy"  # copy | granular | clusters
    # granular: shards per dense FFN (G); 0 = (dense_hidden - shared_units) / model.expert_hidden
    # where model.expert_hidden is given, else 4
    granularity: int = 0
    shared_units: int = 0  # granular, clusters: the most frequently active units become one shared expert
    calib_tokens: int = 8192  # train-split tokens whose FFN inputs clusters and shared_units read
    eval_tokens: int = 4096  # val-split tokens the deviation from the dense model is measured on
    kmeans_iters: int = 25
    seed: int = 0  # the routers' random rows (copy, granular), the k-means start, the token samples


def _value(text: str) -> Any:
    """An override's value as YAML reads it (Hydra's grammar for plain values)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def split_overrides(overrides: list[str]) -> tuple[UpcycleOptions, dict[str, Any]]:
    """(the upcycle.* options, {dotted key: value} of every other override). Raises UpcycleError."""
    fields = {f.name: f for f in dataclasses.fields(UpcycleOptions)}
    opts, rest = UpcycleOptions(), {}
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or "." not in key or key.startswith(("+", "~")):
            raise UpcycleError(f"override {item!r} is not key=value with a dotted key (model.num_experts=8, "
                               "upcycle.method=granular); config groups (model=...) do not apply to a dense "
                               "source")  # fmt: skip
        if not key.startswith("upcycle."):
            rest[key] = _value(text)
            continue
        name = key.removeprefix("upcycle.")
        if name not in fields:
            raise UpcycleError(
                f"unknown option {key}: upcycle's options are {', '.join('upcycle.' + f for f in fields)}"
            )
        kind = type(getattr(opts, name))
        try:
            setattr(opts, name, kind(text))
        except ValueError:
            raise UpcycleError(f"{key}={text!r} is not a {kind.__name__}") from None
    if opts.method not in METHODS:
        raise UpcycleError(f"upcycle.method={opts.method!r} is not one of {', '.join(METHODS)}")
    for name in ("granularity", "shared_units"):
        if getattr(opts, name) < 0:
            raise UpcycleError(f"upcycle.{name}={getattr(opts, name)} must be >= 0")
    for name in ("calib_tokens", "eval_tokens", "kmeans_iters"):
        if getattr(opts, name) <= 0:
            raise UpcycleError(f"upcycle.{name}={getattr(opts, name)} must be positive")
    return opts, rest


def _merged(dense: Config, values: dict[str, Any]) -> Config:
    """`dense` with `values` set on it, checked against the schema (keys and types)."""
    patch = OmegaConf.create()
    for key, value in values.items():
        OmegaConf.update(patch, key, value)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(dense), patch))
    except Exception as e:  # OmegaConf's own errors: unknown keys, wrong types, bad enum values
        raise UpcycleError(str(e).strip().splitlines()[0]) from None


def target_config(dense: Config, opts: UpcycleOptions, user: dict[str, Any]) -> Config:
    """The MoE model's Config (validated): every FFN layer MoE unless the overrides say otherwise,
    8 experts by default, and the sizes `opts.method` implies. Raises UpcycleError on a size the
    method cannot build (one line, with the fix). Fills in opts.granularity (granular) where it was 0."""
    dense = copy.deepcopy(dense)
    dense.train.resume = None
    defaults = {"model.num_experts": 8, "model.first_dense_layers": 0, "model.moe_every": 1,
                "model.n_shared_experts": 0, "model.exchange_dim": 0}  # fmt: skip
    cfg = _merged(dense, {**defaults, **user})
    m, r, N, H = cfg.model, cfg.router, opts.shared_units, cfg.model.dense_hidden
    E = m.num_experts
    if E <= 0:
        raise UpcycleError(f"model.num_experts={E}: an upcycled model needs experts; set model.num_experts=8")
    if m.exchange_dim:
        raise UpcycleError(f"model.exchange_dim={m.exchange_dim} adds projections the dense model has none of; "
                           "upcycle with model.exchange_dim=0")  # fmt: skip
    if "model.n_shared_experts" in user and m.n_shared_experts != (1 if N else 0):
        raise UpcycleError(f"model.n_shared_experts={m.n_shared_experts}: shared experts are carved out of the "
                           "dense FFN, set upcycle.shared_units=N instead")  # fmt: skip
    if N and opts.method == "copy":
        raise UpcycleError(f"upcycle.shared_units={N} carves units out of the FFN, but copy keeps it whole in "
                           "every expert; use upcycle.method=granular or clusters")  # fmt: skip
    if N >= H:
        raise UpcycleError(
            f"upcycle.shared_units={N} leaves no units of model.dense_hidden ({H}) for the routed experts"
        )
    U = H - N
    what = f"model.dense_hidden ({H})" + (f" - upcycle.shared_units ({N}) = {U}" if N else "")
    if opts.method == "copy":
        F_ = H
    elif opts.method == "granular":
        G = opts.granularity
        if not G:
            G = U // m.expert_hidden if "model.expert_hidden" in user and U % m.expert_hidden == 0 else 4
        if U % G:
            fits = [d for d in range(2, min(U, 64) + 1) if U % d == 0][:6]
            raise UpcycleError(f"upcycle.granularity={G} does not divide {what}; use one of {fits}")
        if E % G:
            raise UpcycleError(f"model.num_experts={E} must be a multiple of upcycle.granularity ({G}): each "
                               f"copy of the FFN is {G} experts; use model.num_experts="
                               f"{max(1, E // G) * G}")  # fmt: skip
        opts.granularity, F_ = G, U // G
        if "router.top_k" not in user:
            r.top_k = G  # one whole copy of the FFN per token: the dense model's active parameters
    else:
        if U % E:
            raise UpcycleError(f"model.num_experts={E} does not divide {what}: clusters partitions the units "
                               "into equal experts; use a divisor")  # fmt: skip
        F_ = U // E
    if "model.expert_hidden" in user and m.expert_hidden != F_:
        raise UpcycleError(f"model.expert_hidden={m.expert_hidden}, but upcycle.method={opts.method} makes experts "
                           f"of {F_} units from {what}; drop model.expert_hidden")  # fmt: skip
    m.expert_hidden = F_
    m.n_shared_experts, m.shared_hidden = (1, N) if N else (0, m.shared_hidden)
    if "model.family" not in user:
        every_layer = m.first_dense_layers == 0 and m.moe_every == 1  # what the MoE siblings can hold
        m.family = MOE_FAMILY.get(m.family, Family.epmoe) if not N and every_layer else Family.epmoe
    return validate(cfg)
