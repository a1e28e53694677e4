"""Expert parallelism on CPU/gloo: an EP=2/4 MoE layer equals the single-device layer.

Ranks are spawned by the test (torch.multiprocessing); every rank builds the same
single-device reference, shards a copy with `apply_expert_parallel`, and compares outputs
and gradients: input and router gradients from its own tokens, expert gradients summed
over every rank's tokens (what the EP exchange delivers to an expert's owner).
"""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from epmoe.comm.parallel_dims import ParallelConfigError, ParallelDims
from epmoe.config import ModelConfig, RouterConfig
from epmoe.model.moe import MoE
from epmoe.parallel.expert_parallel import apply_expert_parallel, apply_placement
from epmoe.placement.policies import experts_on_rank, round_robin

from .conftest import REPO
from .ranks import spawn_jobs

D = 16
TOKENS_PER_RANK = [6, 0, 9, 3]  # uneven, and rank 1 sends nothing (with 4 ranks)
CASES = list(itertools.product([1, 2, 8], [0, 1], [None, 1.0], ["contiguous", "round_robin"]))


def _expert_grads(moe: MoE) -> dict[str, torch.Tensor]:
    ex = moe.experts
    return {n: getattr(ex, n).grad for n in ("w_gate_EDF", "w_up_EDF", "w_down_EFD")}


def _layer_worker(rank: int, world: int, ep: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    dims = ParallelDims(world=world, dp=world, ep=ep, num_experts=16)
    dims.build_groups(rank)
    check_layer_cases(rank, world, dims)
    dist.destroy_process_group()


def check_layer_cases(rank: int, world: int, dims: ParallelDims, comm=None, chunks: int | None = None) -> None:
    """Every CASE on this rank; comm: the EP communicator (default: torch.distributed's EP group);
    chunks: None for the plain all-to-all dispatcher, n for the pipelined one."""
    ep = dims.ep
    for top_k, shared, capacity, placement in CASES:
        cfg = ModelConfig(d_model=D, num_experts=16, expert_hidden=8, n_shared_experts=shared, shared_hidden=8,
                          expert_impl="loop")  # fmt: skip
        torch.manual_seed(0)
        reference = MoE(cfg, RouterConfig(top_k=top_k, capacity_factor=capacity, aux_loss="none"))
        sharded = copy.deepcopy(reference)
        apply_expert_parallel(sharded, dims, rank, placement, comm, chunks=chunks)

        gen = torch.Generator().manual_seed(1)
        xs = [torch.randn(1, TOKENS_PER_RANK[r % 4], D, generator=gen) for r in range(world)]
        gs = [torch.randn(1, TOKENS_PER_RANK[r % 4], D, generator=gen) for r in range(world)]

        x = xs[rank].clone().requires_grad_()
        y, _ = sharded(x)
        (y * gs[rank]).sum().backward()

        ref_out = {}
        for r in range(world):  # the reference sees every rank's tokens, one rank's batch at a time
            x_ref = xs[r].clone().requires_grad_()
            y_ref, _ = reference(x_ref)
            if r == rank:
                router_grad_before = reference.router.gate.weight.grad
                router_grad_before = 0 if router_grad_before is None else router_grad_before.clone()
            (y_ref * gs[r]).sum().backward()
            if r == rank:
                ref_out = {"y": y_ref.detach(), "dx": x_ref.grad,
                           "router": reference.router.gate.weight.grad - router_grad_before}  # fmt: skip
        case = f"rank {rank} ep {ep} top_k {top_k} shared {shared} capacity {capacity} {placement}"
        torch.testing.assert_close(y, ref_out["y"], atol=1e-5, rtol=1e-5, msg=case)
        torch.testing.assert_close(x.grad, ref_out["dx"], atol=1e-5, rtol=1e-5, msg=case)
        torch.testing.assert_close(sharded.router.gate.weight.grad, ref_out["router"], atol=1e-5, rtol=1e-5, msg=case)
        slots = round_robin(16, ep) if placement == "round_robin" else torch.arange(16)
        local_ids = experts_on_rank(slots, ep, dims.ep_rank(rank))
        for name, grad in _expert_grads(sharded).items():
            expected = _expert_grads(reference)[name][local_ids]
            torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-5, msg=f"{case} {name}")


@pytest.mark.parametrize("world", [2, 4])
def test_ep_layer_equals_single_device_outputs_and_gradients(world: int, tmp_path: Path) -> None:
    mp.spawn(_layer_worker, args=(world, world, str(tmp_path / "store")), nprocs=world, join=True)


