"""Sharded checkpoints: exact resume at the saved and at other EP degrees, faults, the CLI.

One EP=2 run (2 gloo ranks, 20 steps, redundant re-placement every 4 steps: 5 slots per rank for
8 experts, so 2 replicas; checkpoints at steps 10 and 20) is the reference; resumes from its
step-10 checkpoint must continue with its losses at EP=2, EP=1 (one process, the same global
batch) and EP=4 (4 ranks).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from epmoe.durable import sha256_file
from epmoe.model.transformer import Transformer
from epmoe.train import checkpoint_files, checkpoint_state
from epmoe.train.checkpoint_files import CheckpointError, CheckpointWarning
from epmoe.train.cli import load_config
from epmoe.train.trainer import train

from .conftest import REPO, TINY, free_port

STEPS = ["train.steps=20", "train.eval_every=10", "train.sample_bytes=0", "logger.console=false"]
ROUTER = ["router.aux_loss=batch", "router.aux_loss_coef=0.01", "router.bias_update_rate=0.01"]
REPLACE = ["placement=redundant", "placement.rebalance_every=4", "placement.slots_per_rank=5"]


def _worker(rank: int, world: int, port: int, overrides: list[str], run_dir: str, out: str, sigint_step: int) -> None:
    """One rank of a training run; rank 1 sends itself SIGINT before step `sigint_step` (-1: never)."""
    from epmoe.comm.process import end_process
    from epmoe.train import trainer

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    real_step = trainer.train_step

    def step_with_ctrl_c(*args, **kwargs):
        if rank == 1 and args[4] == sigint_step:  # train_step(engine, data, cfg, device, step)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C on one rank only
        return real_step(*args, **kwargs)

    trainer.train_step = step_with_ctrl_c
    try:
        result = trainer.train(load_config(overrides), Path(run_dir))
        record = {"losses": result.losses, "val": result.val_loss}
    except KeyboardInterrupt:
        record = {"interrupted": True}
    Path(f"{out}.{rank}").write_text(json.dumps(record))
    end_process(0)  # as the rank entry point ends (see end_process)


def _spawn(world: int, overrides: list[str], run_dir: Path, sigint_step: int = -1) -> list[dict]:
    out = run_dir.parent / f"{run_dir.name}.json"
    mp.spawn(_worker, args=(world, free_port(), overrides, str(run_dir), str(out), sigint_step), nprocs=world)
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (folder / f"doc_{i:02d}.txt").write_text("".join(f"def f_{i}_{j}(x):\n    return x * {j}\n" for j in range(30)))
    return folder


def _base(corpus: Path) -> list[str]:
    return [*TINY, "data=text", f"data.path={corpus}", "model.num_experts=8", *STEPS, *ROUTER]


@pytest.fixture(scope="module")
def ep2_run(corpus: Path, tmp_path_factory) -> tuple[Path, dict]:
    """The uninterrupted EP=2 reference run; checkpoints at steps 10 and 20."""
    run_dir = tmp_path_factory.mktemp("ep2") / "run"
    overrides = [*_base(corpus), *REPLACE, "parallel.ep=2", "train.batch_size=2", "train.checkpoint_every=10"]
    return run_dir, _spawn(2, overrides, run_dir)[0]


def _moves(run_dir: Path) -> list[dict]:
    """The re-placement records of a run: step, imbalance under the old and new map, bytes moved."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "placement_imbalance_old", "placement_imbalance_new", "placement_bytes_moved")
    return [{k: r[k] for k in keys} for r in records if "placement_bytes_moved" in r]


@pytest.mark.parametrize(("world", "batch"), [(2, 2), (1, 4), (4, 1)], ids=["ep2", "ep1", "ep4"])
def test_resume_at_another_ep_continues_the_uninterrupted_losses(
    world: int, batch: int, ep2_run: tuple[Path, dict], corpus: Path, tmp_path: Path
) -> None:
    ref_dir, ref = ep2_run
    ckpt = checkpoint_files.checkpoint_dir(ref_dir) / "step_00000010"
    overrides = [*_base(corpus), f"parallel.ep={world}", f"train.batch_size={batch}", f"train.resume={ckpt}"]
    if world > 1:
        overrides += REPLACE
        resumed = _spawn(world, overrides, tmp_path / "run")[0]
    else:  # one process: every expert's rows come from both EP=2 shard files
        # (the placement too is the checkpoint's unless named: one process has no spare slots)
        result = train(load_config([*overrides, "placement=contiguous"]), tmp_path / "run")
        resumed = {"losses": result.losses, "val": result.val_loss}
    assert len(resumed["losses"]) == 10
    for step, (a, b) in enumerate(zip(ref["losses"][10:], resumed["losses"]), 11):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step}: uninterrupted {a} vs resumed at world {world} {b}"
    assert resumed["val"] == pytest.approx(ref["val"], rel=1e-5)
    if world == 2:  # the saved placement and routing window came back: the same re-placements follow
        later = [m for m in _moves(ref_dir) if m["step"] > 10]
        assert [m["step"] for m in later] == [12, 16] and _moves(tmp_path / "run") == later


