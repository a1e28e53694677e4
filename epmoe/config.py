"""Typed config schemas for every Hydra group, their defaults, and their semantic validation.

Hydra stays at the edges (`epmoe/train/__main__.py`, later `launch/`): it composes YAML from
`conf/` onto these dataclasses (unknown keys, `+key=...` ones too, and wrong types fail there:
`epmoe/train/cli.py`), converts the result to a plain `Config`, and everything inside the
library receives dataclasses only.

The defaults written here are the defaults: `Config()` is the run that `conf/config.yaml`
composes, and every YAML under `conf/` lists only the values it changes. A field with a fixed
set of values is a `Choice` (a str-valued Enum, in `epmoe/choices.py`): the names live once, in
the Enum, and the registries keyed on them (`epmoe.placement.policies.PLACEMENTS`) are checked
against it.

`validate(cfg)` checks what types cannot (ranges, divisibility, mutually exclusive options)
and raises `ConfigError` with a one-line message that names the value and what would work.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from epmoe.choices import (  # noqa: F401  (re-exported: the config's field types)
    Activation,
    AuxLoss,
    Choice,
    CommBackend,
    DataKind,
    Device,
    DispatcherName,
    DropPolicy,
    EngineName,
    ExpertImpl,
    LauncherName,
    OnNonfinite,
    PlacementName,
    Precision,
    ScoreFunc,
    WandbMode,
    WireDtype,
)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the value and the fix."""


@dataclass
class ModelConfig:
    """Defaults: moe_small, a small fine-grained MoE LM (top-2 of 8 experts + 1 shared) that
    trains on a 2-core CPU in a few minutes."""

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # FFN layout: layer i is MoE iff num_experts > 0, i >= first_dense_layers and
    # (i - first_dense_layers) % moe_every == 0; every other layer is a dense FFN.
    num_experts: int = 8
    moe_every: int = 1
    first_dense_layers: int = 1
    dense_hidden: int = 768  # hidden size of dense FFN layers
    expert_hidden: int = 256  # per-expert hidden size, independent of d_model (fine-grained)
    activation: Activation = Activation.swiglu
    n_shared_experts: int = 1
    shared_hidden: int = 256  # hidden size of each shared expert
    expert_impl: ExpertImpl = ExpertImpl.auto
    # BigMac-style low-dimensional exchange: project D -> exchange_dim before dispatch and back
    # after combine, so the all-to-all and the routed experts run at that width. 0 = off
    exchange_dim: int = 0
    tie_embeddings: bool = True


@dataclass
class RouterConfig:
    """Defaults: router=topk, softmax top-2 with renormalised weights and the batch-level balance loss."""

    top_k: int = 2
    score_func: ScoreFunc = ScoreFunc.softmax
    renormalize: bool = True  # renormalise the top-k weights to sum to 1
    routed_scaling: float = 1.0  # DeepSeek-V3's routed scaling factor on the routed output
    n_groups: int = 1  # group-limited routing: experts split into n_groups groups ...
    topk_groups: int = 1  # ... of which each token may use topk_groups
    aux_loss: AuxLoss = AuxLoss.batch
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    bias_update_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3); 0 = off
    capacity_factor: float | None = None  # None = dropless
    drop_policy: DropPolicy = DropPolicy.position


@dataclass
class DataConfig:
    kind: DataKind = DataKind.stdlib
    path: str | None = None  # file or folder for text, a file for jsonl and bin
    seq_len: int = 256
    val_fraction: float = 0.05


