"""Activation checkpointing (train.activation_checkpointing=full|selective): training with it equals
training without it (losses, gradients, routing metrics), in one process and at world 2 / EP 2 with
FSDP2 and either exchanging dispatcher; the forward really is recomputed (and selective keeps the
matmul outputs); a recomputed forward adds nothing to the exchange timers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from epmoe.choices import ActivationCheckpointing
from epmoe.comm.communicator import _Pending
from epmoe.comm.dispatch import AllToAllDispatcher
from epmoe.comm.pipelined import PipelinedDispatcher
from epmoe.config import ConfigError
from epmoe.model.moe import moe_layers
from epmoe.model.transformer import Transformer
from epmoe.parallel.activation_checkpointing import apply_activation_checkpointing
from epmoe.parallel.timing import attach_timers
from epmoe.train.cli import load_config
from epmoe.train.trainer import train

from .conftest import TINY
from .ranks import spawn_jobs

MODES = [ActivationCheckpointing.full, ActivationCheckpointing.selective]
# aux loss, bias updates and capacity drops: every routing side effect a recomputed forward could repeat
ROUTING = ["router.aux_loss_coef=0.01", "router.bias_update_rate=0.01", "router.z_loss_coef=0.001"]
RUN = [*TINY, *ROUTING, "train.precision=fp32", "train.eval_every=0", "train.sample_bytes=0", "train.threads=1",
       "logger.console=false"]  # fmt: skip
STEPS = 6
RANK_STEPS = 4  # the multi-rank runs: 5 configurations in one group


def _assert_same_losses(reference: list[float], other: list[float], what: str, steps: int = STEPS) -> None:
    assert len(reference) == len(other) == steps
    for step, (a, b) in enumerate(zip(reference, other), 1):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step}: without checkpointing {a} vs {what} {b}"


def _routing_records(run_dir: Path) -> list[dict]:
    keep = ("moe/", "expert_load", "drop_frac", "imbalance", "aux_loss", "z_loss")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith(keep)} for r in records if "loss" in r]


def test_one_process_losses_and_routing_metrics_equal_those_without_checkpointing(
    tmp_path: Path, text_corpus_dir: Path
) -> None:
    base = [*RUN, "data=text", f"data.path={text_corpus_dir}", f"train.steps={STEPS}", "router.capacity_factor=1.0"]
    reference = train(load_config(base), tmp_path / "none")
    routing = _routing_records(tmp_path / "none")
    assert len(routing) == STEPS and all(r["moe/L1/drop_frac"] > 0 for r in routing)  # capacity drops happen
    for mode in MODES:
        result = train(load_config([*base, f"train.activation_checkpointing={mode}"]), tmp_path / mode)
        _assert_same_losses(reference.losses, result.losses, f"activation_checkpointing={mode}")
        for step, (got, want) in enumerate(zip(_routing_records(tmp_path / mode), routing, strict=True), 1):
            got, want = dict(got), dict(want)
            assert got.pop("expert_load") == want.pop("expert_load"), f"{mode} step {step}"
            assert got == pytest.approx(want, rel=1e-6), f"{mode} step {step}"


class _CountOps(TorchDispatchMode):
    """Counts aten ops by name while active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _model(mode: ActivationCheckpointing) -> Transformer:
    cfg = load_config([*TINY, *ROUTING, "router.capacity_factor=1.0", "model.expert_impl=loop"])
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.router)
    apply_activation_checkpointing(model, mode)
    return model


def _one_backward(model: Transformer) -> dict:
    """Forward and backward of one batch: gradients, block forwards, bytes saved for backward
    outside any checkpoint, and the aten ops run during backward."""
    tokens_BS = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    calls = [0]
    for block in model.blocks:
        block.attn.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens_BS[:, :-1])
    loss = F.cross_entropy(out.logits_BSV.flatten(0, 1), tokens_BS[:, 1:].flatten())
    loss = loss + sum(r.aux_loss + r.z_loss for r in out.routings)
    forward_calls = calls[0]
    with _CountOps() as ops:
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return {"grads": grads, "forwards": forward_calls, "recomputed": calls[0] - forward_calls,
            "saved": saved[0], "ops": ops.counts, "loss": loss.item()}  # fmt: skip