def test_truncated_latest_checkpoint_is_skipped_with_a_warning(ep2_run: tuple[Path, dict], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(checkpoint_files.checkpoint_dir(ep2_run[0]), checkpoint_files.checkpoint_dir(run))
    bad = checkpoint_files.checkpoint_dir(run) / "step_00000020" / "experts_rank1.pt"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # a crash mid-file
    with pytest.warns(CheckpointWarning, match=r"skipping checkpoint .*step_00000020: .*experts_rank1.pt is trunc"):
        assert checkpoint_files.resolve(run).name == "step_00000010"
    with pytest.raises(CheckpointError, match="experts_rank1.pt is truncated"):  # named explicitly: no fallback
        checkpoint_files.resolve(bad.parent)
    proc = _cli("verify", str(run))
    assert proc.returncode == 1 and "experts_rank1.pt is truncated" in proc.stderr


def test_checkpoint_with_a_pickled_object_is_refused(ep2_run: tuple[Path, dict], corpus: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints" / "step_00000010"
    shutil.copytree(checkpoint_files.checkpoint_dir(ep2_run[0]) / "step_00000010", ckpt)
    common = checkpoint_files.load_file(ckpt / checkpoint_files.COMMON)
    common["rng"] = {"torch": Path("/etc/passwd")}  # not a tensor, a container or a number
    torch.save(common, ckpt / checkpoint_files.COMMON)
    manifest = json.loads((ckpt / checkpoint_files.MANIFEST).read_text())  # checksums that match: it verifies
    manifest["files"][checkpoint_files.COMMON] = {"sha256": sha256_file(ckpt / checkpoint_files.COMMON),
                                            "bytes": (ckpt / checkpoint_files.COMMON).stat().st_size}  # fmt: skip
    (ckpt / checkpoint_files.MANIFEST).write_text(json.dumps(manifest))
    checkpoint_files.verify(ckpt)
    cfg = load_config([*_base(corpus), "train.batch_size=4", "parallel.ep=1", "placement=contiguous",
                       f"train.resume={tmp_path}"])  # fmt: skip
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint file .*common.pt: .*[Ww]eights only"):
        train(cfg, tmp_path / "run")


def test_keep_checkpoints_prunes_only_after_a_newer_one_is_complete(corpus: Path, tmp_path: Path) -> None:
    cfg = load_config([*_base(corpus), "train.steps=7", "train.checkpoint_every=2", "train.keep_checkpoints=2"])
    result = train(cfg, tmp_path / "run")
    folder = checkpoint_files.checkpoint_dir(tmp_path / "run")
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000006", "step_00000007"]  # 7: the final save
    assert result.checkpoint == folder / "step_00000007"
    with pytest.raises(Exception, match="keep_checkpoints"):
        load_config([*_base(corpus), "train.keep_checkpoints=-1"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epmoe.train.checkpoint_cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_cli_inspect_verify_consolidate(ep2_run: tuple[Path, dict], corpus: Path, tmp_path: Path) -> None:
    ckpt = checkpoint_files.checkpoint_dir(ep2_run[0]) / "step_00000010"
    proc = _cli("inspect", str(ckpt))
    assert proc.returncode == 0, proc.stderr
    assert "step 10" in proc.stdout and "world 2, ep 2" in proc.stdout and "experts_rank1.pt" in proc.stdout
    proc = _cli("verify", str(ep2_run[0]))  # a run dir: its newest checkpoint
    assert proc.returncode == 0 and "step_00000020" in proc.stdout and "sha256 verified" in proc.stdout
    proc = _cli("consolidate", str(ckpt), str(tmp_path / "model.pt"))
    assert proc.returncode == 0, proc.stderr
    proc = _cli("verify", str(tmp_path / "absent"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1

    # the exported model computes what the single-process run computes after the same 10 steps
    cfg = load_config([*_base(corpus), "train.batch_size=4", "train.checkpoint_every=10", "train.eval_every=0"])
    train(cfg, tmp_path / "single")  # the same LR schedule (20 steps) as the EP=2 run
    single = Transformer(cfg.model, cfg.router)
    single_ckpt = checkpoint_files.checkpoint_dir(tmp_path / "single") / "step_00000010"
    single.load_state_dict(checkpoint_state.consolidate(single_ckpt))
    exported = Transformer(cfg.model, cfg.router)
    exported.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    x_BS = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(x_BS).logits_BSV, single(x_BS).logits_BSV, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(exported.blocks[1].ffn.router.expert_bias_E, single.blocks[1].ffn.router.expert_bias_E)


def test_ctrl_c_on_one_rank_saves_on_all_ranks_after_the_same_step(corpus: Path, tmp_path: Path) -> None:
    overrides = [*_base(corpus), "parallel.ep=2", "train.batch_size=2"]
    records = _spawn(2, overrides, tmp_path / "run", sigint_step=3)  # rank 1 gets Ctrl-C during step 4
    assert records == [{"interrupted": True}] * 2
    ckpt = checkpoint_files.latest(tmp_path / "run")
    assert ckpt.name == "step_00000004"
    assert checkpoint_files.verify(ckpt)["step"] == 4
