"""The training program end to end: CLI runs, outputs, resume, checkpoints, sweeps, errors."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from epmoe.model.transformer import Transformer
from epmoe.parallel.parallelize import Parallel
from epmoe.train import checkpoint_files
from epmoe.train.checkpoint_files import CheckpointError
from epmoe.train.cli import load_config
from epmoe.train.data import load_splits, sample_batch
from epmoe.train.engine import NativeEngine, lr_factor
from epmoe.train.step import lm_loss, train_step
from epmoe.train.trainer import train

from .conftest import TINY, run_cli


def _tiny(corpus: Path, *extra: str):
    return load_config([*TINY, "data=text", f"data.path={corpus}", *extra])


def test_cli_run_writes_metrics_plot_and_wandb_offline_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY, "logger=wandb", "logger.plots=true", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    assert len(records[-1]["expert_load"]) == 2 and len(records[-1]["expert_load"][0]) == 4
    # every routed choice is counted: batch 4 x seq 32 tokens x top-2
    assert sum(records[-1]["expert_load"][0]) == 4 * 32 * 2
    assert "val_bpb" in records[4] and "val_bpb" in records[9]
    assert (run_dir / "training.png").stat().st_size > 10_000
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))
    assert "held-out" in proc.stdout and "sample:" in proc.stdout


def test_cli_bad_override_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = run_cli("router.top_k=99", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: router.top_k (99) must be between 1 and model.num_experts (8)"
    proc = run_cli("router.unknown_key=1", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "unknown_key" in proc.stderr


def test_cli_missing_data_path_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = run_cli(*TINY, "data=text", f"data.path={tmp_path / 'absent'}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: data.path {tmp_path / 'absent'} does not exist"]


def test_multirun_sweep_runs_each_job_in_its_own_dir(tmp_path: Path) -> None:
    proc = run_cli("--multirun", *TINY, "router.top_k=1,2", "router.renormalize=false", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for job, top_k in [("0", 1), ("1", 2)]:
        records = [json.loads(line) for line in (tmp_path / job / "metrics.jsonl").read_text().splitlines()]
        assert sum(records[0]["expert_load"][0]) == 4 * 32 * top_k


def test_resume_continues_with_the_same_losses(tmp_path: Path, text_corpus: Path) -> None:
    full = train(_tiny(text_corpus, "train.steps=8", "train.checkpoint_every=4"), tmp_path / "full")
    mid = checkpoint_files.checkpoint_dir(tmp_path / "full") / "step_00000004"
    assert (mid / checkpoint_files.MANIFEST).is_file()
    resumed = train(_tiny(text_corpus, "train.steps=8", f"train.resume={mid}"), tmp_path / "resumed")
    assert len(resumed.losses) == 4
    for a, b in zip(full.losses[4:], resumed.losses):
        assert abs(a - b) <= 1e-6 * abs(a)
    assert resumed.val_loss == pytest.approx(full.val_loss, rel=1e-6)


def test_resume_from_run_dir_picks_the_newest_checkpoint(tmp_path: Path, text_corpus: Path) -> None:
    train(_tiny(text_corpus, "train.steps=6", "train.checkpoint_every=2"), tmp_path / "run")
    assert checkpoint_files.latest(tmp_path / "run").name == "step_00000006"
    assert not list(checkpoint_files.checkpoint_dir(tmp_path / "run").glob("*.tmp"))
    assert checkpoint_files.resolve(tmp_path / "run").name == "step_00000006"  # its checksums verify


def test_checkpoint_file_with_a_pickled_object_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "common.pt"
    torch.save({"model": {}, "payload": Path("/etc/passwd")}, bad)
    with pytest.raises(CheckpointError, match="cannot load checkpoint file .*common.pt"):
        checkpoint_files.load_file(bad)


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path, text_corpus: Path) -> None:
    result = train(_tiny(text_corpus, "train.steps=2", "train.eval_every=0", "train.sample_bytes=0"), tmp_path / "run")
    common = result.checkpoint / checkpoint_files.COMMON
    common.write_bytes(common.read_bytes()[: common.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="common.pt is truncated or altered"):
        checkpoint_files.resolve(result.checkpoint)
    with pytest.raises(CheckpointError, match="cannot load checkpoint file"):
        checkpoint_files.load_file(common)


def test_lr_schedule_warms_up_then_decays_to_min() -> None:
    cfg = load_config(["train.steps=100", "train.warmup_steps=10", "train.min_lr_ratio=0.1"]).train
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lr_factor(100, cfg) == pytest.approx(0.1)


def test_grad_accum_steps_on_the_mean_gradient_of_its_micro_batches(text_corpus: Path) -> None:
    cfg = _tiny(text_corpus, "train.grad_accum=2", "router.aux_loss=none", "router.z_loss_coef=0", "train.grad_clip=0")
    data = load_splits(cfg.data, 256)
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.router)
    reference = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = NativeEngine(model, cfg.train, Parallel.single(cfg.model.num_experts), torch.device("cpu"))
    engine.optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    record = train_step(engine, data, cfg, torch.device("cpu"), 0)

    losses = []
    for micro in range(2):
        x_BS, y_BS = sample_batch(data.train, cfg.train.batch_size, cfg.data.seq_len, cfg.train.seed, micro, 0)
        loss = lm_loss(reference(x_BS).logits_BSV, y_BS)
        (loss / 2).backward()
        losses.append(loss.item())
    assert record["loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)
    for name, p in reference.named_parameters():  # SGD with lr 1: new = old - mean gradient
        expected = before[name] - p.grad
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), expected, rtol=1e-5, atol=1e-6)


def test_moe_vs_dense_experiment_sweeps_both_models(tmp_path: Path, text_corpus: Path) -> None:
    proc = run_cli(
        "--multirun", "experiment=moe_vs_dense", "train=smoke", "train.steps=4", "data.seq_len=64",
        "data=text", f"data.path={text_corpus}", "logger.progress=false", "logger.plots=false",
        f"hydra.sweep.dir={tmp_path}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    moe, dense = ([json.loads(line) for line in (tmp_path / job / "metrics.jsonl").read_text().splitlines()]
                  for job in ("0", "1"))  # fmt: skip
    assert len(moe[-1]["expert_load"]) == 3  # moe_small: 4 layers, the first dense
    assert "expert_load" not in dense[-1]
    assert proc.stdout.count("held-out") == 2


def test_interrupt_saves_the_last_completed_step(tmp_path: Path, text_corpus: Path, monkeypatch) -> None:
    from epmoe.train import trainer

    real_step = trainer.train_step

    def interrupted_at_step_3(*args, **kwargs):
        if args[-1] == 3:  # the 4th step: steps 1-3 are done
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", interrupted_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(_tiny(text_corpus, "train.steps=8"), tmp_path / "run")
    assert checkpoint_files.latest(tmp_path / "run").name == "step_00000003"
    assert checkpoint_files.verify(checkpoint_files.latest(tmp_path / "run"))["step"] == 3


def test_routing_trace_holds_the_choices_the_load_metric_counted(tmp_path: Path, text_corpus: Path) -> None:
    from epmoe.train.routing_stats import load_trace

    cfg = _tiny(text_corpus, "logger.routing_trace_every=3", "logger.routing_trace_tokens=1000")
    result = train(cfg, tmp_path / "run")
    trace = load_trace(tmp_path / "run" / "routing_trace.pt")
    assert trace["steps"].tolist() == [3, 6, 9]
    assert tuple(trace["topk_idx_NYTK"].shape) == (3, 2, 4 * 32, 2)  # samples, MoE layers, all 128 tokens, top-2
    records = {r["step"]: r for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())}
    for n, step in enumerate(trace["steps"].tolist()):  # one micro-batch, one rank: the trace is the whole step
        for layer in range(2):
            counts = torch.bincount(trace["topk_idx_NYTK"][n, layer].long().flatten(), minlength=4)
            assert counts.tolist() == records[step]["expert_load"][layer]


def test_routing_counts_accumulate_then_start_a_new_window() -> None:
    from epmoe.train.routing_stats import RoutingCounts

    counts = RoutingCounts(num_layers=2, num_experts=3)
    # two tokens, top-1: token 0 goes 0 -> 2, token 1 goes 1 -> 2; then one token 2 -> 0
    counts.add(torch.tensor([[[0], [1]], [[2], [2]]]))
    counts.add(torch.tensor([[[2]], [[0]]]))
    stats = counts.take_global()  # one process: the global sum is the local one
    assert stats.load_YE.tolist() == [[1, 1, 1], [1, 0, 2]]
    assert stats.cooc_YEE[0].tolist() == [[0, 0, 1], [0, 0, 1], [1, 0, 0]]
    assert counts.take_global().load_YE.sum() == 0