@dataclass
class FaultConfig:
    """Injected faults, for tests and drills (never set in a real run)."""

    kill_rank: int = -1  # this rank exits abruptly (os._exit) at the start of step `at_step`; -1 = never
    at_step: int = 0  # 1-based; only on the first attempt (torchrun restarts do not repeat the drill)
    nan_at_step: int = 0  # rank 0's loss becomes NaN at this 1-based step (tests train.on_nonfinite); 0 = never


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    precision: Precision = Precision.bf16
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 0  # keep the newest N complete checkpoints; 0 = keep all
    resume: str | None = None  # a checkpoint directory (checkpoints/step_<N>), or a run directory holding them
    sample_bytes: int = 200  # length of the generated text sample at the end; 0 = off
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    device: Device = Device.auto
    # how long a collective waits for the other ranks before the job ends with an error (a dead or hung peer)
    collective_timeout_s: float = 600.0
    # a non-finite loss or gradient norm: skip the step (counted) or abort with a checkpoint of the
    # last good state
    on_nonfinite: OnNonfinite = OnNonfinite.abort
    # native (our gradient reduction and clipping, torch AdamW) | deepspeed (deepspeed.initialize,
    # ZeRO stage zero_stage, MoE parameter groups); checkpoints are the same for both
    engine: EngineName = EngineName.native
    zero_stage: int = 0  # 0 | 1 | 2, with engine=deepspeed
    fault: FaultConfig = field(default_factory=FaultConfig)


@dataclass
class LoggerConfig:
    console: bool = True
    progress: bool = True  # a progress bar on stderr
    jsonl: bool = True
    plots: bool = True
    wandb: bool = False
    wandb_mode: WandbMode = WandbMode.offline
    wandb_project: str = "epmoe"
    wandb_entity: str | None = None
    # every N steps, keep the first `routing_trace_tokens` tokens' expert choices of every MoE
    # layer (rank 0); written to <run dir>/routing_trace.pt at the end. 0 = off
    routing_trace_every: int = 0
    routing_trace_tokens: int = 256


@dataclass
class ParallelConfig:
    """Parallel degrees; the world size comes from the launcher (torchrun's WORLD_SIZE)."""

    dp: int = 0  # data-parallel degree: 0 = the world size (every rank reads its own data)
    ep: int = 1  # expert-parallel degree: ranks that together hold one copy of the experts


@dataclass
class PlacementConfig:
    # contiguous | round_robin (static) | balanced | affinity | redundant (follow the routing load:
    # they take over at the first re-placement, every `rebalance_every` steps)
    policy: PlacementName = PlacementName.contiguous
    rebalance_every: int = 0  # 0 = never move experts
    # expert slots per rank: 0 = num_experts / ep; redundant needs more: the spare slots hold
    # replicas of the hottest experts (DeepSeek EPLB-style)
    slots_per_rank: int = 0


@dataclass
class CommConfig:
    backend: CommBackend = CommBackend.torch  # torch (nccl / gloo process groups) | mpi (mpi4py, CPU tensors)
    # under expert parallelism: alltoall (exchange everything, then compute) | pipelined (local
    # rows first, `chunks` pieces whose exchange overlaps the experts' compute)
    dispatcher: DispatcherName = DispatcherName.alltoall
    # N pieces (an int), or the string "auto": time 1, 2 and 4 chunks in the first 9 steps and keep
    # the fastest. Readers: `chunks == "auto"`, else `int(chunks)`
    chunks: int | str = 2
    dtype: WireDtype = WireDtype.fp32  # the rows' dtype on the wire (experts still compute in theirs)


@dataclass
class LauncherConfig:
    """How `python -m epmoe.launch` starts the ranks (`python -m epmoe.train` ignores it)."""

    name: LauncherName = LauncherName.local  # local: one process, in place
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # torchrun, nnodes > 1: host:port of the c10d rendezvous
    # torchrun: this node's address as the other nodes reach it (default: its hostname's). When
    # given, this node hosts the rendezvous store iff it is the rdzv_endpoint's host.
    local_addr: str | None = None
    master_addr: str | None = None  # nnodes > 1 without a rendezvous: node 0's address (torchrun, deepspeed)
    master_port: int = 0  # 0: a free port on one node, 29500 across nodes
    hostfile: str | None = None  # deepspeed: "host slots=N" lines; more than one host starts ranks over ssh (pdsh)
    max_restarts: int = 0  # torchrun restarts the whole job this many times after a failure
    # slurm: the sbatch script is written to the run directory and printed, or submitted
    partition: str | None = None
    time_limit: str = "01:00:00"
    gpus_per_node: int = 0
    submit: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


