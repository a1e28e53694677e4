"""FSDP2 beside expert parallelism (parallel.fsdp=true) on CPU/gloo: spawned ranks train with the
same losses as one process on the same global batch, hold about 1/world of each non-expert
weight, and checkpoint their non-expert shards with torch.distributed.checkpoint (each rank its
own), resharded on load across (world, ep, fsdp) both ways. Every multi-rank case is tiny
(threads=1), and a spawned group runs several jobs, so the file runs in about two minutes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from epmoe.comm.parallel_dims import ParallelDims
from epmoe.config import ConfigError
from epmoe.parallel.fsdp import summary as fsdp_summary
from epmoe.parallel.fsdp import whole_experts_reason
from epmoe.train import checkpoint_files
from epmoe.train.cli import load_config
from epmoe.train.trainer import train

from .conftest import TINY, free_port
from .ranks import spawn_jobs, spawn_train

FSDP_TRAIN = ["router.aux_loss_coef=0.01", "router.bias_update_rate=0.01", "train.batch_size=2",
              "train.eval_every=0", "train.sample_bytes=0", "model.num_experts=8", "train.threads=1",
              "train.grad_clip=0.5"]  # fmt: skip


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)


def _base(corpus: Path, steps: int) -> list[str]:
    return [*TINY, "data=text", f"data.path={corpus}", *FSDP_TRAIN, f"train.steps={steps}"]


def _assert_same(reference: list[float], other: list[float], what: str) -> None:
    assert len(reference) == len(other)
    for step, (a, b) in enumerate(zip(reference, other), 1):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step}: one process {a} vs {what} {b}"


# (world, ep, dispatcher, steps, grad_accum, precision) of each equivalence case
CASES = {"w2ep2": (2, 2, "alltoall", 20, 1, "fp32"), "w2ep2-pipelined": (2, 2, "pipelined", 20, 1, "fp32"),
         "w2ep2-bf16": (2, 2, "alltoall", 5, 1, "bf16"), "w4ep2-experts-sharded": (4, 2, "alltoall", 10, 1, "fp32"),
         "w4ep2-accum2": (4, 2, "alltoall", 5, 2, "fp32"),
         "w4ep2-pipelined-experts-whole": (4, 2, "pipelined", 10, 1, "fp32"),
         "w4ep2-replicas-experts-whole": (4, 2, "alltoall", 10, 1, "fp32")}  # fmt: skip
# beyond parallelism, what a case's FSDP run adds (placement never changes the math: one process has none)
REPLICAS = ["placement=redundant", "placement.slots_per_rank=5", "placement.rebalance_every=4"]
PLACEMENT = {"w4ep2-replicas-experts-whole": REPLICAS}
# bf16: FSDP2 gathers the weights in bf16 (8 significand bits: a rounding of up to 2^-9 relative),
# so every matmul input is rounded as under the one-process run's autocast, but FSDP also rounds the
# norms' weights and the residual stream, which autocast keeps in fp32; each step's loss then
# differs by a few roundings of the logits: BF16_REL = 4 x 2^-9 ~ 8e-3 relative
BF16_REL = 4 * 2**-9


def _case_base(corpus: Path, case: str) -> list[str]:
    _, _, _, steps, accum, precision = CASES[case]
    return [*_base(corpus, steps), f"train.grad_accum={accum}", f"train.precision={precision}"]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory, text_corpus_dir: Path) -> dict[str, dict]:
    """Every case's FSDP run: one spawned group per world size runs its cases in turn."""
    root, results = tmp_path_factory.mktemp("fsdp"), {}
    for world in (2, 4):
        names = [name for name, (w, *_) in CASES.items() if w == world]
        jobs = [([*_case_base(text_corpus_dir, name), f"parallel.ep={CASES[name][1]}", "parallel.fsdp=true",
                  f"comm.dispatcher={CASES[name][2]}", *PLACEMENT.get(name, [])], root / name)
                for name in names]  # fmt: skip
        results.update(zip(names, spawn_jobs(world, jobs)))
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_training_matches_one_process_losses(
    case: str, fsdp_runs: dict[str, dict], tmp_path: Path, text_corpus_dir: Path
) -> None:
    """accum 2: the first micro-batch's backward does not reduce-scatter (gradient_sync), the
    second reduces both: the same update as one process's two micro-batches. bf16: FSDP2's mixed
    precision (bf16 weights in forward and backward, fp32 reductions and master weights) against
    the one-process bf16 autocast run, within BF16_REL."""
    world, ep, dispatcher, _, _, precision = CASES[case]
    single = train(load_config([*_case_base(text_corpus_dir, case), f"train.batch_size={2 * world}"]),
                   tmp_path / "single")  # fmt: skip
    result = fsdp_runs[case]
    assert result["losses"][-1] < result["losses"][0]
    what = f"fsdp world {world} ep {ep} {dispatcher} {precision}"
    if precision == "bf16":
        worst = max(abs(a - b) / abs(a) for a, b in zip(single.losses, result["losses"]))
        assert 0 < worst <= BF16_REL, f"{what}: relative loss difference {worst:.2e}"  # 0: bf16 weights really used
        return
    _assert_same(single.losses, result["losses"], what)
    assert result["val"] == pytest.approx(single.val_loss, rel=1e-5)


