"""Hydra at the edge: compose `conf/` into a validated `Config`, with one-line errors.

`load_config(overrides)` is the one way the command line, the tests and the benchmarks turn
override strings into a `Config`: Hydra composes and type-checks (unknown keys, wrong
types, a value outside a Choice field's Enum), `OmegaConf.to_object` builds the dataclasses,
`validate` checks the values.

NOTE: Hydra's `+key=value` and `++key=value` add a key with OmegaConf's `force_add`, which
bypasses struct mode and the structured schema: `+train.foo=1` composes, and `to_object`
even sets `foo` on the TrainConfig. `to_config` therefore refuses every composed key that is
not a dataclass field before building anything. (`+key` on a key that exists stays Hydra's
error; `++key=value` on one that exists overrides it, as Hydra documents.)

`train.resume=<checkpoint or run dir>` resumes with the config the checkpoint was saved with:
`with_checkpoint_config` puts what this command line sets (every key it names, and every value
its groups change from the defaults) on top of the saved config, so `train.resume=<dir>` alone
continues the run as it was, and `train.resume=<dir> train.steps=600` trains it further.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from epmoe.config import Config, ConfigError, bad_choice, choice_type, field_types, register_configs
from epmoe.train import checkpoint_files
from epmoe.train.init_from import starting_point
from epmoe.validate import validate

CONFIG_MODULE = "epmoe.conf"
CONFIG_NAME = "config"


def one_line(e: BaseException) -> str:
    """The first line of an error and of its causes, joined: Hydra's errors span several lines."""
    parts = []
    while e is not None and len(parts) < 3:
        text = str(e).strip()
        lines = text.splitlines()
        line = lines[0].rstrip(".") if text else type(e).__name__
        if "Available options" in text:  # a missing group option: name the ones that exist
            start = next(i for i, x in enumerate(lines) if "Available options" in x) + 1
            options = []
            for x in lines[start:]:
                if not x.startswith("\t"):  # the indented list ends at the first other line
                    break
                options.append(x.strip())
            line += f" (options: {', '.join(options)})"
        if "Either remove + prefix" in text:  # `+key=value` on a key that exists: Hydra's fix follows
            line += f" ({'; '.join(x.strip() for x in lines[1:] if x.strip())})"
        if line not in parts and not (parts and "$VALUE" in line):  # OmegaConf's unformatted template
            parts.append(line)
        e = e.__cause__ or e.__context__
    return ": ".join(parts)


def config_error(e: BaseException) -> ConfigError:
    """Hydra's or OmegaConf's error as one line; a value outside a Choice field's Enum reads as
    validate's own: "comm.dispatcher='tutel' is not one of alltoall, pipelined"."""
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, ValidationError) and cause.full_key:
            choices = choice_type(cause.full_key)
            if choices is not None:
                return bad_choice(cause.full_key, cause.value, [c.value for c in choices])
        cause = cause.__cause__ or cause.__context__
    return ConfigError(one_line(e))


def _refuse_unknown_keys(tree: dict, schema: type, prefix: str = "") -> None:
    """Raise ConfigError naming the first key of `tree` that is not a field of `schema` (nested)."""
    fields = field_types(schema)
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if key not in fields:
            close = [prefix + c for c in difflib.get_close_matches(str(key), list(fields), n=3)]
            fix = f"did you mean {' or '.join(close)}?" if close else f"its keys: {', '.join(fields)}"
            where = f"{prefix.rstrip('.')} ({schema.__name__})" if prefix else "the config"
            raise ConfigError(f"unknown config key {name}: not a field of {where}; {fix}")
        if dataclasses.is_dataclass(fields[key]) and isinstance(value, dict):
            _refuse_unknown_keys(value, fields[key], f"{name}.")


def to_config(cfg: DictConfig) -> Config:
    """Composed DictConfig -> validated Config dataclass (raises ConfigError)."""
    _refuse_unknown_keys(OmegaConf.to_container(cfg, resolve=False), Config)
    try:
        obj = OmegaConf.to_object(cfg)
    except Exception as e:  # missing mandatory values (???) and late type errors
        raise config_error(e) from None
    if not isinstance(obj, Config):
        raise ConfigError(
            f"the composed config is a {type(obj).__name__}, not epmoe's Config; is base_config first in defaults?"
        )
    return validate(obj)


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a nested dict's leaves (a list is a leaf)."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}{key}."))
    return out