def register_configs() -> None:
    """Register the root schema: `conf/config.yaml` lists `base_config` first in its defaults,
    so every group YAML merged on top is type-checked against these dataclasses."""
    ConfigStore.instance().store(name="base_config", node=Config)


def bad_choice(name: str, value: object, allowed: typing.Iterable[object]) -> ConfigError:
    """The one-line error for a value outside a field's choices (the CLI's too, for OmegaConf's rejections)."""
    return ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, allowed))}")


def _choice(name: str, value: object, allowed: tuple[object, ...]) -> None:
    if value not in allowed:
        raise bad_choice(name, value, allowed)


def field_types(schema: type) -> dict[str, typing.Any]:
    """{field name: resolved type} of a config dataclass (its annotations are strings here)."""
    return typing.get_type_hints(schema)


def choice_type(key: str) -> type[Choice] | None:
    """The Choice of the dotted config key `key` ("comm.dispatcher"), None if it has none."""
    schema: typing.Any = Config
    for part in key.split("."):
        if not (dataclasses.is_dataclass(schema) and part in field_types(schema)):
            return None
        schema = field_types(schema)[part]
    return schema if isinstance(schema, type) and issubclass(schema, Choice) else None


def _check_choices(node: object, prefix: str) -> None:
    """Every Choice field holds one of its values: OmegaConf enforces that on composed configs,
    this on dataclasses built in Python (which may hold plain strings)."""
    for name, kind in field_types(type(node)).items():
        value = getattr(node, name)
        if dataclasses.is_dataclass(kind):
            _check_choices(value, f"{prefix}{name}.")
        elif isinstance(kind, type) and issubclass(kind, Choice):
            _choice(f"{prefix}{name}", value, tuple(c.value for c in kind))


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{name} ({value}) must be > 0" + ("" if isinstance(value, int) else " and finite"))


def _at_least_zero(name: str, value: float, meaning: str = "") -> None:
    """value >= 0 and finite; `meaning` says what 0 does, e.g. "0 = off"."""
    if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"{name} ({value}) must be >= 0" + (f" ({meaning})" if meaning else ""))


def _fraction(name: str, value: float, interval: str) -> None:
    """value within `interval`, one of "[0, 1]", "[0, 1)", "(0, 1)"."""
    low_ok = value >= 0 if interval[0] == "[" else value > 0
    high_ok = value <= 1 if interval[-1] == "]" else value < 1
    if not (low_ok and high_ok):  # NaN fails both
        raise ConfigError(f"{name} ({value}) must be in {interval}")


def _only_for(name: str, value: object, launcher: str, readers: tuple[str, ...]) -> None:
    if value is not None and launcher not in readers:
        by = " or ".join(f"launcher={r}" for r in readers)
        raise ConfigError(f"{name} is read by {by} only, not launcher={launcher}")


_HOST_PORT = re.compile(r"^\[?[\w.:-]+\]?:(\d{1,5})$")
_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^(UNLIMITED|INFINITE)$")


