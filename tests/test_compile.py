"""torch.compile (train.compile=true): compiled training equals eager training within a stated
tolerance, in one process and at world 2 / EP 2 (both exchanging dispatchers, and FSDP2); parameter
names do not change; a MoE block compiles as two graphs around its eager dispatch; compile with
activation checkpointing is refused in one line.

Tolerance, compiled vs eager, relative per step's loss: 1e-4. Inductor computes the same function
in another order: it fuses the element-wise work between matmuls and reduces in its own order
(RMSNorm's mean of squares, softmax's sum, SiLU and the residual adds fused with them, sums over
32-64 fp32 terms in vector lanes: a few ulps, ~1e-7 relative, per op). On the tiny model one
compiled forward's logits differ from eager by ~7e-7 absolute and the gradients by up to ~2e-4
absolute; AdamW's update lr * m / sqrt(v) carries the gradients' relative change into the weights
(near-zero gradients' relatively most). The losses, fp32
scalars near 5.5, then differ by at most one fp32 ulp (measured over 4 steps: 0 in one process and
at EP 2 all-to-all / FSDP, 5e-8 relative pipelined). 1e-4 leaves room for other CPUs' vector widths
(other reduction orders) while a wrong graph (a missing residual, a stale routing, an unapplied
update) moves a loss by more than 1e-2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from epmoe.config import ConfigError
from epmoe.model.transformer import Transformer
from epmoe.parallel.compile import apply_compile, eager_dispatch
from epmoe.train.cli import load_config
from epmoe.train.trainer import train

from .conftest import TINY
from .ranks import spawn_jobs

STEPS = 4
RTOL = 1e-4  # see the module docstring
RUN = [*TINY, "train.precision=fp32", f"train.steps={STEPS}", "train.eval_every=0", "train.sample_bytes=0",
       "train.threads=1", "logger.console=false", "logger.jsonl=false"]  # fmt: skip
COMPILED = ["train.compile=true"]


def _assert_close(eager: list[float], compiled: list[float], what: str) -> None:
    assert len(eager) == len(compiled) == STEPS
    for step, (a, b) in enumerate(zip(eager, compiled), 1):
        assert abs(a - b) <= RTOL * abs(a), f"{what} step {step}: eager {a} vs compiled {b}"


def test_compile_keeps_parameter_names_and_compiles_every_block_in_place() -> None:
    cfg = load_config(RUN)
    model = Transformer(cfg.model, cfg.router)
    names = [name for name, _ in model.named_parameters()]
    keys = list(model.state_dict())
    apply_compile(model, True)
    assert [name for name, _ in model.named_parameters()] == names
    assert list(model.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert type(model.blocks[0]).__name__ == "Block"  # no wrapper module


def test_a_moe_block_compiles_as_two_graphs_around_its_eager_dispatch() -> None:
    cfg = load_config(RUN)
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.router)
    captured = {}
    model.blocks[0].register_forward_pre_hook(lambda _m, a, k: captured.update(a=a, k=k), with_kwargs=True)
    with torch.no_grad():
        model(torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len)))
    eager_dispatch(model)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(nested_graph_breaks=True):  # as apply_compile sets it
        out = torch._dynamo.explain(model.blocks[0])(*captured["a"], **captured["k"])
    assert (out.graph_count, out.graph_break_count) == (2, 1)
    assert "disable" in out.break_reasons[0].reason  # the one break: the dispatch, nothing in the router


def test_one_process_compiled_steps_equal_eager(tmp_path: Path) -> None:
    eager = train(load_config(RUN), tmp_path / "eager")
    counters["stats"].clear()
    compiled = train(load_config([*RUN, *COMPILED]), tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] >= 2  # it did compile (2 graphs per MoE block, shared by the blocks)
    _assert_close(eager.losses, compiled.losses, "one process")


def test_world2_ep2_compiled_equals_eager_for_both_dispatchers_and_fsdp(tmp_path: Path) -> None:
    ep = [*RUN, "parallel.ep=2", "train.batch_size=2"]
    pipelined = ["comm.dispatcher=pipelined", "comm.chunks=2"]
    jobs = {
        "alltoall": ep,
        "alltoall compiled": [*ep, *COMPILED],
        "alltoall+fsdp compiled": [*ep, *COMPILED, "parallel.fsdp=true"],
        "pipelined": [*ep, *pipelined],
        "pipelined compiled": [*ep, *pipelined, *COMPILED],
    }
    results = spawn_jobs(2, [(o, tmp_path / name.replace(" ", "_")) for name, o in jobs.items()])
    losses = {name: r["losses"] for name, r in zip(jobs, results)}
    _assert_close(losses["alltoall"], losses["alltoall compiled"], "alltoall")
    # FSDP2 equals no FSDP to 1e-5 (tests/test_fsdp.py): the eager alltoall run is its reference too
    _assert_close(losses["alltoall"], losses["alltoall+fsdp compiled"], "alltoall+fsdp")
    _assert_close(losses["pipelined"], losses["pipelined compiled"], "pipelined")


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_compile_with_activation_checkpointing_is_refused_in_one_line(mode: str) -> None:
    with pytest.raises(ConfigError, match=rf"^train.compile=true with train.activation_checkpointing={mode}: "):
        load_config([*COMPILED, f"train.activation_checkpointing={mode}"])
