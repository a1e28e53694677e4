"""Config composition and validation: every group composes, bad input fails with one line,
the dataclass defaults are the defaults, and no YAML restates one."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from epmoe.config import (
    Choice,
    CommConfig,
    Config,
    ConfigError,
    DispatcherName,
    ModelConfig,
    PlacementName,
    choice_type,
    field_types,
)
from epmoe.placement.policies import PLACEMENTS
from epmoe.train.cli import load_config
from epmoe.validate import validate

from .conftest import run_cli

CONF = Path(__file__).resolve().parents[1] / "conf"
NEEDS_PATH = {"text", "jsonl", "bin", "tokens", "hf"}


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
    path = CONF / group / f"{option}.yaml"
    written = OmegaConf.to_container(OmegaConf.load(path))
    # a file of `# @package _global_` sets keys of several groups (model/<family>_tiny: model and router)
    _assert_sets(cfg if "# @package _global_" in path.read_text() else getattr(cfg, group), written, path.name)


def _assert_sets(node, written: dict, where: str) -> None:
    for key, value in written.items():
        if key == "defaults" or value == "???":  # inherited or left for the user
            continue
        if isinstance(value, dict):
            _assert_sets(getattr(node, key), value, f"{where}: {key}")
        else:
            assert getattr(node, key) == value, f"{where} sets {key}={value!r}"


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
        (
            ["model=huge"],
            "Could not find 'model/huge' (options: deepseek_v3_tiny, dense_small, llama_tiny, "
            "mixtral_tiny, moe_small, olmoe_tiny, qwen2_moe_tiny, qwen3_moe_tiny, qwen3_tiny)",
        ),
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


TOP1_RENORMALISED = (
    "router.top_k=1 with router.renormalize=true makes every routing weight 1.0, so the gate learns only from the "
    "aux loss: set router.renormalize=false (the Switch-Transformer gate) or router.top_k >= 2"
)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["router.top_k=1"], TOP1_RENORMALISED),  # renormalize=true is the default
        (["router.top_k=1", "router.renormalize=true", "router=capacity"], TOP1_RENORMALISED),
        (["model=dense_small", "parallel.ep=2"],
         "parallel.ep (2) shards experts, but model.num_experts=0 is a dense model: use parallel.ep=1"),
        (["model.num_experts=0", "parallel.ep=4", "launcher=torchrun", "launcher.nproc_per_node=4"],
         "parallel.ep (4) shards experts, but model.num_experts=0 is a dense model: use parallel.ep=1"),
        (["model=dense_small", "placement=redundant"],
         "placement=redundant replicates experts, but model.num_experts=0 is a dense model: use placement=contiguous"),
        (["model=dense_small", "placement.slots_per_rank=2"],
         "placement.slots_per_rank (2) holds experts, but model.num_experts=0 is a dense model: leave it 0"),
    ],
)  # fmt: skip
def test_top1_renormalised_and_dense_with_expert_parallelism_are_refused_with_the_fix(
    overrides: list[str], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    assert str(info.value) == expected


def test_what_those_refusals_leave_open_still_validates() -> None:
    switch = load_config(["router.top_k=1", "router.renormalize=false", "router=capacity"]).router
    assert (switch.top_k, switch.renormalize, switch.capacity_factor) == (1, False, 1.25)
    # a dense model ignores the router; at parallel.ep=1 the placement and dispatcher options are unused
    dense = load_config(["model=dense_small", "router.top_k=1", "placement=balanced", "placement.rebalance_every=2",
                         "comm.dispatcher=pipelined", "comm.chunks=auto"])  # fmt: skip
    assert (dense.model.num_experts, dense.parallel.ep, dense.placement.policy) == (0, 1, "balanced")
    assert load_config(["router.top_k=2"]).router.renormalize is True  # the default router is untouched


def test_make_train_experiment_is_two_ranks_with_ep2_and_the_same_global_batch() -> None:
    cfg = load_config(["experiment=ep2_cpu"])
    assert (cfg.launcher.name, cfg.launcher.nproc_per_node, cfg.parallel.ep) == ("torchrun", 2, 2)
    assert cfg.train.batch_size * cfg.launcher.nproc_per_node == load_config().train.batch_size
    assert cfg.logger.wandb and cfg.logger.wandb_mode == "offline"


# --- one source of defaults -----------------------------------------------------------------------


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_the_dataclass_defaults_are_the_default_composition() -> None:
    assert dataclasses.asdict(Config()) == dataclasses.asdict(load_config())


def _restated_defaults(path: Path) -> list[str]:
    """The keys of `path` whose value equals the one they would have without it."""
    written = OmegaConf.to_container(OmegaConf.load(path))
    written = {k: v for k, v in written.items() if k not in ("defaults", "hydra")}
    if path.parent.name == "experiment" or "# @package _global_" in path.read_text():  # keys across groups,
        # relative to the composed base
        schema, base = Config, load_config()
    else:
        schema = field_types(Config)[path.parent.name]
        base = schema()
    # merged onto the schema, values take the field's type (600 -> 600.0, "mpi" -> CommBackend.mpi)
    merged = _flat(OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(schema), written)))
    defaults = _flat(dataclasses.asdict(base))
    # "???" (left for the user) never merges over a value: it is no default, whatever the field holds
    return [key for key, value in _flat(written).items() if value != "???" and merged[key] == defaults[key]]


@pytest.mark.parametrize("path", sorted(CONF.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_yaml_restates_a_default(path: Path) -> None:
    assert _restated_defaults(path) == [], f"{path.parent.name}/{path.name} restates the defaults of these keys"


def test_the_restated_default_check_catches_one(tmp_path: Path) -> None:
    (tmp_path / "comm").mkdir()
    (tmp_path / "comm" / "x.yaml").write_text("backend: mpi\ndispatcher: alltoall\nchunks: 2\n")
    assert _restated_defaults(tmp_path / "comm" / "x.yaml") == ["dispatcher", "chunks"]


def test_options_that_change_nothing_are_empty_and_the_default_ones() -> None:
    empty = sorted(f"{p.parent.name}/{p.stem}" for p in CONF.glob("*/*.yaml") if not OmegaConf.load(p))
    assert empty == [
        "comm/torch", "data/stdlib", "launcher/local", "logger/default", "model/moe_small", "parallel/single",
        "placement/contiguous", "router/topk", "train/default",
    ]  # fmt: skip
    defaults = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))["defaults"]
    chosen = [f"{g}/{o}" for d in defaults if isinstance(d, dict) for g, o in d.items() if o is not None]
    assert sorted(chosen) == empty  # the default composition is all defaults (`optional experiment: null` aside)


# --- choice fields are Enums --------------------------------------------------------------------


def _choice_fields(schema: type = Config, prefix: str = "") -> dict[str, type[Choice]]:
    out = {}
    for name, kind in field_types(schema).items():
        if dataclasses.is_dataclass(kind):
            out.update(_choice_fields(kind, f"{prefix}{name}."))
        elif isinstance(kind, type) and issubclass(kind, Choice):
            out[f"{prefix}{name}"] = kind
    return out


CHOICES = {
    "model.activation": "swiglu, gelu",
    "model.expert_impl": "auto, grouped, loop, fused",
    "model.family": "epmoe, mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, llama, qwen3",
    "model.qk_norm": "none, head, full",
    "model.attention": "standard, mla",
    "router.group_score": "top2_sum, max",
    "router.score_func": "softmax, sigmoid",
    "router.aux_loss": "none, batch, sequence",
    "router.drop_policy": "position, probability",
    "data.kind": "stdlib, text, jsonl, bin, tokens, hf",
    "train.precision": "fp32, bf16",
    "train.device": "auto, cpu, cuda",
    "train.on_nonfinite": "skip, abort",
    "train.activation_checkpointing": "none, full, selective",
    "train.engine": "native, deepspeed",
    "logger.wandb_mode": "offline, online, disabled",
    "placement.policy": "contiguous, round_robin, balanced, affinity, redundant",
    "comm.backend": "torch, mpi",
    "comm.dispatcher": "alltoall, pipelined",
    "comm.dtype": "fp32, bf16",
    "launcher.name": "local, torchrun, deepspeed, mpirun, slurm",
}


def test_every_choice_field_is_an_enum_of_its_values() -> None:
    fields = _choice_fields()
    assert {key: ", ".join(c.value for c in kind) for key, kind in fields.items()} == CHOICES
    assert all(choice_type(key) is kind for key, kind in fields.items())
    for kind in set(fields.values()):  # OmegaConf reads a string by member name
        assert [c.name for c in kind] == [c.value for c in kind]


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_a_choice_outside_the_enum_is_one_line_listing_the_choices(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config([f"{key}=nonsense"])
    assert str(info.value) == f"{key}='nonsense' is not one of {CHOICES[key]}"


def test_a_dataclass_built_in_python_gets_the_same_choice_error() -> None:
    with pytest.raises(ConfigError, match=r"^model.activation='relu' is not one of swiglu, gelu$"):
        validate(Config(model=ModelConfig(activation="relu")))
    assert validate(Config(model=ModelConfig(activation="gelu"))).model.activation == "gelu"  # plain strings work


def test_choice_values_are_their_strings() -> None:
    cfg = load_config(["comm.dispatcher=pipelined"])
    assert cfg.comm.dispatcher is DispatcherName.pipelined
    assert cfg.comm.dispatcher == "pipelined" and cfg.comm.dispatcher != "alltoall"
    assert (f"{cfg.comm.dispatcher}", str(cfg.comm.dispatcher), f"{cfg.comm.dispatcher:>10}") == (
        "pipelined", "pipelined", " pipelined")  # fmt: skip
    assert {"pipelined": 1}[cfg.comm.dispatcher] == 1
    assert json.loads(json.dumps(dataclasses.asdict(cfg)))["comm"]["dispatcher"] == "pipelined"


def test_the_placement_registry_is_keyed_by_the_enum() -> None:
    assert set(PLACEMENTS) == set(PlacementName)
    assert PLACEMENTS["balanced"] is PLACEMENTS[PlacementName.balanced]


# --- comm.chunks: an int or auto ----------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [("4", 4), ("1", 1), ("auto", "auto")])
def test_comm_chunks_is_a_positive_int_or_auto(value: str, expected: int | str) -> None:
    chunks = load_config(["comm.dispatcher=pipelined", f"comm.chunks={value}"]).comm.chunks
    assert chunks == expected and type(chunks) is type(expected)
    assert load_config().comm.chunks == 2 == CommConfig().chunks


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", "comm.chunks (0) must be a positive integer or auto"),
        ("-1", "comm.chunks (-1) must be a positive integer or auto"),
        ("x", "comm.chunks ('x') must be a positive integer or auto"),
        ("'4'", "comm.chunks ('4') must be a positive integer or auto"),  # a quoted string is not an int
        ("1.5", "Error merging override comm.chunks=1.5: Value '1.5' of type 'float' is incompatible"),
        ("true", "Error merging override comm.chunks=true: Value 'True' of type 'bool' is incompatible"),
    ],
)
def test_comm_chunks_refuses_anything_else_naming_the_value(value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(["comm.dispatcher=pipelined", f"comm.chunks={value}"])
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


# --- unknown keys, also through + and ++ --------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("+train.foo=1", "unknown config key train.foo: not a field of train (TrainConfig); its keys: steps, "),
        ("++train.foo=1", "unknown config key train.foo: not a field of train (TrainConfig); its keys: steps, "),
        ("+train.stesp=1", "unknown config key train.stesp: not a field of train (TrainConfig); did you mean "
                           "train.steps?"),
        ("+train.fault.x=1", "unknown config key train.fault.x: not a field of train.fault (FaultConfig); its keys: "
                             "kill_rank, at_step, in_save, nan_at_step"),
        ("+foo=1", "unknown config key foo: not a field of the config; its keys: model, router, data, train, logger, "
                   "parallel, placement, comm, launcher"),
        ("++foo=1", "unknown config key foo: not a field of the config; its keys: model, "),
        ("train.foo=1", "Could not override 'train.foo': Key 'foo' not in 'TrainConfig'"),
        # + on a key that exists is Hydra's error, with its fix
        ("+train.steps=5", "Could not append to config. An item is already at 'train.steps' (Either remove + prefix: "
                           "'train.steps=5'; Or add a second + to add or override 'train.steps': '++train.steps=5')"),
    ],
)  # fmt: skip
def test_an_unknown_key_is_refused_also_through_plus(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config([override])
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


def test_plus_plus_overrides_a_key_that_exists_and_plus_sets_an_unset_one() -> None:
    assert load_config(["++train.steps=5"]).train.steps == 5  # Hydra: ++ adds or overrides
    assert load_config(["+logger.wandb_entity=team"]).logger.wandb_entity == "team"  # null counts as absent for +
    with pytest.raises(ConfigError, match=r"^comm.dispatcher='tutel' is not one of alltoall, pipelined$"):
        load_config(["++comm.dispatcher=tutel"])  # ++ still type-checks


def test_the_command_line_refuses_an_unknown_key_with_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = run_cli("+train.foo=1", f"hydra.run.dir={tmp_path}/run", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("error: unknown config key train.foo: not a field of train (TrainConfig)")
    assert not (tmp_path / "run").exists()
