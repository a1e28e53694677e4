"""Errors found early: what preflight.check refuses before anything is built, in one line each.

The sizes it checks come from epmoe/model/size.py, tested here against the built model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from epmoe.config import ConfigError, ModelConfig, RouterConfig
from epmoe.model.moe import moe_layers
from epmoe.model.size import parameter_counts
from epmoe.model.transformer import Transformer
from epmoe.train import preflight
from epmoe.train.cli import load_config
from epmoe.train.data import DataError
from epmoe.train.run_lock import RunLock

from .conftest import REPO, TINY


@pytest.mark.parametrize(
    "model",
    [
        ModelConfig(),  # moe_small: a dense first layer, a shared expert, tied head
        ModelConfig(num_experts=0),
        ModelConfig(n_layers=5, first_dense_layers=0, moe_every=2, n_shared_experts=0),
        ModelConfig(tie_embeddings=False, exchange_dim=32, first_dense_layers=2),
    ],
    ids=["moe_small", "dense", "every_other", "untied_exchange_dim"],
)
def test_parameter_counts_match_the_built_model(model: ModelConfig) -> None:
    built = Transformer(model, RouterConfig())
    expert = sum(p.numel() for moe in moe_layers(built) for p in moe.experts.stacked_weights().values())
    counts = parameter_counts(model, RouterConfig())
    assert (counts.non_expert, counts.expert) == (sum(p.numel() for p in built.parameters()) - expert, expert)


def test_parameter_counts_of_a_huge_model_without_building_it() -> None:
    # moe_small with 10^8 layers: 10^8 - 1 MoE layers of 8 experts x 3 x 256 x 256 weights
    counts = parameter_counts(ModelConfig(n_layers=100_000_000), RouterConfig())
    assert counts.expert == (100_000_000 - 1) * 8 * 3 * 256 * 256


def _cfg(corpus: Path, *extra: str):
    return load_config([*TINY, "data=text", f"data.path={corpus}", *extra])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["model.n_layers=100000000"], r"needs ~[\d,.]+ GiB for parameters and optimizer state and ~[\d,.]+ GiB for "
                                       r"activations per rank x 1 rank\(s\) on this node, [\d,.]+ GiB available"),
        (["train.batch_size=100000000"], r"~0\.0 GiB for parameters and optimizer state and ~[\d,]+\.\d GiB for act"),
        (["train.threads=100000"], rf"train.threads \(100000\) exceeds this machine's {os.cpu_count()} CPU cores"),
    ],
    ids=["layers", "batch", "threads"],
)
def test_what_this_machine_cannot_run_is_refused(extra: list[str], message: str, text_corpus_dir: Path,
                                                 tmp_path: Path) -> None:  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        preflight.check(_cfg(text_corpus_dir, *extra), tmp_path / "run", ranks_on_node=1)


def test_the_memory_estimate_counts_every_rank_of_the_node(text_corpus_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(text_corpus_dir)
    per_rank = preflight.state_bytes_per_rank(cfg, parameter_counts(cfg.model, cfg.router))
    available, _ = preflight._available_bytes("cpu")
    preflight.check(cfg, tmp_path / "run", ranks_on_node=1)  # the tiny model fits
    with pytest.raises(ConfigError, match=r"x 10000000000 rank\(s\) on this node"):
        preflight.check(cfg, tmp_path / "run", ranks_on_node=10_000_000_000)
    assert per_rank * 10_000_000_000 > available


def test_an_unwritable_run_directory_is_found_before_training(text_corpus_dir: Path, tmp_path: Path) -> None:
    # /proc refuses new files to everyone, root included (a chmod would not stop root)
    with pytest.raises(ConfigError, match=r"run directory /proc/1/epmoe-run is not writable \(/proc/1: "):
        preflight.check(_cfg(text_corpus_dir), Path("/proc/1/epmoe-run"), ranks_on_node=1)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"is a file, not a folder"):
        preflight.check(_cfg(text_corpus_dir), tmp_path / "file" / "run", ranks_on_node=1)


def test_a_run_directory_with_an_earlier_runs_checkpoints_needs_resume(text_corpus_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "checkpoints" / "step_00000004" / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match=rf"holds checkpoints of an earlier run \(newest step_00000004\): "
                                          rf"continue it with train.resume={run}"):  # fmt: skip
        preflight.check(_cfg(text_corpus_dir), run, ranks_on_node=1)
    preflight.check(_cfg(text_corpus_dir), run, ranks_on_node=1, restart=1)  # a restart continues it


def test_a_locked_run_directory_is_refused_naming_the_holder(text_corpus_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    lock = RunLock(run)
    with pytest.raises(ConfigError, match=rf"run directory {run} is in use by another run \(pid {os.getpid()} on "):
        preflight.check(_cfg(text_corpus_dir), run, ranks_on_node=1)
    preflight.check(_cfg(text_corpus_dir), run, ranks_on_node=1, lock=False)  # ranks leave the lock to rank 0
    lock.release()
    preflight.check(_cfg(text_corpus_dir), run, ranks_on_node=1)


def test_empty_or_unreadable_data_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is an empty folder"):
        preflight.check(load_config([*TINY, "data=text", f"data.path={tmp_path / 'empty'}"]), tmp_path / "r", 1)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    with pytest.raises(DataError, match=f"{tmp_path / 'blank'} holds no text"):
        preflight.check(load_config([*TINY, "data=text", f"data.path={tmp_path / 'blank'}"]), tmp_path / "r", 1)


def test_the_rank_entry_point_refuses_a_huge_model_at_once_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "epmoe.train", "model.n_layers=100000000",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: this run needs ~")