@pytest.mark.parametrize(
    ("world", "ep", "experts", "message"),
    [
        (4, 3, 12, "ep (3) must divide world size (4)"),
        (4, 4, 6, "num_experts (6) must be divisible by ep (4)"),
    ],
)
def test_parallel_dims_errors_quote_the_values(world: int, ep: int, experts: int, message: str) -> None:
    with pytest.raises(ParallelConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ParallelDims(world=world, dp=world, ep=ep, num_experts=experts)


def test_parallel_dims_groups_by_hand() -> None:
    dims = ParallelDims(world=4, dp=4, ep=2, num_experts=8)
    assert dims.ep_ranks(3) == [2, 3] and dims.expert_dp_ranks(3) == [1, 3]
    assert experts_on_rank(round_robin(8, 2), 2, 1).tolist() == [1, 3, 5, 7]


# --- training: EP runs give the losses of the single-process run with the same global batch ---

EP_TRAIN = ["router.aux_loss_coef=0.01", "router.bias_update_rate=0.01",
            "train.steps=20", "train.batch_size=2", "train.eval_every=10", "train.sample_bytes=0",
            "model.num_experts=8"]  # fmt: skip


def _train_worker(rank: int, world: int, port: int, overrides: list[str], run_dir: str, out: str) -> None:
    import json
    import os

    from epmoe.comm.process import end_process
    from epmoe.train.cli import load_config
    from epmoe.train.trainer import train

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    result = train(load_config(overrides), Path(run_dir))
    if rank == 0:
        Path(out).write_text(json.dumps({"losses": result.losses, "val": result.val_loss}))
    end_process(0)  # as the rank entry point ends (see end_process)


# the training cases run on spawned ranks, by name: (world, overrides beyond _ep_base's)
TRAINING = {
    "w2-batch-alltoall": (2, ["router.aux_loss=batch", "parallel.ep=2", "comm.dispatcher=alltoall", "comm.chunks=2"]),
    "w2-sequence-pipelined-auto-dim32": (2, ["router.aux_loss=sequence", "model.exchange_dim=32", "parallel.ep=2",
                                             "comm.dispatcher=pipelined", "comm.chunks=auto"]),
    "w4-batch-pipelined": (4, ["router.aux_loss=batch", "parallel.ep=2", "comm.dispatcher=pipelined", "comm.chunks=3"]),
    **{f"w{w}-{policy}-{slots}": (w, ["router.aux_loss=batch", f"parallel.ep={w}", f"placement={policy}",
                                      "placement.rebalance_every=4", f"placement.slots_per_rank={slots}"])
       for w, policy, slots in ((2, "balanced", 0), (4, "affinity", 0), (2, "redundant", 5), (4, "redundant", 3))},
}  # fmt: skip
# what a one-process run of the same case keeps (the rest is parallelism)
SINGLE_KEEPS = ("router.aux_loss=", "model.exchange_dim=")


def _ep_base(corpus: Path) -> list[str]:
    from .conftest import TINY

    return [*TINY, "data=text", f"data.path={corpus}", *EP_TRAIN]


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory: pytest.TempPathFactory, text_corpus_dir: Path) -> dict[str, dict]:
    """Every TRAINING case: {"losses", "val", "dir"}; one spawned group per world size runs its cases."""
    root, results = tmp_path_factory.mktemp("ep"), {}
    for world in (2, 4):
        names = [name for name, (w, _) in TRAINING.items() if w == world]
        jobs = [([*_ep_base(text_corpus_dir), *TRAINING[name][1]], root / name) for name in names]
        for name, result in zip(names, spawn_jobs(world, jobs)):
            results[name] = {**result, "dir": root / name}
    return results


def _single(case: str, corpus: Path, run_dir: Path):
    """The one-process run of `case` on the same global batch."""
    from epmoe.train.cli import load_config
    from epmoe.train.trainer import train

    world, overrides = TRAINING[case]
    kept = [o for o in overrides if o.startswith(SINGLE_KEEPS)]
    return train(load_config([*_ep_base(corpus), *kept, f"train.batch_size={2 * world}"]), run_dir)


@pytest.mark.parametrize("case", ["w2-batch-alltoall", "w2-sequence-pipelined-auto-dim32", "w4-batch-pipelined"])
def test_ep_training_matches_single_process_losses(
    case: str, ep_runs: dict[str, dict], tmp_path: Path, text_corpus_dir: Path
) -> None:
    import json

    single = _single(case, text_corpus_dir, tmp_path / "single")
    ep_result = ep_runs[case]
    assert len(ep_result["losses"]) == 20
    assert ep_result["losses"][-1] < ep_result["losses"][0]  # it trains (with exchange_dim too)
    for step, (a, b) in enumerate(zip(single.losses, ep_result["losses"]), 1):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step}: single {a} vs ep {b}"
    assert ep_result["val"] == pytest.approx(single.val_loss, rel=1e-5)
    if "comm.chunks=auto" in TRAINING[case][1]:  # 1, 2 and 4 chunks for 3 steps each, then the chosen count
        records = [json.loads(line) for line in (ep_result["dir"] / "metrics.jsonl").read_text().splitlines()]
        tried = [r["comm_chunks"] for r in records]
        assert tried[:9] == [1, 1, 1, 2, 2, 2, 4, 4, 4] and len(set(tried[9:])) == 1 and tried[9] in (1, 2, 4)