def with_checkpoint_config(composed: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Under train.resume: the checkpoint's saved config with what `overrides` set on top (see the
    module docstring). Under train.init_from (and no resume): what the starting point fixes (a
    Hugging Face folder's model, router and tokenizer; a checkpoint's model, router and data:
    epmoe/train/init_from.py) with what `overrides` set on top. Else `composed` unchanged. Raises
    CheckpointError if there is no checkpoint, HFError if the folder cannot be imported."""
    resume = OmegaConf.select(composed, "train.resume")
    init_from = OmegaConf.select(composed, "train.init_from")
    if resume:
        saved = checkpoint_files.readable(Path(resume))[1]["config"]
        try:
            base = OmegaConf.merge(OmegaConf.structured(Config), saved)
        except Exception as e:  # a checkpoint of an older schema
            raise ConfigError(f"the config saved in {resume} does not fit this version's: {config_error(e)}") from None
    elif init_from:
        base = OmegaConf.structured(starting_point(Path(init_from)).config())
    else:
        return composed
    now = _leaves(OmegaConf.to_container(composed, enum_to_str=True))
    defaults = _leaves(OmegaConf.to_container(OmegaConf.structured(Config), enum_to_str=True))
    named = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    if not resume:  # the folder's base is epmoe's defaults but for model, router, data.tokenizer and
        # data.seq_len: a group chosen (`data=text`) counts with the values it changes, not all its keys
        named = {key for key in named if "." in key}
    explicit = {k for k in now if now[k] != defaults.get(k) or any(k == n or k.startswith(f"{n}.") for n in named)}
    for key in sorted(explicit):
        OmegaConf.update(base, key, OmegaConf.select(composed, key), merge=False)
    return base


# config keys that hold a path: `~` and $VARS in their values are expanded (a shell does not
# expand `key=~/x`, and Hydra's grammar reads `~` as its delete operator)
PATH_KEYS = ("data.path", "data.tokenizer", "train.resume", "train.init_from", "launcher.hostfile", "hydra.run.dir",
             "hydra.sweep.dir")  # fmt: skip


def expand_path(value: str) -> str:
    """`~` and `$VAR` expanded, as a shell would (`${...}` in an override stays OmegaConf's interpolation)."""
    return os.path.expandvars(os.path.expanduser(value))


def hydra_quoted(text: str) -> str:
    """`text` as one single-quoted value of Hydra's override grammar (a path or tag holding `=`,
    `,`, `/` or a quote stays one string)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def expand_path_overrides(overrides: Sequence[str]) -> list[str]:
    """`data.path=~/books` -> `data.path='/home/me/books'` (quoted for Hydra's parser)."""
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq and key.lstrip("+") in PATH_KEYS and (value.startswith("~") or "$" in value) and "${" not in value:
            o = key + "=" + hydra_quoted(expand_path(value.strip("'\"")))
        out.append(o)
    return out


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Compose conf/config.yaml with command-line style overrides into a validated Config (under
    train.resume, on top of the checkpoint's config). Path values expand `~` and $VARS."""
    overrides = expand_path_overrides(overrides)
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            composed = compose(config_name=CONFIG_NAME, overrides=list(overrides))
    except Exception as e:
        raise config_error(e) from None
    _refuse_unknown_keys(OmegaConf.to_container(composed, resolve=False), Config)
    return resolve_config(composed, overrides)


def resolve_config(composed: DictConfig, overrides: Sequence[str]) -> Config:
    """`to_config` of the composed config, or under train.resume of `with_checkpoint_config`'s:
    an error then says where the values it did not name came from."""
    try:
        return to_config(with_checkpoint_config(composed, overrides))
    except ConfigError as e:
        if not OmegaConf.select(composed, "train.resume"):
            raise
        raise ConfigError(f"{e} (under train.resume, what the command line does not set comes from the "
                          "checkpoint's config)") from None  # fmt: skip
