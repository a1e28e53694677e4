"""Everything about a run that can be checked before any rank starts.

The launcher calls `check` once, before it starts a rank; every rank calls it again (runs
started by `torchrun -m epmoe.train` directly skip the launcher). Each failure is one line
naming the value and the fix, raised as ConfigError, DataError or CheckpointError:
1. the data path is readable and not empty (token shards match their metadata), and data.tokenizer
   (the shards' tokenizer) loads and fits model.vocab_size;
2. the run directory is writable (its nearest existing folder), no other run holds it, and it
   holds no earlier run's checkpoints unless this run resumes them;
3. the resume target exists, its manifest is valid, and train.steps goes beyond its step; or
   train.init_from fits the configured model (a Hugging Face folder's tensors are exactly the
   model's, headers only; a checkpoint's manifest reads and has the model's architecture);
4. the model's parameters and optimizer state (and a rough share of activations) fit in the
   memory this node's ranks share;
5. the run directory's filesystem has room for one checkpoint of this model; train.threads
   does not exceed the cores.
The sizes come from the config alone (epmoe/model/size.py): nothing is built, so
`model.n_layers=100000000` is refused in milliseconds instead of growing until killed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from epmoe.config import Config, ConfigError, DataConfig
from epmoe.model.size import ParameterCounts, parameter_counts
from epmoe.train import checkpoint_files, run_lock
from epmoe.train.data import DataError, check_source, check_vocab
from epmoe.train.init_from import starting_point

GiB = 1 << 30
# bytes of training state per parameter: fp32 weight, fp32 gradient, AdamW's two fp32 moments
STATE_BYTES = 4 + 4 + 8
CHECKPOINT_BYTES = 4 + 8  # a checkpoint holds the weight and both moments


def check(cfg: Config, run_dir: Path, ranks_on_node: int, restart: int = 0, lock: bool = True) -> None:
    """Raise ConfigError / DataError / CheckpointError (one line each) for what cannot work on
    this machine. ranks_on_node: ranks that share this node's memory. restart > 0: a restarted
    job (torchrun, a Slurm requeue) continuing its own run directory. lock: check that no run
    holds the run directory (the ranks skip it: their rank 0 takes the lock itself)."""
    _check_data(cfg.data, cfg.model.vocab_size)
    _check_run_dir(Path(run_dir), resuming=bool(cfg.train.resume) or restart > 0, lock=lock)
    if cfg.train.resume:
        check_resume(cfg, Path(cfg.train.resume))
    elif cfg.train.init_from:
        starting_point(Path(cfg.train.init_from)).check(cfg)
    counts = parameter_counts(cfg.model, cfg.router)
    _check_memory(cfg, counts, ranks_on_node)
    _check_disk(Path(run_dir), counts)
    cores = os.cpu_count() or 1
    if cfg.train.threads > cores:
        raise ConfigError(f"train.threads ({cfg.train.threads}) exceeds this machine's {cores} CPU cores; lower it")


def check_resume(cfg: Config, target: Path) -> int:
    """The step the resume target `target` holds (its manifest read and validated, the checksums
    are rank 0's at start); raise if train.steps does not go beyond it."""
    step = checkpoint_files.readable(target)[1]["step"]
    if cfg.train.steps <= step:
        raise ConfigError(
            f"train.steps ({cfg.train.steps}) is not beyond the step of the checkpoint to resume ({step}, in "
            f"{target}): nothing would be trained and the checkpoint of step {cfg.train.steps} would be "
            f"overwritten; raise train.steps above {step}"
        )
    return step


def _check_data(d: DataConfig, vocab_size: int) -> None:
    check_vocab(d, vocab_size)  # a tokenizer (token shards' metadata) that loads and fits the model
    path = check_source(d)
    if path is None:
        return
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    if not files:
        raise DataError(f"data.path {path} is an empty folder; point it at the corpus")
    unreadable = [p for p in files if not os.access(p, os.R_OK)]
    if unreadable:
        raise DataError(f"data.path: {unreadable[0]} is not readable ({len(unreadable)} file(s)); check permissions")
    if all(p.stat().st_size == 0 for p in files):
        raise DataError(f"{path} holds no {'text' if d.kind != 'bin' else 'tokens'}")  # as the readers say


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _check_run_dir(run_dir: Path, resuming: bool, lock: bool) -> None:
    folder = _existing_ancestor(run_dir)
    if not folder.is_dir():
        raise ConfigError(f"run directory {run_dir}: {folder} is a file, not a folder; choose another hydra.run.dir")
    try:  # NOTE: a real write: os.access says yes to root even on a read-only filesystem
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".epmoe-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(
            f"run directory {run_dir} is not writable ({folder}: {e.strerror}); choose another hydra.run.dir"
        ) from None
    if folder != run_dir.absolute():
        return  # a new directory: nothing in it yet
    if lock:
        run_lock.check_free(run_dir)
    earlier = checkpoint_files.complete_checkpoints(checkpoint_files.checkpoint_dir(run_dir))
    if earlier and not resuming:
        raise ConfigError(
            f"run directory {run_dir} holds checkpoints of an earlier run (newest {earlier[-1].name}): "
            f"continue it with train.resume={run_dir}, or choose another hydra.run.dir"
        )


