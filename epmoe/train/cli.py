"""Hydra at the edge: compose `conf/` into a validated `Config`, with one-line errors.

`load_config(overrides)` is the one way the command line, the tests and the benchmarks turn
override strings into a `Config`: Hydra composes and type-checks (unknown keys, wrong
types), `OmegaConf.to_object` builds the dataclasses, `validate` checks the values.
"""

from __future__ import annotations

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from epmoe.config import Config, ConfigError, register_configs, validate

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
        if line not in parts:
            parts.append(line)
        e = e.__cause__ or e.__context__
    return ": ".join(parts)


def to_config(cfg: DictConfig) -> Config:
    """Composed DictConfig -> validated Config dataclass (raises ConfigError)."""
    try:
        obj = OmegaConf.to_object(cfg)
    except Exception as e:  # missing mandatory values (???) and late type errors
        raise ConfigError(one_line(e)) from None
    if not isinstance(obj, Config):
        raise ConfigError(
            f"the composed config is a {type(obj).__name__}, not epmoe's Config; is base_config first in defaults?"
        )
    return validate(obj)


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Compose conf/config.yaml with command-line style overrides into a validated Config."""
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            composed = compose(config_name=CONFIG_NAME, overrides=list(overrides))
    except Exception as e:
        raise ConfigError(one_line(e)) from None
    return to_config(composed)
