"""Random configs thrown at the launcher: each validates (and then builds and runs), or fails with
one line — never another exception, a traceback or a hang.

Overrides are drawn over model sizes (valid and not), routing, degrees, launchers, data sources
(present and missing), comm and placement options, unknown keys and garbage strings for numeric
fields. In process, `epmoe.launch.check` (what `python -m epmoe.launch` runs before starting any
rank) must return a config or raise one of LAUNCH_ERRORS with a non-empty single-line message; a
config it accepts must build its model and run a forward pass. A few drawn configs then go
through the real command line with `launcher=local train.steps=2`: exit 0 with two metric
records, or exit 2 with exactly one stderr line; and a handful through torchrun with two ranks
(`launcher=torchrun launcher.nproc_per_node=2`): exit 0, or exit 2 with exactly one stderr line
starting "error:" (an error the ranks find must come back as their one line, not torchrun's report).
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from epmoe.launch.__main__ import LAUNCH_ERRORS, check
from epmoe.model.transformer import Transformer

from .conftest import REPO

# printable, no whitespace that would end a command-line argument or a line
GARBAGE = st.text(alphabet=string.ascii_letters + string.digits + string.punctuation, min_size=0, max_size=6)


def _value(values: list) -> st.SearchStrategy:
    """A listed value (valid or not) most of the time, else garbage."""
    return st.one_of(st.sampled_from(values), st.sampled_from(values), st.sampled_from(values), GARBAGE)


# the first value of each list is valid with BASE: hypothesis draws first entries most often
FIELDS = {
    "model.d_model": [16, 0, 8, 24, 32, -8],
    "model.n_heads": [2, 0, 1, 3, 4],
    "model.n_layers": [2, 0, 1],
    "model.num_experts": [4, -1, 0, 2, 6, 8],
    "model.max_seq_len": [16, 0, 8, 32],
    "model.vocab_size": [256, 0, 100, 300],
    "model.first_dense_layers": [1, 0, 2],
    "model.moe_every": [2, 0, 1],
    "model.n_shared_experts": [1, 0, -1],
    "model.expert_hidden": [8, 0, 16],
    "model.activation": ["gelu", "swiglu", "relu"],
    "router.top_k": [2, 0, 1, 3, 9],
    "router.n_groups": [2, 1, 3],
    "router.topk_groups": [1, 2, 3],
    "router.capacity_factor": [1.25, "null", 1.0, 0, -1, "inf", "nan"],
    "router.score_func": ["sigmoid", "softmax", "relu"],
    "router.aux_loss": ["sequence", "none", "batch", "always"],
    "router.bias_update_rate": [0.001, 0.0, 2.0],
    "data.seq_len": [8, 0, 16, 64],
    "data.val_fraction": [0.5, 0.05, 0, 1],
    "train.lr": [0.001, 0, -1, "inf"],
    "train.batch_size": [2, 0, 1],
    "train.beta2": [0.9, 1.0],
    "train.collective_timeout_s": [5, 0, -1],
    "train.engine": ["native", "deepspeed", "megatron"],
    "train.zero_stage": [0, 1, 2, 3],
    "parallel.ep": [1, 0, 2, 3, 4],
    "launcher.nproc_per_node": [1, 0, 2, 3, 4],
    "launcher.nnodes": [1, 2],
    "comm.dispatcher": ["pipelined", "alltoall", "tutel"],
    "comm.chunks": [2, 1, "auto", 0],
    "comm.dtype": ["bf16", "fp32", "fp8"],
    "placement.rebalance_every": [0, 2, -1],
}
GROUPS = {
    "launcher": ["local", "torchrun", "slurm", "mpirun", "deepspeed", "pdsh"],
    "placement": ["contiguous", "round_robin", "balanced", "affinity", "redundant"],
    "comm": ["torch", "mpi"],
    "router": ["topk", "capacity", "deepseek_v3"],
}
# small enough that a config which validates builds in milliseconds and trains in a few seconds
BASE = ["model.d_model=16", "model.n_heads=2", "model.n_layers=2", "model.num_experts=4", "model.expert_hidden=16",
        "model.shared_hidden=16", "model.dense_hidden=32", "model.max_seq_len=16", "data.seq_len=16", "train=smoke",
        "train.threads=1", "logger.progress=false", "logger.plots=false", "logger.jsonl=true"]  # fmt: skip


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("corpora")
    (root / "text").mkdir()
    for i in range(20):
        (root / "text" / f"{i}.txt").write_text(f"line {i} of some text for the property test\n" * 40)
    (root / "d.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 30}) + "\n" for i in range(40)))
    np.arange(4000, dtype=np.uint16).__mod__(250).astype(np.uint16).tofile(root / "t.bin")
    (root / "odd.bin").write_bytes(b"\x01\x00\x02")
    return [  # usable sources first
        f"data=text data.path={root / 'text'}",
        f"data=jsonl data.path={root / 'd.jsonl'}",
        f"data=bin data.path={root / 't.bin'}",
        "data=stdlib",
        f"data=text data.path={root / 'missing'}",
        f"data=jsonl data.path={root / 'text'}",
        f"data=bin data.path={root / 'odd.bin'}",
        "data=text",
    ]


@st.composite
def overrides(draw: st.DrawFn, corpora: list[str], launchers: list[str]) -> list[str]:
    """BASE plus a data source, a launcher, maybe other group options, and a few changed fields."""
    out = list(BASE)
    out += draw(st.sampled_from(corpora)).split()
    out.append(f"launcher={draw(st.sampled_from(launchers))}")
    for group, options in GROUPS.items():
        if group != "launcher" and draw(st.booleans()):
            out.append(f"{group}={draw(st.sampled_from(options))}")
    for key in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=4, unique=True)):
        out.append(f"{key}={draw(_value(FIELDS[key]))}")
    malformed = ["model.nonsense=1", "train=nonexistent", "router.top_k", "=2", "train.lr=${oops}"]
    if draw(st.integers(0, 9)) == 9:
        out.append(draw(st.sampled_from(malformed)))
    return out


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(data=st.data())
def test_check_validates_or_fails_with_one_line(corpora: list[str], data: st.DataObject) -> None:
    args = data.draw(overrides(corpora, GROUPS["launcher"]))
    try:
        cfg, world = check(args)
    except LAUNCH_ERRORS as e:  # anything else (another type, a traceback) fails the test
        message = str(e)
        assert message.strip() and "\n" not in message, repr(message)
        event(f"refused: {type(e).__name__}")
        return
    event("accepted")
    assert world >= 1 and world % cfg.parallel.ep == 0
    model = Transformer(cfg.model, cfg.router)  # what validation accepted must build and run
    x_BS = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len))
    assert model(x_BS).logits_BSV.shape == (2, cfg.data.seq_len, cfg.model.vocab_size)


def _launch(args: list[str], run_dir: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": "0", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", "epmoe.launch", *args, f"hydra.run.dir={run_dir}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip


# 3 drawn command lines per launcher: each is a Python start (and torchrun's agent and two ranks),
# 4-8 s on the 2-core test machines; the in-process test above draws 60 configs
@pytest.mark.parametrize(("launcher", "nproc"), [("local", 1), ("torchrun", 2)])
@settings(max_examples=3, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_the_command_line_runs_a_short_job_or_exits_2_with_one_line(
    launcher: str, nproc: int, corpora: list[str], tmp_path: Path, data: st.DataObject
) -> None:
    """Exit 0 with steps 1 and 2 logged, or exit 2 with one "error: ..." line and no run directory."""
    args = data.draw(overrides(corpora, [launcher]))
    run_dir = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    # generous timeout: two ranks' start and rendezvous on a shared 2-core machine
    proc = _launch([*args, f"launcher.nproc_per_node={nproc}", "train.steps=2", "train.eval_every=0",
                    "train.sample_bytes=0"], run_dir, timeout=240)  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    event(f"exit {proc.returncode}")
    if proc.returncode == 2:
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0] != "error: ", proc.stderr
        assert not run_dir.exists()  # refused before anything was created
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2]
