"""Typed config schemas for every Hydra group, and their semantic validation.

Hydra stays at the edges (`epmoe/train/__main__.py`, later `launch/`): it composes YAML from
`conf/` onto these dataclasses (unknown keys and wrong types fail there), converts the result
to a plain `Config`, and everything inside the library receives dataclasses only.

`validate(cfg)` checks what types cannot (ranges, divisibility, mutually exclusive options)
and raises `ConfigError` with a one-line message that names the value and what would work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore


class ConfigError(ValueError):
    """A config value that cannot work; the message names the value and the fix."""


@dataclass
class ModelConfig:
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
    first_dense_layers: int = 0
    dense_hidden: int = 1024  # hidden size of dense FFN layers
    expert_hidden: int = 256  # per-expert hidden size, independent of d_model (fine-grained)
    activation: str = "swiglu"  # swiglu | gelu
    n_shared_experts: int = 0
    shared_hidden: int = 256  # hidden size of each shared expert
    expert_impl: str = "auto"  # auto | grouped | loop | fused  (loop = the kept reference path)
    # BigMac-style low-dimensional exchange: project D -> exchange_dim before dispatch and back
    # after combine, so the all-to-all and the routed experts run at that width. 0 = off
    exchange_dim: int = 0
    tie_embeddings: bool = True


@dataclass
class RouterConfig:
    top_k: int = 2
    score_func: str = "softmax"  # softmax | sigmoid
    renormalize: bool = True  # renormalise the top-k weights to sum to 1
    routed_scaling: float = 1.0  # DeepSeek-V3's routed scaling factor on the routed output
    n_groups: int = 1  # group-limited routing: experts split into n_groups groups ...
    topk_groups: int = 1  # ... of which each token may use topk_groups
    aux_loss: str = "batch"  # none | batch (Switch/GShard) | sequence (DeepSeek-V3)
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3); 0 = off
    capacity_factor: float | None = None  # None = dropless
    drop_policy: str = "position"  # position | probability


@dataclass
class DataConfig:
    kind: str = "stdlib"  # stdlib | text | jsonl | bin
    path: str | None = None  # file or folder for text, a file for jsonl and bin
    seq_len: int = 256
    val_fraction: float = 0.05


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
    precision: str = "bf16"  # fp32 | bf16 (autocast)
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 0  # 0 = only at the end
    resume: str | None = None  # a checkpoint file, or a run directory holding checkpoints
    sample_bytes: int = 200  # length of the generated text sample at the end; 0 = off
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    device: str = "auto"  # auto (cuda if present, else cpu) | cpu | cuda


@dataclass
class LoggerConfig:
    console: bool = True
    progress: bool = True  # a progress bar on stderr
    jsonl: bool = True
    plots: bool = True
    wandb: bool = False
    wandb_mode: str = "offline"  # offline | online | disabled
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
    # contiguous | round_robin (static) | balanced | affinity (follow the routing load: they take
    # over from contiguous at the first re-placement, every `rebalance_every` steps)
    policy: str = "contiguous"
    rebalance_every: int = 0  # 0 = never move experts


@dataclass
class CommConfig:
    backend: str = "torch"  # torch (nccl / gloo process groups) | mpi (mpi4py, CPU tensors)
    # under expert parallelism: alltoall (exchange everything, then compute) | pipelined (local
    # rows first, `chunks` pieces whose exchange overlaps the experts' compute)
    dispatcher: str = "alltoall"
    chunks: int = 2
    dtype: str = "fp32"  # fp32 | bf16: the rows' dtype on the wire (experts still compute in theirs)


@dataclass
class LauncherConfig:
    """How `python -m epmoe.launch` starts the ranks (`python -m epmoe.train` ignores it)."""

    name: str = "local"  # local (one process) | torchrun | deepspeed | mpirun | slurm
    nproc_per_node: int = 2
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


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} ({value}) must be > 0")


def validate(cfg: Config) -> Config:
    """Raise ConfigError on the first value that cannot work; return cfg unchanged otherwise."""
    m, r, d, t, lg = cfg.model, cfg.router, cfg.data, cfg.train, cfg.logger
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "moe_every"):
        _positive(f"model.{name}", getattr(m, name))
    if m.d_model % m.n_heads or (m.d_model // m.n_heads) % 2:
        raise ConfigError(
            f"model.d_model ({m.d_model}) / model.n_heads ({m.n_heads}) must be an even "
            "integer head size (RoPE rotates pairs)"
        )
    if m.num_experts < 0 or m.first_dense_layers < 0 or m.n_shared_experts < 0:
        raise ConfigError("model.num_experts, first_dense_layers and n_shared_experts must be >= 0")
    _positive("model.dense_hidden", m.dense_hidden)
    _positive("model.expert_hidden", m.expert_hidden)
    if not 0 <= m.exchange_dim <= m.d_model:
        raise ConfigError(f"model.exchange_dim ({m.exchange_dim}) must be in [0, model.d_model={m.d_model}] (0 = off)")
    _positive("model.shared_hidden", m.shared_hidden)
    _choice("model.activation", m.activation, ("swiglu", "gelu"))
    _choice("model.expert_impl", m.expert_impl, ("auto", "grouped", "loop", "fused"))
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
    _choice("router.score_func", r.score_func, ("softmax", "sigmoid"))
    _choice("router.aux_loss", r.aux_loss, ("none", "batch", "sequence"))
    _choice("router.drop_policy", r.drop_policy, ("position", "probability"))
    if r.aux_loss_coef < 0 or r.z_loss_coef < 0 or r.bias_update_rate < 0:
        raise ConfigError("router.aux_loss_coef, z_loss_coef and bias_update_rate must be >= 0")
    if r.capacity_factor is not None:
        _positive("router.capacity_factor", r.capacity_factor)
    _positive("router.routed_scaling", r.routed_scaling)

    _choice("data.kind", d.kind, ("stdlib", "text", "jsonl", "bin"))
    if d.kind != "stdlib" and not d.path:
        raise ConfigError(f"data.kind={d.kind} needs data.path (a file or folder)")
    _positive("data.seq_len", d.seq_len)
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len ({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len}); raise max_seq_len")
    if not 0 < d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction ({d.val_fraction}) must be in (0, 1)")

    for name in ("steps", "batch_size", "grad_accum", "lr", "eval_batches", "log_every"):
        _positive(f"train.{name}", getattr(t, name))
    if t.warmup_steps < 0 or t.eval_every < 0 or t.checkpoint_every < 0 or t.sample_bytes < 0:
        raise ConfigError("train.warmup_steps, eval_every, checkpoint_every and sample_bytes must be >= 0")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio ({t.min_lr_ratio}) must be in [0, 1]")
    if t.grad_clip < 0 or not math.isfinite(t.grad_clip):
        raise ConfigError(f"train.grad_clip ({t.grad_clip}) must be a finite number >= 0 (0 = off)")
    _choice("train.precision", t.precision, ("fp32", "bf16"))
    _choice("train.device", t.device, ("auto", "cpu", "cuda"))
    _choice("logger.wandb_mode", lg.wandb_mode, ("offline", "online", "disabled"))
    if lg.routing_trace_every < 0:
        raise ConfigError(f"logger.routing_trace_every ({lg.routing_trace_every}) must be >= 0 (0 = off)")
    _positive("logger.routing_trace_tokens", lg.routing_trace_tokens)

    p = cfg.parallel
    if p.dp < 0 or p.ep < 1:
        raise ConfigError(f"parallel.dp ({p.dp}) must be >= 0 (0 = world size) and parallel.ep ({p.ep}) >= 1")
    if m.num_experts % p.ep:
        raise ConfigError(f"model.num_experts ({m.num_experts}) must be divisible by parallel.ep ({p.ep})")
    lc = cfg.launcher
    _choice("launcher.name", lc.name, ("local", "torchrun", "deepspeed", "mpirun", "slurm"))
    for name in ("nproc_per_node", "nnodes"):
        _positive(f"launcher.{name}", getattr(lc, name))
    if not 0 <= lc.node_rank < lc.nnodes or lc.max_restarts < 0:
        raise ConfigError(
            f"launcher.node_rank ({lc.node_rank}) must be in [0, nnodes={lc.nnodes}) and max_restarts >= 0"
        )
    if lc.name == "torchrun" and lc.nnodes > 1 and not (lc.rdzv_endpoint or lc.master_addr):
        raise ConfigError(
            f"launcher.nnodes={lc.nnodes} needs launcher.rdzv_endpoint=HOST:PORT (a c10d rendezvous) "
            "or launcher.master_addr=HOST (node 0)"
        )
    if not 0 <= lc.master_port < 65536:
        raise ConfigError(f"launcher.master_port ({lc.master_port}) must be a TCP port (0 = pick one)")
    if lc.hostfile and lc.name != "deepspeed":
        raise ConfigError(f"launcher.hostfile is read by launcher=deepspeed only, not launcher={lc.name}")
    pc = cfg.placement
    if pc.policy == "redundant":
        raise ConfigError("placement.policy=redundant: replica dispatch is not built yet; use balanced or affinity")
    _choice("placement.policy", pc.policy, ("contiguous", "round_robin", "balanced", "affinity"))
    if pc.rebalance_every < 0:
        raise ConfigError(f"placement.rebalance_every ({pc.rebalance_every}) must be >= 0 (0 = never)")
    if pc.policy in ("balanced", "affinity") and pc.rebalance_every == 0:
        raise ConfigError(
            f"placement.policy={pc.policy} follows the routing load: set placement.rebalance_every=N "
            "(steps between re-placements)"
        )
    _choice("comm.backend", cfg.comm.backend, ("torch", "mpi"))
    _choice("comm.dispatcher", cfg.comm.dispatcher, ("alltoall", "pipelined"))
    _positive("comm.chunks", cfg.comm.chunks)
    _choice("comm.dtype", cfg.comm.dtype, ("fp32", "bf16"))
    if cfg.comm.backend == "mpi" and lc.name not in ("local", "mpirun"):
        raise ConfigError(f"comm.backend=mpi needs ranks started by MPI: use launcher=mpirun, not launcher={lc.name}")
    if cfg.comm.backend == "mpi" and cfg.train.device == "cuda":
        raise ConfigError("comm.backend=mpi exchanges CPU tensors; with train.device=cuda use comm.backend=torch")
    return cfg
