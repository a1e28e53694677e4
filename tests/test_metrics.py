"""The numbers a user tunes by: the FLOPs per token behind MFU (hand-worked), the throughput
record, and the per-layer scalar keys, MFU and memory in TensorBoard and wandb, read back with
TensorBoard's own reader and wandb's own protobuf records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epmoe.config import ModelConfig, RouterConfig
from epmoe.model.size import training_flops_per_token
from epmoe.train.throughput import Peak, Throughput, device_peak
from tests.conftest import REPO, TINY
from tests.wandb_records import history


@pytest.mark.parametrize("tied", [False, True])
def test_training_flops_per_token_by_hand(tied: bool) -> None:
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, num_experts=4, expert_hidden=16,
                      shared_hidden=8, n_shared_experts=1, dense_hidden=24, first_dense_layers=1,
                      tie_embeddings=tied)  # fmt: skip
    # parameters a token multiplies by (d 32, head_dim 16, vocab 256):
    # block 0 (dense): norms 2·32 + qkv 96·32 + out 32·32 + SwiGLU 3·24·32           = 6,464
    # block 1 (MoE):   norms 64 + attention 4,096 + router 4·32 + shared 3·8·32      = 5,056
    #                  routed experts 3·4·32·16 = 6,144, of which top-2 of 4 active  = 3,072
    # final norm 32 + head 256·32 (the embedding is a lookup; tied, it is the head)  = 8,224
    n_active = 6_464 + 5_056 + 3_072 + 8_224  # 22,816
    attention = 6 * 2 * 2 * (16 + 16) * 64  # 6 · layers · heads · (d_qk + d_v) · seq_len
    assert training_flops_per_token(cfg, RouterConfig(top_k=2), seq_len=64) == 6 * n_active + attention


def test_throughput_record_by_hand() -> None:
    # 1 GFLOP per token, 1,000 tokens per step over 2 devices in 0.5 s: 1,000 tokens/s per device
    # = 1 TFLOP/s of model FLOPs, half of a 2 TFLOP/s peak
    t = Throughput(1e9, Peak(2.0, "test"), tokens_per_step=1_000, world=2, device=torch.device("cpu"))
    m = t.step_metrics(0.5, completed=3)
    assert (m["step_ms"], m["tokens_per_s"], m["tokens_per_s_per_device"], m["tokens"]) == (500.0, 2000.0, 1000.0, 3000)
    assert m["mfu"] == pytest.approx(0.5)
    assert "mfu" not in Throughput(1e9, Peak(0.0, "unknown"), 1_000, 2, torch.device("cpu")).step_metrics(0.5, 3)


def test_the_peak_is_the_configured_one_or_a_cpu_probe() -> None:
    assert device_peak(torch.device("cpu"), 12.5, torch.float32) == Peak(12.5, "train.peak_tflops")
    probed = device_peak(torch.device("cpu"), 0.0, torch.float32)
    assert probed.source.startswith("CPU matmul probe (float32") and 1e-4 < probed.tflops < 100


def test_ep2_run_logs_per_layer_keys_mfu_and_memory_to_tensorboard_and_wandb(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "epmoe.launch", *TINY, "launcher=torchrun", "launcher.nproc_per_node=2", "parallel.ep=2",
         "logger=tensorboard", "logger.wandb=true", "logger.progress=true", "train.steps=6", "train.log_every=3",
         "train.eval_every=0", "train.threads=1", "train.sample_bytes=0", f"hydra.run.dir={run_dir}"],
        cwd=REPO, env={**os.environ, "WANDB_SILENT": "true"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MFLOP per training token" in proc.stderr and "CPU matmul probe" in proc.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("time" in r for r in records)  # a timestamp on every record
    assert [r["step"] for r in records if "mem_gib" in r] == [3, 6]  # reduced over ranks at logging steps only
    per_layer = [f"moe/L{b}/{k}" for b in (0, 1) for k in ("imbalance", "drop_frac", "aux_loss", "exchange_ms",
                                                               "exposed_ms")]  # fmt: skip
    wanted = [*per_layer, "mfu", "mem_gib", "tokens_per_s", "tokens_per_s_per_device", "tokens", "step_ms"]

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert set(wanted) <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("mem_gib")] == [3, 6]
    for key in ("mfu", "moe/L1/imbalance", "moe/L0/exchange_ms"):
        assert [e.value for e in events.Scalars(key)] == pytest.approx([r[key] for r in records], rel=1e-6)
    assert all(0 < r["mfu"] < 1 for r in records) and records[-1]["tokens"] == 6 * 2 * 4 * 32  # steps·world·B·S

    rows = history(run_dir)
    assert len(rows) == 6 and set(wanted) <= set(rows[-1])
    assert [row["moe/L0/aux_loss"] for row in rows] == pytest.approx([r["moe/L0/aux_loss"] for r in records])
    assert not any(isinstance(v, list) for row in rows for v in row.values())  # lists stay out of scalar charts

    # the expert-load heatmap of each MoE layer, as an image at the (final) evaluation, on both dashboards
    assert {"expert_load/L0", "expert_load/L1"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("expert_load/L1")] == [6]
    for layer in ("L0", "L1"):
        assert rows[-1][f"expert_load/{layer}/_type"] == "image-file"
        (image,) = (run_dir / "wandb").glob(f"offline-run-*/files/{rows[-1][f'expert_load/{layer}/path']}")
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the console's fixed columns, and train.log holding what the console printed
    assert "step 3/6 | loss " in proc.stdout and " tok/s | mfu " in proc.stdout and " GiB | lr " in proc.stdout
    log = (run_dir / "train.log").read_text()
    assert "step 6/6 | loss " in log and "done: held-out" in log and "mfu: " in log
    assert "\r" not in log  # the progress bar's redraws are not kept, only its final line
    assert log.index("MFLOP per training token") < log.index("train: 100%")  # the header precedes the bar


def test_bf16_on_a_cpu_without_native_bf16_is_a_warning_with_both_rates(monkeypatch: pytest.MonkeyPatch) -> None:
    import epmoe.train.throughput as throughput

    bf16 = Peak(0.0008, "CPU matmul probe (bfloat16, 1 threads)")
    monkeypatch.setattr(throughput, "matmul_probe_tflops", lambda dtype: 0.0434)  # fp32: 54x faster
    assert throughput.slow_bf16_warning(bf16, torch.device("cpu")) == (
        "warning: train.precision=bf16 on this CPU: bf16 matmul 0.8 GFLOP/s vs fp32 43.4 GFLOP/s (no native bf16); "
        "train.precision=fp32 runs faster"
    )
    monkeypatch.setattr(throughput, "matmul_probe_tflops", lambda dtype: 0.0016)  # 2x: native bf16 is fine
    assert throughput.slow_bf16_warning(bf16, torch.device("cpu")) is None
    fp32 = Peak(0.04, "CPU matmul probe (float32, 1 threads)")
    assert throughput.slow_bf16_warning(fp32, torch.device("cpu")) is None
