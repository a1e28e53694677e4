"""`validate(cfg)`: what the config's types cannot say (ranges, divisibility, mutually exclusive
options), checked on the composed `Config`; the first value that cannot work raises
`ConfigError` with one line naming it and what would work. The schemas are epmoe/config.py.
"""

from __future__ import annotations

import dataclasses
import math
import re

from epmoe.config import (
    Choice,
    Config,
    ConfigError,
    DataConfig,
    LauncherConfig,
    LoggerConfig,
    ModelConfig,
    RouterConfig,
    TrainConfig,
    bad_choice,
    field_types,
)


def _choice(name: str, value: object, allowed: tuple[object, ...]) -> None:
    if value not in allowed:
        raise bad_choice(name, value, allowed)


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


def _validate_attention(m: ModelConfig) -> None:
    for name in ("n_kv_heads", "head_dim", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                 "v_head_dim"):  # fmt: skip
        _at_least_zero(f"model.{name}", getattr(m, name), "0 = unset")
    if m.attention == "mla":
        for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            _positive(f"model.{name} (attention=mla)", getattr(m, name))
        if m.qk_rope_head_dim % 2:
            raise ConfigError(f"model.qk_rope_head_dim ({m.qk_rope_head_dim}) must be even (RoPE rotates pairs)")
        if m.n_kv_heads or m.head_dim or m.qk_norm != "none":
            raise ConfigError(
                "model.n_kv_heads, head_dim and qk_norm belong to attention=standard; attention=mla sizes its heads "
                "with qk_nope_head_dim, qk_rope_head_dim and v_head_dim"
            )
        return
    if m.q_lora_rank or m.kv_lora_rank or m.qk_nope_head_dim or m.qk_rope_head_dim or m.v_head_dim:
        raise ConfigError(
            "model.q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim and v_head_dim belong to "
            "attention=mla; set model.attention=mla or leave them 0"
        )
    if not m.head_dim and (m.d_model % m.n_heads or (m.d_model // m.n_heads) % 2):
        raise ConfigError(
            f"model.d_model ({m.d_model}) / model.n_heads ({m.n_heads}) must be an even "
            "integer head size (RoPE rotates pairs), or set model.head_dim"
        )
    if m.head_dim % 2:
        raise ConfigError(f"model.head_dim ({m.head_dim}) must be even (RoPE rotates pairs)")
    if m.n_heads % m.kv_heads():
        raise ConfigError(
            f"model.n_kv_heads ({m.n_kv_heads}) must divide model.n_heads ({m.n_heads}): each key/value head "
            "serves the same number of query heads"
        )


def _validate_model(m: ModelConfig, r: RouterConfig) -> None:
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "moe_every"):
        _positive(f"model.{name}", getattr(m, name))
    _positive("model.rope_theta", m.rope_theta)
    _positive("model.norm_eps", m.norm_eps)
    _validate_attention(m)
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
    if m.shared_gate and (m.num_experts == 0 or m.n_shared_experts == 0):
        raise ConfigError("model.shared_gate=true gates the shared experts, but this model has none; set it false")

    if m.num_experts > 0:
        if not 1 <= r.top_k <= m.num_experts:
            raise ConfigError(f"router.top_k ({r.top_k}) must be between 1 and model.num_experts ({m.num_experts})")
        if r.top_k == 1 and r.renormalize:
            raise ConfigError(
                "router.top_k=1 with router.renormalize=true makes every routing weight 1.0, so the gate learns only "
                "from the aux loss: set router.renormalize=false (the Switch-Transformer gate) or router.top_k >= 2"
            )
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
    if not d.field:
        raise ConfigError("data.field is empty; name the text's key (jsonl) or column (hf), e.g. data.field=text")
    if d.field != "text" and d.kind not in ("jsonl", "hf"):  # NOTE: the default itself cannot be told from unset
        raise ConfigError(f"data.field ({d.field}) names the text of data.kind=jsonl or hf; data.kind={d.kind} does "
                          "not read it, so drop data.field")  # fmt: skip
    if d.kind == "bin" and d.tokenizer is not None:
        raise ConfigError(f"data.tokenizer ({d.tokenizer}) tokenizes text; data.kind=bin holds token ids already, "
                          "so drop data.tokenizer")  # fmt: skip
    if d.kind == "bin" and d.document_mask:
        raise ConfigError("data.document_mask=true needs documents ended by a boundary token, which data.kind=bin "
                          "does not name; use token shards (data=tokens) or data.document_mask=false")  # fmt: skip
    if d.kind not in ("bin", "tokens") and d.tokenizer is None and m.vocab_size < 256:
        raise ConfigError(
            f"model.vocab_size ({m.vocab_size}) must be >= 256 for byte-level data.kind={d.kind}; "
            "token ids come with data.tokenizer or data.kind=bin"
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
    if t.compile and t.activation_checkpointing != "none":
        raise ConfigError(
            f"train.compile=true with train.activation_checkpointing={t.activation_checkpointing}: dynamo cannot "
            "trace a checkpointed block (it would all run eager, epmoe/parallel/compile.py); use one of the two"
        )
    f = t.fault
    if f.kill_rank >= 0 and not 1 <= f.at_step <= t.steps:
        raise ConfigError(f"train.fault.at_step ({f.at_step}) must be in [1, train.steps={t.steps}] with kill_rank")
    if f.in_save and (
        f.kill_rank < 0 or not (f.at_step == t.steps or (t.checkpoint_every and f.at_step % t.checkpoint_every == 0))
    ):
        raise ConfigError(
            f"train.fault.in_save kills train.fault.kill_rank in the save of step train.fault.at_step ({f.at_step}), "
            f"which saves no checkpoint (train.checkpoint_every={t.checkpoint_every}, train.steps={t.steps})"
        )
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


def _validate_fsdp(cfg: Config) -> None:
    """parallel.fsdp=true: what it does not combine with."""
    if cfg.train.engine == "deepspeed":
        raise ConfigError("parallel.fsdp=true with train.engine=deepspeed: DeepSpeed's ZeRO already shards; use "
                          "train.engine=native with parallel.fsdp=true")  # fmt: skip


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
    if m.num_experts == 0 and p.ep > 1:
        raise ConfigError(
            f"parallel.ep ({p.ep}) shards experts, but model.num_experts=0 is a dense model: use parallel.ep=1"
        )
    if m.num_experts % p.ep:
        raise ConfigError(f"model.num_experts ({m.num_experts}) must be divisible by parallel.ep ({p.ep})")
    lc = cfg.launcher
    _validate_launcher(lc)
    pc = cfg.placement
    _at_least_zero("placement.rebalance_every", pc.rebalance_every, "0 = never")
    per_rank = m.num_experts // p.ep
    if m.num_experts == 0 and pc.policy == "redundant":
        raise ConfigError(
            "placement=redundant replicates experts, but model.num_experts=0 is a dense model: use placement=contiguous"
        )
    if m.num_experts == 0 and pc.slots_per_rank:
        raise ConfigError(
            f"placement.slots_per_rank ({pc.slots_per_rank}) holds experts, but model.num_experts=0 is a dense "
            "model: leave it 0"
        )
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
    if p.fsdp:
        _validate_fsdp(cfg)
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


def validate_model(m: ModelConfig, r: RouterConfig) -> None:
    """The model and router checks of `validate` alone (an imported model before any run config)."""
    _check_choices(m, "model.")
    _check_choices(r, "router.")
    _validate_model(m, r)