def test_gradients_equal_and_the_forward_is_recomputed() -> None:
    none = _one_backward(_model(ActivationCheckpointing.none))
    blocks = len(_model(ActivationCheckpointing.none).blocks)
    assert none["forwards"] == blocks and none["recomputed"] == 0 and "silu" not in none["ops"]
    for mode in MODES:
        run = _one_backward(_model(mode))
        assert run["loss"] == none["loss"]
        assert run["grads"].keys() == none["grads"].keys()  # parameter names unchanged
        for name, grad in none["grads"].items():
            torch.testing.assert_close(run["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=f"{mode}: {name}")
        assert run["recomputed"] == blocks, mode  # each block's forward ran again, in backward
        assert run["ops"].get("silu", 0) > 0, mode  # the activations were recomputed
        assert run["saved"] < none["saved"] / 2, mode  # the blocks' activations were not kept
        if mode == ActivationCheckpointing.selective:  # the matmuls were not run again
            assert run["ops"]["mm"] == none["ops"]["mm"]
        else:
            assert run["ops"]["mm"] > none["ops"]["mm"]


def test_applying_twice_and_an_unknown_mode_are_errors() -> None:
    model = _model(ActivationCheckpointing.full)
    with pytest.raises(ValueError, match=r"already applied to block 0"):
        apply_activation_checkpointing(model, ActivationCheckpointing.selective)
    with pytest.raises(ConfigError, match=r"^train.activation_checkpointing='every' is not one of none, full"):
        load_config(["train.activation_checkpointing=every"])
    assert load_config([]).train.activation_checkpointing == ActivationCheckpointing.none


class _LoopbackComm:
    """One rank: every all-to-all returns what it was sent."""

    size, rank = 1, 0

    def all_to_all_v(self, x_ND, output_splits, input_splits, out_MD=None):
        return _Pending(x_ND.clone() if out_MD is None else out_MD.copy_(x_ND))

    def all_reduce_sum_(self, tensor):
        return _Pending(tensor)


@pytest.mark.parametrize("dispatcher", ["alltoall", "pipelined"])
def test_a_recomputed_forward_adds_nothing_to_the_exchange_timers(dispatcher: str) -> None:
    logged = {}
    for mode in [ActivationCheckpointing.none, *MODES]:
        model = _model(ActivationCheckpointing.none)
        for moe in moe_layers(model):
            slots = torch.arange(moe.router.num_experts)
            moe.dispatcher = (AllToAllDispatcher(slots, _LoopbackComm()) if dispatcher == "alltoall"
                              else PipelinedDispatcher(slots, _LoopbackComm(), chunks=2))  # fmt: skip
        timers = attach_timers(model)
        apply_activation_checkpointing(model, mode, timers)
        run = _one_backward(model)
        # once per block: the pipeline's nested autograd.grad calls start no recomputation of their own
        assert run["recomputed"] == (0 if mode == ActivationCheckpointing.none else len(model.blocks))
        logged[mode] = [len(t.comm.log) for t in timers], [len(t.intervals) for t in timers]
    reference = logged.pop(ActivationCheckpointing.none)  # (exchanges, expert calls) logged per layer
    assert min(reference[0]) > 0 and all(counts == reference for counts in logged.values()), (reference, logged)


def test_ep2_fsdp_and_deepspeed_with_checkpointing_equal_one_process(tmp_path: Path, text_corpus_dir: Path) -> None:
    """All five runs in one spawned group (tests/ranks.py), RANK_STEPS steps each."""
    base = [*RUN, "data=text", f"data.path={text_corpus_dir}", f"train.steps={RANK_STEPS}", "model.num_experts=8",
            "train.batch_size=2", "train.grad_clip=0.5"]  # fmt: skip
    single = train(load_config([*base, "train.batch_size=4"]), tmp_path / "single")
    runs = {f"{d}-{mode}": [*base, "parallel.ep=2", "parallel.fsdp=true", f"comm.dispatcher={d}",
                            f"train.activation_checkpointing={mode}"]  # fmt: skip
            for d in ("alltoall", "pipelined") for mode in MODES}  # fmt: skip
    # DeepSpeed's engine (ZeRO 2 partitions the gradients its backward hooks reduce) over the same blocks
    runs["deepspeed-zero2-selective"] = [*base, "parallel.ep=2", "train.engine=deepspeed", "train.zero_stage=2",
                                         "train.activation_checkpointing=selective"]  # fmt: skip
    results = spawn_jobs(2, [(overrides, tmp_path / name) for name, overrides in runs.items()])
    for name, result in zip(runs, results):
        _assert_same_losses(single.losses, result["losses"], f"world 2 / ep 2 / fsdp {name}", RANK_STEPS)
