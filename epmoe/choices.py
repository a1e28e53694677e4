"""The fixed value sets of config fields, as str-valued Enums: each set of names lives here once.

`epmoe/config.py` types its fields with them; the registries keyed on them (e.g.
`epmoe.placement.policies.PLACEMENTS`) are checked against them at import.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """One of a config field's fixed values. It is its string: it compares equal to, hashes
    and formats as the value (`f"{x}"` gives "pipelined"), as `enum.StrEnum` does from
    Python 3.11 on. OmegaConf reads a YAML or command-line string by member *name*, so every
    member's name is its value."""

    __str__ = str.__str__
    __format__ = str.__format__


class Activation(Choice):
    swiglu = "swiglu"
    gelu = "gelu"


class ExpertImpl(Choice):
    auto = "auto"
    grouped = "grouped"
    loop = "loop"  # the kept reference path
    fused = "fused"


class AttentionKind(Choice):
    standard = "standard"  # multi-head / grouped-query attention (Llama, Qwen, Mixtral, OLMoE)
    mla = "mla"  # DeepSeek-V2/V3 multi-head latent attention


class QKNorm(Choice):
    none = "none"
    head = "head"  # RMSNorm over each head's dims, shared by the heads (Qwen3)
    full = "full"  # RMSNorm over the whole q and the whole k projection (OLMoE)


class GroupScore(Choice):
    top2_sum = "top2_sum"  # a group scores the sum of its two best experts (DeepSeek-V3)
    max = "max"  # ... its best expert (DeepSeek-V2)


class Family(Choice):
    """Which Hugging Face model family a model is (epmoe/hf adapters); epmoe = a native model."""

    epmoe = "epmoe"
    mixtral = "mixtral"
    qwen2_moe = "qwen2_moe"
    qwen3_moe = "qwen3_moe"
    olmoe = "olmoe"
    deepseek_v3 = "deepseek_v3"
    llama = "llama"
    qwen3 = "qwen3"


class ScoreFunc(Choice):
    softmax = "softmax"
    sigmoid = "sigmoid"


class AuxLoss(Choice):
    none = "none"
    batch = "batch"  # Switch/GShard
    sequence = "sequence"  # DeepSeek-V3


class DropPolicy(Choice):
    position = "position"
    probability = "probability"


class DataKind(Choice):
    stdlib = "stdlib"
    text = "text"
    jsonl = "jsonl"
    bin = "bin"
    tokens = "tokens"  # token shards written by `python -m epmoe.data prepare`
    hf = "hf"  # a local Hugging Face dataset (save_to_disk folder, parquet or arrow files)


class Precision(Choice):
    fp32 = "fp32"
    bf16 = "bf16"  # autocast


class Device(Choice):
    auto = "auto"  # cuda if present, else cpu
    cpu = "cpu"
    cuda = "cuda"


class OnNonfinite(Choice):
    skip = "skip"
    abort = "abort"


class EngineName(Choice):
    native = "native"
    deepspeed = "deepspeed"


class ActivationCheckpointing(Choice):
    none = "none"  # every activation kept for backward
    full = "full"  # every block's forward recomputed in backward
    selective = "selective"  # recomputed too, but the matmul and attention outputs are kept


class WandbMode(Choice):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class PlacementName(Choice):
    """The keys of `epmoe.placement.policies.PLACEMENTS`."""

    contiguous = "contiguous"
    round_robin = "round_robin"
    balanced = "balanced"
    affinity = "affinity"
    redundant = "redundant"


class CommBackend(Choice):
    torch = "torch"
    mpi = "mpi"


class DispatcherName(Choice):
    alltoall = "alltoall"
    pipelined = "pipelined"


class WireDtype(Choice):
    fp32 = "fp32"
    bf16 = "bf16"


class LauncherName(Choice):
    local = "local"
    torchrun = "torchrun"
    deepspeed = "deepspeed"
    mpirun = "mpirun"
    slurm = "slurm"