def _shard_worker(rank: int, world: int, port: int, ep: int, out: str) -> None:
    from torch.distributed.tensor import DTensor

    from epmoe.comm.process import end_process
    from epmoe.model.moe import moe_layers
    from epmoe.model.transformer import Transformer
    from epmoe.parallel.parallelize import parallelize

    _env(rank, world, port)
    cfg = load_config([*TINY, "model.num_experts=8", f"parallel.ep={ep}", "parallel.fsdp=true"])
    torch.manual_seed(0)
    full = {n: p.numel() for n, p in Transformer(cfg.model, cfg.router).named_parameters()}
    model = Transformer(cfg.model, cfg.router)
    parallelize(model, cfg, torch.device("cpu"))
    experts = {id(p) for moe in moe_layers(model) for p in moe.experts.stacked_weights().values()}
    record = {}
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        record[name] = {"expert": id(p) in experts, "dtensor": isinstance(p, DTensor), "local": local.numel(),
                        "full": full[name]}  # fmt: skip
    Path(f"{out}.{rank}").write_text(json.dumps(record))
    end_process(0)


@pytest.mark.parametrize(("world", "ep"), [(2, 2), (4, 2)])
def test_fsdp_holds_a_shard_of_each_non_expert_weight(world: int, ep: int, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    mp.spawn(_shard_worker, args=(world, free_port(), ep, str(out)), nprocs=world)
    records = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
    for name, first in records[0].items():
        locals_ = [rec[name]["local"] for rec in records]
        if not first["expert"]:  # sharded over all ranks: dim 0 cut in world pieces (the last may be short)
            assert first["dtensor"], name
            assert sum(locals_) == first["full"] and max(locals_) <= -(-first["full"] // world) + first["full"] // 8
        elif world == ep:  # expert-DP 1: this rank's experts stay whole, plain tensors
            assert not first["dtensor"] and locals_ == [first["full"] // ep] * world, name
        else:  # this rank's experts, sharded over the expert-DP group of world / ep ranks
            assert first["dtensor"] and locals_ == [first["full"] // world] * world, name


def _step(run_dir: Path, step: int) -> Path:
    return checkpoint_files.checkpoint_dir(run_dir) / f"step_{step:08d}"


def test_fsdp_checkpoints_reshard_across_world_ep_and_fsdp_both_ways(tmp_path: Path, text_corpus_dir: Path) -> None:
    """Saved at world 4 / EP 4 / FSDP (each rank writing its own shards of the non-expert state:
    dense/, nothing gathered), resumed at world 2 / EP 2 without FSDP and in one process; and the
    reverse: saved by one process and at world 2 / EP 2 without FSDP, resumed at world 4 / EP 4 /
    FSDP. Every resumed run's losses equal the uninterrupted one-process run's."""
    base = [*_base(text_corpus_dir, 15), "train.checkpoint_every=5"]
    single = train(load_config([*base, "train.batch_size=8"]), tmp_path / "single")
    w4 = [*base, "parallel.ep=4", "parallel.fsdp=true"]
    w2 = [*base, "train.batch_size=4", "parallel.ep=2", "parallel.fsdp=false"]
    resume_single = [*w4, f"train.resume={_step(tmp_path / 'single', 5)}"]
    fsdp, from_single = spawn_jobs(4, [(w4, tmp_path / "w4"), (resume_single, tmp_path / "w4b")])
    _assert_same(single.losses, fsdp["losses"], "world 4 ep 4 fsdp")
    _assert_same(single.losses[5:], from_single["losses"], "world 4 fsdp resumed from one process")

    ckpt = _step(tmp_path / "w4", 5)
    manifest = checkpoint_files.verify(ckpt)
    assert manifest["dense"] == {"format": "torch.distributed.checkpoint", "folder": "dense"}
    shard_bytes = [manifest["files"][f"dense/__{r}_0.distcp"]["bytes"] for r in range(4)]
    assert max(shard_bytes) < 0.3 * sum(shard_bytes)  # each rank wrote about a quarter
    common = checkpoint_files.load_file(ckpt / checkpoint_files.COMMON)
    assert "model" not in common and "state" not in common["optimizer"]  # nothing gathered onto rank 0

    (from_fsdp,) = spawn_jobs(2, [([*w2, f"train.resume={ckpt}"], tmp_path / "w2")])
    _assert_same(single.losses[5:], from_fsdp["losses"], "world 2 without fsdp resumed from world 4 fsdp")
    one = [*base, "train.batch_size=8", "parallel.ep=1", "parallel.fsdp=false", f"train.resume={ckpt}"]
    alone = train(load_config(one), tmp_path / "alone")
    _assert_same(single.losses[5:], alone.losses, "one process resumed from world 4 fsdp")
    (from_w2,) = spawn_jobs(4, [([*w4, f"train.resume={_step(tmp_path / 'w2', 10)}"], tmp_path / "w4c")])
    _assert_same(single.losses[10:], from_w2["losses"], "world 4 fsdp resumed from world 2 without fsdp")
    assert from_w2["val"] == pytest.approx(single.val_loss, rel=1e-5)


def test_fsdp_refuses_deepspeed_in_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_config([*TINY, "model.num_experts=4", "parallel.ep=2", "parallel.fsdp=true", "train.engine=deepspeed"])
    assert "DeepSpeed's ZeRO already shards; use train.engine=native with parallel.fsdp=true" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("world", "ep", "overrides", "says"),
    [
        (4, 2, [], "fsdp: non-expert weights sharded over 4 ranks, each rank's experts over their expert-DP group "
                   "(2 ranks)"),
        (4, 2, ["comm.dispatcher=pipelined"], "fsdp: non-expert weights sharded over 4 ranks; each rank's experts kept "
         "whole and their gradients all-reduced over expert-DP (2 ranks), as without FSDP: the pipelined dispatcher "
         "(comm.dispatcher=pipelined) differentiates them chunk by chunk itself"),
        (4, 2, ["placement=balanced", "placement.rebalance_every=4"], "as without FSDP: re-placement "
         "(placement=balanced) moves whole experts with their optimizer state"),
        (4, 2, REPLICAS, "as without FSDP: replicas (placement=redundant) moves whole experts"),
        (2, 2, REPLICAS, "fsdp: non-expert weights sharded over 2 ranks; each rank's experts whole (parallel.ep = "
                         "world size)"),
        (4, 1, [], "fsdp: every weight sharded over 4 ranks"),
    ],
)  # fmt: skip
def test_the_header_says_what_fsdp_shards_and_why_experts_stay_whole(world: int, ep: int, overrides: list[str],
                                                                     says: str) -> None:  # fmt: skip
    """Where expert-DP > 1 could cut the experts but the pipelined dispatcher, replicas or
    re-placement need them whole, they stay whole and the run's header line says why."""
    cfg = load_config([*TINY, "model.num_experts=8", f"parallel.ep={ep}", "parallel.fsdp=true", *overrides])
    dims = ParallelDims(world=world, dp=world, ep=ep, num_experts=8)
    line = fsdp_summary(dims, whole_experts_reason(cfg, dims))
    assert says in line and "\n" not in line, line


def test_fsdp_with_replicas_and_replacement_equals_one_process_and_resumes(
    tmp_path: Path, text_corpus_dir: Path
) -> None:
    """World 2 / EP 2 with FSDP2 (experts whole on each rank) and redundant re-placement every 4
    steps (5 slots per rank for 4 experts each: replicas, moved with their AdamW state): 12 steps
    equal one process's; resumed from its step-8 checkpoint (replicas in the saved placement) the
    last 4 losses do too."""
    base = [*_base(text_corpus_dir, 12), "train.checkpoint_every=8"]
    single = train(load_config([*base, "train.batch_size=4"]), tmp_path / "single")
    w2 = [*base, "parallel.ep=2", "parallel.fsdp=true", *REPLICAS]
    run, resumed = spawn_jobs(2, [(w2, tmp_path / "w2"), ([*w2, f"train.resume={_step(tmp_path / 'w2', 8)}"],
                                                          tmp_path / "w2b")])  # fmt: skip
    _assert_same(single.losses, run["losses"], "world 2 ep 2 fsdp with replicas")
    _assert_same(single.losses[8:], resumed["losses"], "world 2 ep 2 fsdp with replicas, resumed at step 8")
    records = [json.loads(line) for line in (tmp_path / "w2" / "metrics.jsonl").read_text().splitlines()]
    moves = [r for r in records if "placement_bytes_moved" in r]
    assert [r["step"] for r in moves] == [4, 8] and sum(r["placement_bytes_moved"] for r in moves) > 0
    saved = checkpoint_files.verify(_step(tmp_path / "w2", 8))["placement"]
    assert [(len(slots), len(set(slots))) for slots in saved["expert_of_slot_YS"]] == [(10, 8)] * 2  # 2 replicas


def test_fsdp_in_one_process_is_a_no_op(tmp_path: Path, text_corpus_dir: Path) -> None:
    """One rank has nothing to shard over: the run is the plain one-process run."""
    base = _base(text_corpus_dir, 3)
    plain = train(load_config([*base, "train.batch_size=4"]), tmp_path / "plain")
    fsdp = train(load_config([*base, "train.batch_size=4", "parallel.fsdp=true"]), tmp_path / "fsdp")
    assert fsdp.losses == plain.losses


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (one NCCL rank each)")
def test_fsdp_training_on_cuda_with_nccl_matches_one_process(tmp_path: Path, text_corpus_dir: Path) -> None:
    base = [*_base(text_corpus_dir, 10), "train.device=cuda"]
    single = train(load_config([*base, "train.batch_size=4"]), tmp_path / "single")
    result = spawn_train(2, [*base, "parallel.ep=2", "parallel.fsdp=true"], tmp_path / "fsdp")
    for step, (a, b) in enumerate(zip(single.losses, result["losses"]), 1):
        assert abs(a - b) <= 1e-4 * abs(a), f"step {step}: one process {a} vs fsdp on cuda {b}"
