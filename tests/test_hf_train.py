"""A Hugging Face model trained with expert parallelism and exported back: 5 steps of an OLMoE
imported at EP=2 equal those at EP=1 (same global batch), and the exported folders load in
`transformers` with the logits of the checkpoint epmoe trained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epmoe.hf import from_pretrained
from epmoe.hf.__main__ import main as hf_main
from tests.conftest import REPO
from tests.hf_tiny import save

transformers = pytest.importorskip("transformers")
STEPS = 5


def _launch(hf_dir: Path, run_dir: Path, ep: int) -> list[float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true", "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "epmoe.launch", f"train.init_from={hf_dir}", "launcher=torchrun",
         "launcher.nproc_per_node=2", f"parallel.ep={ep}", "train=smoke", f"train.steps={STEPS}",
         "train.precision=fp32", "train.threads=1", "train.eval_batches=1", "train.sample_bytes=0", "data.seq_len=32",
         "logger.progress=false", "logger.plots=false", f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imported" in proc.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_an_imported_moe_trains_at_ep2_like_ep1_and_exports_to_transformers(tmp_path: Path) -> None:
    hf_dir = save("olmoe", tmp_path / "olmoe", vocab_size=256)  # 256: it trains on bytes (no tokenizer.json)
    losses = {ep: _launch(hf_dir, tmp_path / f"run_ep{ep}", ep) for ep in (2, 1)}
    assert len(losses[2]) == STEPS
    assert max(abs(a - b) / abs(b) for a, b in zip(losses[2], losses[1])) <= 1e-5

    tokens_BS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    for ep in (2, 1):
        out = tmp_path / f"exported_ep{ep}"
        assert hf_main(["export", str(tmp_path / f"run_ep{ep}"), str(out)]) == 0
        ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ours = from_pretrained(out)[1].eval()
        with torch.no_grad():
            theirs_BSV, ours_BSV = ref(tokens_BS).logits, ours(tokens_BS).logits_BSV
        assert (theirs_BSV - ours_BSV).abs().max().item() <= 1e-5
        untrained = from_pretrained(hf_dir)[1].eval()
        with torch.no_grad():
            assert (untrained(tokens_BS).logits_BSV - ours_BSV).abs().max().item() > 1e-3  # it did train


def test_import_cli_writes_a_step_0_checkpoint_and_refuses_bad_input_in_one_line(tmp_path: Path, capsys) -> None:
    hf_dir = save("qwen3_moe", tmp_path / "q", vocab_size=256)
    assert hf_main(["import", str(hf_dir), str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "checkpoints" / "step_00000000" / "manifest.json").is_file()
    assert hf_main(["export", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
    from safetensors.torch import load_file

    a, b = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)  # through epmoe's checkpoint too
    capsys.readouterr()
    assert hf_main(["import", str(tmp_path / "nowhere"), str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no config.json" in err


def test_a_folder_missing_a_tensor_is_refused_before_ranks_start(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    hf_dir = save("qwen3_moe", tmp_path / "q", vocab_size=256)
    tensors = load_file(hf_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, hf_dir / "model.safetensors")
    proc = subprocess.run(
        [sys.executable, "-m", "epmoe.launch", f"train.init_from={hf_dir}", "launcher=torchrun",
         "launcher.nproc_per_node=2", "parallel.ep=2", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "missing tensor model.layers.1.mlp.experts.3.up_proj.weight" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