MPIEXEC = Path(sys.executable).parent / "mpiexec"


@pytest.mark.skipif(not MPIEXEC.exists(), reason="mpiexec (the mpich wheel) is not installed in this environment")
def test_ep_layer_with_the_mpi_communicator_under_mpiexec() -> None:
    proc = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, "-m", "tests.mpi_ep_layer"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("mpi ep layer: all cases match, all-to-all and pipelined") == 2


# --- online re-placement: experts move with their optimizer state; the math does not change ---


def _migration_worker(rank: int, world: int, store: str) -> None:
    from epmoe.comm.communicator import TorchCommunicator
    from epmoe.parallel.migration import migrate_layer
    from epmoe.placement.placement import Placement

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    dims = ParallelDims(world=world, dp=world, ep=world, num_experts=8)
    dims.build_groups(rank)
    cfg = ModelConfig(d_model=D, num_experts=8, expert_hidden=4, n_shared_experts=0, expert_impl="loop")
    torch.manual_seed(0)
    moe = MoE(cfg, RouterConfig(top_k=2, aux_loss="none"))
    comm = TorchCommunicator(dims.ep_group)
    old = apply_expert_parallel(moe, dims, rank, "contiguous", comm)
    optimizer = torch.optim.AdamW(moe.parameters(), lr=1e-2)
    y, _ = moe(torch.randn(1, 12, D, generator=torch.Generator().manual_seed(rank)))
    y.square().sum().backward()
    optimizer.step()  # AdamW now holds exp_avg / exp_avg_sq per expert row

    def by_expert(placement: Placement) -> dict[tuple[str, int], torch.Tensor]:
        """{(tensor name, global expert id): row} of every rank (all-gathered)."""
        rows = {}
        for name in ("w_gate_EDF", "w_down_EFD"):
            param = getattr(moe.experts, name)
            state = optimizer.state[param]
            for label, t in ((name, param.data), (f"{name}.exp_avg", state["exp_avg"]),
                             (f"{name}.exp_avg_sq", state["exp_avg_sq"])):  # fmt: skip
                gathered = [torch.empty_like(t) for _ in range(world)]
                dist.all_gather(gathered, t.contiguous())
                for r in range(world):
                    for local, e in enumerate(placement.experts_on_rank(0, r).tolist()):
                        rows[(label, e)] = gathered[r][local].clone()
        return rows

    before = by_expert(old)
    new_slot_of_expert_E = torch.tensor([5, 0, 7, 2, 1, 6, 3, 4])  # experts cross ranks both ways
    new = Placement.from_slot_of_expert(new_slot_of_expert_E, world, 1)
    sent = migrate_layer(moe, old, new, 0, rank, comm, optimizer)
    assert moe.dispatcher.slot_of_expert_E.tolist() == old.slot_of_expert_E(0).tolist()  # routes by old until ...
    apply_placement(moe, new, rank)  # ... the dispatchers are pointed at the new map
    after = by_expert(new)
    assert before.keys() == after.keys() and len(before) == 6 * 8
    for key in before:
        assert torch.equal(before[key], after[key]), f"rank {rank}: {key} changed in migration"
    assert moe.dispatcher.slot_of_expert_E.tolist() == new_slot_of_expert_E.tolist()
    assert sent > 0
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_migration_moves_weights_and_optimizer_state_with_each_expert(world: int, tmp_path: Path) -> None:
    mp.spawn(_migration_worker, args=(world, str(tmp_path / "store")), nprocs=world, join=True)


@pytest.mark.parametrize("case", ["w2-balanced-0", "w4-affinity-0", "w2-redundant-5", "w4-redundant-3"])
def test_training_with_replacement_matches_single_process(
    case: str, ep_runs: dict[str, dict], tmp_path: Path, text_corpus_dir: Path
) -> None:
    import json

    policy = case.split("-")[1]
    single = _single(case, text_corpus_dir, tmp_path / "single")
    ep_result = ep_runs[case]
    for step, (a, b) in enumerate(zip(single.losses, ep_result["losses"]), 1):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step}: single {a} vs ep {b} ({policy} re-placement)"
    records = [json.loads(line) for line in (ep_result["dir"] / "metrics.jsonl").read_text().splitlines()]
    moves = [r for r in records if "placement_bytes_moved" in r]
    assert [r["step"] for r in moves] == [4, 8, 12, 16]  # every 4 steps, not after the last (20)
    assert sum(r["placement_bytes_moved"] for r in moves) > 0  # experts really moved
    assert all(
        r["placement_imbalance_new"] <= r["placement_imbalance_old"] + 1e-9 for r in moves if policy == "balanced"
    )