def _validate_model(m: ModelConfig, r: RouterConfig) -> None:
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "moe_every"):
        _positive(f"model.{name}", getattr(m, name))
    _positive("model.rope_theta", m.rope_theta)
    _positive("model.norm_eps", m.norm_eps)
    if m.d_model % m.n_heads or (m.d_model // m.n_heads) % 2:
        raise ConfigError(
            f"model.d_model ({m.d_model}) / model.n_heads ({m.n_heads}) must be an even "
            "integer head size (RoPE rotates pairs)"
        )
    _at_least_zero("model.num_experts", m.num_experts, "0 = a dense model")
    _at_least_zero("model.first_dense_layers", m.first_dense_layers)
    _at_least_zero("model.n_shared_experts", m.n_shared_experts)
    if m.num_experts > 0 and m.first_dense_layers >= m.n_layers:
        raise ConfigError(
            f"model.first_dense_layers ({m.first_dense_layers}) leaves no MoE layer among model.n_layers "
            f"({m.n_layers}); lower it, or set model.num_experts=0 for a dense model"
        )
    _positive("model.dense_hidden", m.dense_hidden)
    _positive("model.expert_hidden", m.expert_hidden)
    _positive("model.shared_hidden", m.shared_hidden)

    if m.num_experts > 0:
        if not 1 <= r.top_k <= m.num_experts:
            raise ConfigError(f"router.top_k ({r.top_k}) must be between 1 and model.num_experts ({m.num_experts})")
        if r.n_groups < 1 or m.num_experts % r.n_groups:
            raise ConfigError(
                f"model.num_experts ({m.num_experts}) must be divisible by router.n_groups ({r.n_groups})"
            )
        if not 1 <= r.topk_groups <= r.n_groups:
            raise ConfigError(
                f"router.topk_groups ({r.topk_groups}) must be between 1 and router.n_groups ({r.n_groups})"
            )
        if r.n_groups > 1 and r.topk_groups * (m.num_experts // r.n_groups) < r.top_k:
            raise ConfigError(
                f"router.topk_groups ({r.topk_groups}) groups of {m.num_experts // r.n_groups} experts "
                f"hold fewer than router.top_k ({r.top_k}) experts; raise topk_groups"
            )
    _at_least_zero("router.aux_loss_coef", r.aux_loss_coef)
    _at_least_zero("router.z_loss_coef", r.z_loss_coef)
    _fraction("router.bias_update_rate", r.bias_update_rate, "[0, 1]")
    if r.capacity_factor is not None:
        _positive("router.capacity_factor", r.capacity_factor)
    _positive("router.routed_scaling", r.routed_scaling)


def _validate_data(d: DataConfig, m: ModelConfig) -> None:
    if d.kind != "stdlib" and not d.path:
        raise ConfigError(f"data.kind={d.kind} needs data.path (a file or folder)")
    if d.kind == "stdlib" and d.path:
        raise ConfigError(f"data.path ({d.path}) is not read by data.kind=stdlib; use data=text, jsonl or bin")
    if d.kind != "bin" and m.vocab_size < 256:
        raise ConfigError(
            f"model.vocab_size ({m.vocab_size}) must be >= 256 for byte-level data.kind={d.kind}; "
            "token ids come with data.kind=bin"
        )
    _positive("data.seq_len", d.seq_len)
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len ({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len}); raise max_seq_len")
    _fraction("data.val_fraction", d.val_fraction, "(0, 1)")


def _validate_train(t: TrainConfig) -> None:
    for name in ("steps", "batch_size", "grad_accum", "lr", "eval_batches", "log_every"):
        _positive(f"train.{name}", getattr(t, name))
    _at_least_zero("train.warmup_steps", t.warmup_steps)
    _at_least_zero("train.eval_every", t.eval_every, "0 = only at the end")
    _at_least_zero("train.checkpoint_every", t.checkpoint_every, "0 = only at the end")
    if t.keep_checkpoints < 0:
        raise ConfigError(f"train.keep_checkpoints ({t.keep_checkpoints}) must be >= 0 (0 = keep all)")
    _at_least_zero("train.sample_bytes", t.sample_bytes, "0 = off")
    _at_least_zero("train.threads", t.threads, "0 = torch's default")
    _fraction("train.min_lr_ratio", t.min_lr_ratio, "[0, 1]")
    _at_least_zero("train.weight_decay", t.weight_decay)
    _fraction("train.beta1", t.beta1, "[0, 1)")
    _fraction("train.beta2", t.beta2, "[0, 1)")
    if t.grad_clip < 0 or not math.isfinite(t.grad_clip):
        raise ConfigError(f"train.grad_clip ({t.grad_clip}) must be a finite number >= 0 (0 = off)")
    if not 0 <= t.seed < 2**63:
        raise ConfigError(f"train.seed ({t.seed}) must be in [0, 2**63)")
    _positive("train.collective_timeout_s", t.collective_timeout_s)
    _choice("train.zero_stage", t.zero_stage, (0, 1, 2))
    if t.zero_stage and t.engine != "deepspeed":
        raise ConfigError(f"train.zero_stage ({t.zero_stage}) needs train.engine=deepspeed (native has no ZeRO)")
    f = t.fault
    if f.kill_rank >= 0 and not 1 <= f.at_step <= t.steps:
        raise ConfigError(f"train.fault.at_step ({f.at_step}) must be in [1, train.steps={t.steps}] with kill_rank")
    if not 0 <= f.nan_at_step <= t.steps:
        raise ConfigError(f"train.fault.nan_at_step ({f.nan_at_step}) must be in [0, train.steps={t.steps}]")


def _validate_logger(lg: LoggerConfig) -> None:
    if lg.wandb and not lg.wandb_project.strip():
        raise ConfigError("logger.wandb_project is empty; name a project (default: epmoe)")
    if lg.wandb_entity is not None and not lg.wandb_entity.strip():
        raise ConfigError("logger.wandb_entity is empty; name a team or user, or leave it null (your default)")
    _at_least_zero("logger.routing_trace_every", lg.routing_trace_every, "0 = off")
    _positive("logger.routing_trace_tokens", lg.routing_trace_tokens)


def _validate_launcher(lc: LauncherConfig) -> None:
    for name in ("nproc_per_node", "nnodes"):
        _positive(f"launcher.{name}", getattr(lc, name))
    if not 0 <= lc.node_rank < lc.nnodes:
        raise ConfigError(f"launcher.node_rank ({lc.node_rank}) must be in [0, launcher.nnodes={lc.nnodes})")
    _at_least_zero("launcher.max_restarts", lc.max_restarts)
    _at_least_zero("launcher.gpus_per_node", lc.gpus_per_node)
    if lc.name == "torchrun" and lc.nnodes > 1 and not (lc.rdzv_endpoint or lc.master_addr):
        raise ConfigError(
            f"launcher.nnodes={lc.nnodes} needs launcher.rdzv_endpoint=HOST:PORT (a c10d rendezvous) "
            "or launcher.master_addr=HOST (node 0)"
        )
    if lc.name == "deepspeed" and lc.nnodes > 1 and not lc.hostfile:
        raise ConfigError(f"launcher=deepspeed with launcher.nnodes={lc.nnodes} needs launcher.hostfile (host slots=N)")
    if lc.name == "mpirun" and lc.nnodes > 1:
        raise ConfigError(
            f"launcher=mpirun starts ranks on this node only, not launcher.nnodes={lc.nnodes}; use torchrun or slurm"
        )
    if not 0 <= lc.master_port < 65536:
        raise ConfigError(f"launcher.master_port ({lc.master_port}) must be a TCP port (0 = pick one)")
    if lc.rdzv_endpoint is not None:
        match = _HOST_PORT.match(lc.rdzv_endpoint)
        if not match or not 0 < int(match.group(1)) < 65536:
            raise ConfigError(f"launcher.rdzv_endpoint ({lc.rdzv_endpoint}) must be HOST:PORT, e.g. node0:29400")
    for name in ("master_addr", "local_addr", "partition"):
        value = getattr(lc, name)
        if value is not None and not value.strip():
            raise ConfigError(f"launcher.{name} is empty; name it or leave it null")
    _only_for("launcher.hostfile", lc.hostfile, lc.name, ("deepspeed",))
    _only_for("launcher.rdzv_endpoint", lc.rdzv_endpoint, lc.name, ("torchrun",))
    _only_for("launcher.local_addr", lc.local_addr, lc.name, ("torchrun",))
    _only_for("launcher.master_addr", lc.master_addr, lc.name, ("torchrun", "deepspeed"))
    _only_for("launcher.partition", lc.partition, lc.name, ("slurm",))
    if not _SLURM_TIME.match(lc.time_limit):
        raise ConfigError(
            f"launcher.time_limit ({lc.time_limit}) must be a Slurm time: MINUTES, HH:MM:SS or DAYS-HH:MM:SS"
        )


def validate(cfg: Config) -> Config:
    """Raise ConfigError on the first value that cannot work; return cfg unchanged otherwise."""
    _check_choices(cfg, "")
    m = cfg.model
    _validate_model(m, cfg.router)
    _validate_data(cfg.data, m)
    _validate_train(cfg.train)
    _validate_logger(cfg.logger)

    p = cfg.parallel
    _at_least_zero("parallel.dp", p.dp, "0 = the world size")
    _positive("parallel.ep", p.ep)
    if m.num_experts % p.ep:
        raise ConfigError(f"model.num_experts ({m.num_experts}) must be divisible by parallel.ep ({p.ep})")
    lc = cfg.launcher
    _validate_launcher(lc)
    pc = cfg.placement
    _at_least_zero("placement.rebalance_every", pc.rebalance_every, "0 = never")
    per_rank = m.num_experts // p.ep
    if pc.policy == "redundant" and not per_rank < pc.slots_per_rank <= m.num_experts:
        raise ConfigError(
            f"placement=redundant needs spare slots: placement.slots_per_rank ({pc.slots_per_rank}) must be in "
            f"({per_rank}, {m.num_experts}] (num_experts / ep, num_experts]"
        )
    if pc.policy != "redundant" and pc.slots_per_rank not in (0, per_rank):
        raise ConfigError(
            f"placement.slots_per_rank ({pc.slots_per_rank}) > num_experts / ep ({per_rank}) holds replicas: "
            "use placement=redundant"
        )
    if pc.policy in ("balanced", "affinity", "redundant") and pc.rebalance_every == 0:
        raise ConfigError(
            f"placement.policy={pc.policy} follows the routing load: set placement.rebalance_every=N "
            "(steps between re-placements)"
        )
    if pc.policy in ("contiguous", "round_robin") and pc.rebalance_every > 0:
        raise ConfigError(
            f"placement.rebalance_every ({pc.rebalance_every}) re-places experts by routing load, which "
            f"placement.policy={pc.policy} ignores; use placement=balanced, affinity or redundant"
        )
    if cfg.train.engine == "deepspeed" and pc.rebalance_every > 0:
        raise ConfigError(
            f"placement.rebalance_every ({pc.rebalance_every}) moves experts with their AdamW state, which "
            "DeepSpeed's ZeRO partitions: use train.engine=native for placement that follows the load"
        )
    chunks = cfg.comm.chunks
    if chunks != "auto" and not (isinstance(chunks, int) and not isinstance(chunks, bool) and chunks >= 1):
        raise ConfigError(f"comm.chunks ({chunks!r}) must be a positive integer or auto")
    if cfg.comm.chunks == "auto" and cfg.comm.dispatcher != "pipelined":
        raise ConfigError("comm.chunks=auto tunes the pipelined dispatcher: add comm.dispatcher=pipelined")
    if cfg.comm.backend == "mpi" and lc.name not in ("local", "mpirun"):
        raise ConfigError(f"comm.backend=mpi needs ranks started by MPI: use launcher=mpirun, not launcher={lc.name}")
    if cfg.comm.backend == "mpi" and cfg.train.device == "cuda":
        raise ConfigError("comm.backend=mpi exchanges CPU tensors; with train.device=cuda use comm.backend=torch")
    return cfg
