"""Config composition and validation: every group composes, bad input fails with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from epmoe.config import Config, ConfigError
from epmoe.train.cli import load_config

CONF = Path(__file__).resolve().parents[1] / "conf"
NEEDS_PATH = {"text", "jsonl", "bin"}


def _group_options() -> list[tuple[str, str]]:
    return sorted((p.parent.name, p.stem) for p in CONF.glob("*/*.yaml") if p.parent.name != "experiment")


@pytest.mark.parametrize(("group", "option"), _group_options())
def test_every_group_option_composes_and_sets_its_values(group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if group == "data" and option in NEEDS_PATH:
        overrides.append("data.path=/some/file")
    if (group, option) == ("placement", "redundant"):  # replicas need spare slots on several ranks
        overrides.append("parallel.ep=2")
    cfg = load_config(overrides)
    assert isinstance(cfg, Config)
    written = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
    node = getattr(cfg, group)
    for key, value in written.items():
        if key == "defaults" or value == "???":  # inherited or left for the user
            continue
        assert getattr(node, key) == value, f"{group}/{option}.yaml sets {key}={value!r}"


def test_defaults_compose_to_the_documented_run() -> None:
    cfg = load_config()
    assert (cfg.model.num_experts, cfg.router.top_k, cfg.data.kind) == (8, 2, "stdlib")
    assert cfg.router.capacity_factor is None  # dropless by default


def test_overrides_reach_the_dataclasses() -> None:
    cfg = load_config(["router.top_k=4", "train.steps=50", "model=dense_small"])
    assert (cfg.router.top_k, cfg.train.steps, cfg.model.num_experts) == (4, 50, 0)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["router.nonsense=1"], "nonsense"),
        (["model.d_model=wide"], "d_model"),
        (["router.top_k=9"], "router.top_k (9) must be between 1 and model.num_experts (8)"),
        (["router.n_groups=3"], "model.num_experts (8) must be divisible by router.n_groups (3)"),
        (["router.score_func=relu"], "router.score_func='relu' is not one of softmax, sigmoid"),
        (["data.seq_len=512"], "data.seq_len (512) exceeds model.max_seq_len (256)"),
        (["data=text"], "data.path"),
        (["model.n_heads=3"], "model.d_model (256) / model.n_heads (3)"),
        (["parallel.ep=3"], "model.num_experts (8) must be divisible by parallel.ep (3)"),
        (["launcher.name=pdsh"], "launcher.name='pdsh' is not one of local, torchrun, deepspeed, mpirun, slurm"),
        (["launcher=torchrun", "launcher.nnodes=2"], "launcher.nnodes=2 needs launcher.rdzv_endpoint"),
        (["comm.dispatcher=tutel"], "comm.dispatcher='tutel' is not one of alltoall, pipelined"),
        (["comm.chunks=0"], "comm.chunks (0) must be a positive integer or auto"),
        (["comm.chunks=auto"], "comm.chunks=auto tunes the pipelined dispatcher: add comm.dispatcher=pipelined"),
        (["comm.dtype=fp8"], "comm.dtype='fp8' is not one of fp32, bf16"),
        (["model=huge"], "Could not find 'model/huge' (options: dense_small, moe_small)"),
        (["model.rope_theta=0"], "model.rope_theta (0.0) must be > 0 and finite"),
        (["model.norm_eps=-1e-5"], "model.norm_eps (-1e-05) must be > 0 and finite"),
        (["model.num_experts=-2"], "model.num_experts (-2) must be >= 0 (0 = a dense model)"),
        (["model.first_dense_layers=4"], "model.first_dense_layers (4) leaves no MoE layer among model.n_layers (4)"),
        (["model.vocab_size=200"], "model.vocab_size (200) must be >= 256 for byte-level data.kind=stdlib"),
        (["router.aux_loss_coef=nan"], "router.aux_loss_coef (nan) must be >= 0"),
        (["router.bias_update_rate=1.5"], "router.bias_update_rate (1.5) must be in [0, 1]"),
        (["router.capacity_factor=inf"], "router.capacity_factor (inf) must be > 0 and finite"),
        (["data.path=/x"], "data.path (/x) is not read by data.kind=stdlib; use data=text, jsonl or bin"),
        (["data.val_fraction=1"], "data.val_fraction (1.0) must be in (0, 1)"),
        (["train.lr=inf"], "train.lr (inf) must be > 0 and finite"),
        (["train.eval_batches=0"], "train.eval_batches (0) must be > 0"),
        (["train.log_every=-1"], "train.log_every (-1) must be > 0"),
        (["train.beta1=-0.1"], "train.beta1 (-0.1) must be in [0, 1)"),
        (["train.weight_decay=-1"], "train.weight_decay (-1.0) must be >= 0"),
        (["train.threads=-1"], "train.threads (-1) must be >= 0 (0 = torch's default)"),
        (["train.seed=-1"], "train.seed (-1) must be in [0, 2**63)"),
        (["train.collective_timeout_s=-5"], "train.collective_timeout_s (-5.0) must be > 0 and finite"),
        (["train.collective_timeout_s=soon"], "collective_timeout_s"),
        (["logger.wandb=true", "logger.wandb_project= "], "logger.wandb_project is empty"),
        (["logger.wandb_entity=''"], "logger.wandb_entity is empty"),
        (["parallel.ep=0"], "parallel.ep (0) must be > 0"),
        (["placement.rebalance_every=5"], "placement.rebalance_every (5) re-places experts by routing load"),
        (["launcher.max_restarts=-1"], "launcher.max_restarts (-1) must be >= 0"),
        (["launcher=torchrun", "launcher.rdzv_endpoint=node0"], "launcher.rdzv_endpoint (node0) must be HOST:PORT"),
        (["launcher=torchrun", "launcher.partition=gpu"], "launcher.partition is read by launcher=slurm only"),
        (["launcher=deepspeed", "launcher.nnodes=2"], "launcher.nnodes=2 needs launcher.hostfile"),
        (["launcher=mpirun", "launcher.nnodes=2"], "launcher=mpirun starts ranks on this node only"),
        (["launcher=slurm", "launcher.time_limit=soon"], "launcher.time_limit (soon) must be a Slurm time"),
        (["launcher=slurm", "launcher.gpus_per_node=-1"], "launcher.gpus_per_node (-1) must be >= 0"),
    ],
)
def test_bad_config_is_a_one_line_error_naming_the_value(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_make_train_experiment_is_two_ranks_with_ep2_and_the_same_global_batch() -> None:
    cfg = load_config(["experiment=ep2_cpu"])
    assert (cfg.launcher.name, cfg.launcher.nproc_per_node, cfg.parallel.ep) == ("torchrun", 2, 2)
    assert cfg.train.batch_size * cfg.launcher.nproc_per_node == load_config().train.batch_size
    assert cfg.logger.wandb and cfg.logger.wandb_mode == "offline"
