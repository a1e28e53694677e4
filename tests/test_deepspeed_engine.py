"""train.engine=deepspeed against the native engine: the same losses and gradient norms at EP=2
(ZeRO 0, 1 and 2), checkpoints that switch engine on resume, non-finite steps, the launchers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epmoe.config import ConfigError
from epmoe.train.cli import load_config

from .conftest import REPO, TINY
from .ranks import spawn_jobs
from .test_expert_parallel import EP_TRAIN

RUN = [*TINY, *EP_TRAIN, "parallel.ep=2", "train.checkpoint_every=10", "logger.progress=false"]
ENGINES = {"native": [], **{f"zero{s}": ["train.engine=deepspeed", f"train.zero_stage={s}"] for s in (0, 1, 2)}}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# the resumes: (saved by, resumed by), from the saved run's step-10 checkpoint
RESUMES = [("zero2", "native"), ("native", "zero1")]


@pytest.fixture(scope="module")
def ep2_runs(tmp_path_factory: pytest.TempPathFactory, text_corpus_dir: Path) -> dict:
    """20 steps at EP=2 with each engine (checkpoints at steps 10 and 20), then each of RESUMES for
    10 steps: all in one spawned group of 2 ranks. {"dirs": engine -> run dir, "resumed": losses}."""
    root = tmp_path_factory.mktemp("engines")
    data = ["data=text", f"data.path={text_corpus_dir}"]
    jobs = [([*RUN, *data, *extra], root / name) for name, extra in ENGINES.items()]
    jobs += [([*RUN, *data, *ENGINES[by], f"train.resume={root / saved / 'checkpoints' / 'step_00000010'}"],
              root / f"{saved}-resumed-by-{by}") for saved, by in RESUMES]  # fmt: skip
    results = spawn_jobs(2, jobs)
    return {"dirs": {name: root / name for name in ENGINES},
            "resumed": {pair: r["losses"] for pair, r in zip(RESUMES, results[len(ENGINES):])}}  # fmt: skip


def test_deepspeed_losses_and_norms_match_the_native_engine_at_ep2(ep2_runs: dict) -> None:
    dirs = ep2_runs["dirs"]
    native = _records(dirs["native"])
    assert len(native) == 20 and native[-1]["loss"] < native[0]["loss"]
    assert max(r["grad_norm"] for r in native) > 1.0  # clipping (train.grad_clip=1) took part
    for name in ("zero0", "zero1", "zero2"):
        ds = _records(dirs[name])
        assert len(ds) == 20
        for a, b in zip(native, ds):
            assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), f"{name} step {a['step']}: {a} vs {b}"
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], f"{name} step {a['step']}"
        assert ds[-1]["val_loss"] == pytest.approx(native[-1]["val_loss"], rel=1e-4)


@pytest.mark.parametrize(("saved_by", "resumed_by"), RESUMES)
def test_a_checkpoint_resumes_under_the_other_engine_with_the_same_losses(
    saved_by: str, resumed_by: str, ep2_runs: dict
) -> None:
    uninterrupted = [r["loss"] for r in _records(ep2_runs["dirs"][saved_by])][10:]
    resumed = ep2_runs["resumed"][(saved_by, resumed_by)]
    assert len(resumed) == 10
    for step, (a, b) in enumerate(zip(uninterrupted, resumed), 11):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step}: {saved_by} {a} vs resumed by {resumed_by} {b}"


def test_deepspeed_under_torchrun_skips_an_injected_nan_step(tmp_path: Path, text_corpus: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "epmoe.launch", "launcher=torchrun", "launcher.nproc_per_node=2",
                           "parallel.ep=2", *TINY, "data=text", f"data.path={text_corpus}", "train.engine=deepspeed",
                           "train.zero_stage=2", "train.fault.nan_at_step=4", "train.on_nonfinite=skip",
                           f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "engine deepspeed (ZeRO 2)" in proc.stderr
    records = _records(run_dir)
    assert [r["step"] for r in records if r.get("skipped_nonfinite")] == [4]
    assert records[-1]["loss"] < records[0]["loss"] and all(r["grad_norm"] == r["grad_norm"] for r in records[4:])


def test_deepspeed_in_one_process_aborts_on_a_nan_with_the_last_good_state(tmp_path: Path, text_corpus: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "epmoe.train", *TINY, "data=text", f"data.path={text_corpus}",
                           "train.engine=deepspeed", "train.zero_stage=1", "train.fault.nan_at_step=4",
                           f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite training step 4 (loss nan") and "last good state (step 3)" in last
    assert (run_dir / "checkpoints" / "step_00000003" / "manifest.json").is_file()
    # ZeRO keeps parameters as views into flat buffers that also hold the experts; the
    # non-expert file must hold its own tensors' bytes only
    common = run_dir / "checkpoints" / "step_00000003" / "common.pt"
    state = torch.load(common, weights_only=True)
    tensor_bytes = sum(t.numel() * t.element_size() for part in ("model", "optimizer") for t in _tensors(state[part]))
    assert common.stat().st_size < 1.1 * tensor_bytes


def _tensors(tree: object) -> list[torch.Tensor]:
    if torch.is_tensor(tree):
        return [tree]
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, list | tuple) else []
    return [t for item in items for t in _tensors(item)]


def test_engine_settings_are_checked_before_anything_runs() -> None:
    with pytest.raises(ConfigError, match=r"^train.zero_stage \(1\) needs train.engine=deepspeed"):
        load_config(["train.zero_stage=1"])
    with pytest.raises(ConfigError, match=r"^train.zero_stage=3 is not one of 0, 1, 2$"):
        load_config(["train.engine=deepspeed", "train.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"^train.engine='zero' is not one of native, deepspeed$"):
        load_config(["train.engine=zero"])
    with pytest.raises(ConfigError, match=r"DeepSpeed's ZeRO partitions: use train.engine=native"):
        load_config(["train.engine=deepspeed", "parallel.ep=2", "placement=balanced", "placement.rebalance_every=5"])
