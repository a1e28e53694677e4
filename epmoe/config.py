"""Typed config schemas for every Hydra group, their defaults, and their semantic validation.

Hydra stays at the edges (`epmoe/train/__main__.py`, `launch/`): it composes YAML from
`conf/` onto these dataclasses (unknown keys, `+key=...` ones too, and wrong types fail there:
`epmoe/train/cli.py`), converts the result to a plain `Config`, and everything inside the
library receives dataclasses only.

The defaults written here are the defaults: `Config()` is the run that `conf/config.yaml`
composes, and every YAML under `conf/` lists only the values it changes. A field with a fixed
set of values is a `Choice` (a str-valued Enum, in `epmoe/choices.py`): the names live once, in
the Enum, and the registries keyed on them (`epmoe.placement.policies.PLACEMENTS`) are checked
against it.

`validate(cfg)` (epmoe/validate.py, beside these schemas) checks what types cannot (ranges,
divisibility, mutually exclusive options) and raises `ConfigError` with a one-line message
that names the value and what would work.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from epmoe.choices import (  # noqa: F401  (re-exported: the config's field types)
    Activation,
    ActivationCheckpointing,
    AttentionKind,
    AuxLoss,
    Choice,
    CommBackend,
    DataKind,
    Device,
    DispatcherName,
    DropPolicy,
    EngineName,
    ExpertImpl,
    Family,
    GroupScore,
    LauncherName,
    OnNonfinite,
    PlacementName,
    Precision,
    QKNorm,
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
    # the Hugging Face family this model is (epmoe/hf imports and exports it); epmoe = native
    family: Family = Family.epmoe
    # -- attention (standard): grouped-query with n_kv_heads < n_heads
    n_kv_heads: int = 0  # 0 = n_heads
    head_dim: int = 0  # 0 = d_model / n_heads (Qwen3 sets it independently)
    qk_norm: QKNorm = QKNorm.none
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2-MoE)
    out_bias: bool = False  # bias on the output projection (Llama's attention_bias with qkv_bias)
    # RoPE rotates (even, odd) pairs of a head's dims (epmoe, DeepSeek's interleaved weights) or its
    # first half against its second (Llama and most Hugging Face families)
    rope_interleaved: bool = True
    # -- attention (mla): DeepSeek's latent attention; q_lora_rank 0 = q projected directly
    attention: AttentionKind = AttentionKind.standard
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
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
    shared_gate: bool = False  # scale the shared experts' output by sigmoid(x . g) (Qwen2-MoE)
    expert_impl: ExpertImpl = ExpertImpl.auto
    # BigMac-style low-dimensional exchange: project D -> exchange_dim before dispatch and back
    # after combine, so the all-to-all and the routed experts run at that width. 0 = off
    exchange_dim: int = 0
    tie_embeddings: bool = True

    def kv_heads(self) -> int:
        """Key/value heads of standard attention (n_kv_heads, 0 meaning n_heads)."""
        return self.n_kv_heads or self.n_heads

    def head_size(self) -> int:
        """Dims per head of standard attention (head_dim, 0 meaning d_model / n_heads)."""
        return self.head_dim or self.d_model // self.n_heads


@dataclass
class RouterConfig:
    """Defaults: router=topk, softmax top-2 with renormalised weights and the batch-level balance loss."""

    top_k: int = 2
    score_func: ScoreFunc = ScoreFunc.softmax
    renormalize: bool = True  # renormalise the top-k weights to sum to 1
    routed_scaling: float = 1.0  # DeepSeek-V3's routed scaling factor on the routed output
    n_groups: int = 1  # group-limited routing: experts split into n_groups groups ...
    topk_groups: int = 1  # ... of which each token may use topk_groups ...
    group_score: GroupScore = GroupScore.top2_sum  # ... the best by this score
    aux_loss: AuxLoss = AuxLoss.batch
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    bias_update_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3); 0 = off
    capacity_factor: float | None = None  # None = dropless
    drop_policy: DropPolicy = DropPolicy.position


@dataclass
class DataConfig:
    kind: DataKind = DataKind.stdlib
    path: str | None = None  # file or folder for text, a file for jsonl and bin, prepare's folder for tokens,
    # a save_to_disk folder, a parquet / arrow file or a folder of them for hf
    field: str = "text"  # the text's key in jsonl lines, its column in an hf dataset
    # text, jsonl and stdlib are tokenized by this tokenizer (a tokenizer.json, or a folder holding
    # one, such as a Hugging Face model's); None = bytes (vocab 256). With train.init_from it
    # defaults to the imported folder's own tokenizer.json. For tokens it is optional and must be the
    # one the shards were prepared with (checked by sha256): it decodes train.sample_bytes' samples
    tokenizer: str | None = None
    seq_len: int = 256
    val_fraction: float = 0.05
    # attention stays within each document packed into a window (a block-diagonal causal mask) and
    # positions restart per document (epmoe/model/documents.py); needs a boundary token (not bin)
    document_mask: bool = False


@dataclass
class FaultConfig:
    """Injected faults, for tests and drills (never set in a real run)."""

    kill_rank: int = -1  # this rank exits abruptly (os._exit) at the start of step `at_step`; -1 = never
    at_step: int = 0  # 1-based; only on the first attempt (torchrun restarts do not repeat the drill)
    # instead: kill_rank is SIGKILLed in the middle of saving the checkpoint of step at_step (its
    # own shard written, the checkpoint not yet complete)
    in_save: bool = False
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
    # a Hugging Face model folder (config.json + safetensors): the model and router come from its
    # config.json, the weights from its files (each rank reads only its own experts); step 0 otherwise
    init_from: str | None = None
    sample_bytes: int = 200  # tokens (bytes for byte-level data) of the text sampled at the end; 0 = off
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    # the peak FLOP/s of one device that MFU divides by, in TFLOP/s; 0 = known GPUs' data-sheet
    # peak (epmoe/train/throughput.py), or on CPU a short matmul probe at start
    peak_tflops: float = 0.0
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
    # recompute each transformer block's forward in backward instead of keeping its activations:
    # full, or selective (matmul and attention outputs kept); epmoe/parallel/activation_checkpointing.py
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none
    # torch.compile each transformer block (inductor; the MoE dispatch stays eager): epmoe/parallel/compile.py
    compile: bool = False
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
    # the wandb run's group and tags; a sweep sets them (the sweep directory; the job's swept values)
    wandb_group: str | None = None
    wandb_tags: list[str] = field(default_factory=list)
    tensorboard: bool = False  # event files in <run dir>/tensorboard (`tensorboard --logdir <run dir>`)
    # every N steps, keep the first `routing_trace_tokens` tokens' expert choices of every MoE
    # layer (rank 0); written to <run dir>/routing_trace.pt at the end. 0 = off
    routing_trace_every: int = 0
    routing_trace_tokens: int = 256


@dataclass
class ParallelConfig:
    """Parallel degrees; the world size comes from the launcher (torchrun's WORLD_SIZE)."""

    dp: int = 0  # data-parallel degree: 0 = the world size (every rank reads its own data)
    ep: int = 1  # expert-parallel degree: ranks that together hold one copy of the experts
    # FSDP2 (native engine): shard every non-expert weight over all ranks, and the experts over their
    # expert-DP group (world / ep ranks); a no-op in one process
    fsdp: bool = False


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
    # CPUs for each node's task (its torchrun and ranks); 0: nproc_per_node x max(train.threads, 1)
    cpus_per_task: int = 0
    # shell lines run before the ranks start (module load ..., source .venv/bin/activate)
    setup: list[str] = field(default_factory=list)
    signal_lead_s: int = 120  # SIGUSR1 this long before the time limit: the ranks save and stop
    requeue: bool = True  # a job stopped by its signal or preempted is requeued and resumes from its newest checkpoint
    submit: bool = False
    # torchrun (and Slurm's torchrun): how long the ranks may take to save after SIGTERM / SIGUSR1
    # before they are killed
    shutdown_timeout_s: int = 300


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