def _check_disk(run_dir: Path, counts: ParameterCounts) -> None:
    needed = counts.total * CHECKPOINT_BYTES
    free = shutil.disk_usage(_existing_ancestor(run_dir)).free
    if needed > free:
        raise ConfigError(
            f"one checkpoint of this model ({counts.total / 1e6:.1f}M parameters) needs ~{needed / GiB:.1f} GiB, "
            f"the run directory's filesystem has {free / GiB:.1f} GiB free; free space or choose another hydra.run.dir"
        )


def activation_bytes(cfg: Config) -> int:
    """A rough lower estimate of one rank's activations kept for backward, in bytes: per token,
    per layer ~16 model-width values (attention, norms, residuals) and the FFN's hidden
    values (3 per hidden unit of each routed choice, shared or dense FFN); the head's logits x3."""
    m, tokens = cfg.model, cfg.train.batch_size * cfg.data.seq_len
    moe_hidden = cfg.router.top_k * m.expert_hidden + m.n_shared_experts * m.shared_hidden
    ffn = max(m.dense_hidden, moe_hidden if m.num_experts else 0)
    per_token = m.n_layers * (16 * m.d_model + 3 * ffn) + 3 * m.vocab_size
    return tokens * per_token * 4


def state_bytes_per_rank(cfg: Config, counts: ParameterCounts) -> int:
    """Parameters, gradients and AdamW state one rank holds: every non-expert weight, and the
    experts of its slots (num_experts / ep, more with replicas)."""
    slots = cfg.placement.slots_per_rank or (cfg.model.num_experts // cfg.parallel.ep if cfg.model.num_experts else 0)
    expert_share = counts.expert * slots // max(cfg.model.num_experts, 1)
    return (counts.non_expert + expert_share) * STATE_BYTES


def _available_bytes(device: str) -> tuple[int, str]:
    """(bytes free for one rank's model state, what they are) on this node."""
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, "on one GPU"
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(meminfo["MemAvailable"].split()[0]) * 1024, "available on this node"
    except (OSError, KeyError, ValueError):  # not Linux: the check needs MemAvailable
        return 1 << 62, "unknown"


def _check_memory(cfg: Config, counts: ParameterCounts, ranks_on_node: int) -> None:
    state, activations = state_bytes_per_rank(cfg, counts), activation_bytes(cfg)
    available, where = _available_bytes(str(cfg.train.device))
    per_gpu = where == "on one GPU"
    needed = state + activations if per_gpu else (state + activations) * ranks_on_node
    if needed > available:
        ranks = "" if per_gpu else f" x {ranks_on_node} rank(s) on this node"
        raise ConfigError(
            f"this run needs ~{state / GiB:,.1f} GiB for parameters and optimizer state and ~{activations / GiB:,.1f} "
            f"GiB for activations per rank{ranks}, {available / GiB:,.1f} GiB {where}; lower model.n_layers / "
            "model.d_model / train.batch_size / data.seq_len, or raise parallel.ep"
        )
