"""Hugging Face models trained with expert parallelism and exported back: 5 steps of every family
imported at EP=2 (and EP=1) equal one process's on the same global batch, and the exported folders
load in `transformers` with the logits of the checkpoint epmoe trained."""

from __future__ import annotations

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
from tests.ranks import spawn_jobs

transformers = pytest.importorskip("transformers")
STEPS = 5


MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
RUN = ["train=smoke", f"train.steps={STEPS}", "train.batch_size=2", "train.precision=fp32", "train.eval_batches=1",
       "train.sample_bytes=0", "data.seq_len=32", "logger.progress=false", "logger.plots=false"]  # fmt: skip


def _trained_model(run_dir: Path):
    """The single-device model of the run's final checkpoint, every expert (epmoe's own reading)."""
    from omegaconf import OmegaConf

    from epmoe.config import Config
    from epmoe.model.transformer import Transformer
    from epmoe.train import checkpoint_files, checkpoint_state

    ckpt, manifest = checkpoint_files.readable(run_dir)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), manifest["config"]))
    model = Transformer(cfg.model, cfg.router)
    model.load_state_dict(checkpoint_state.consolidate(ckpt))
    return model.eval()


def _run_name(family: str, ep: int, fsdp: bool) -> str:
    return f"{family}_ep{ep}" + ("_fsdp" if fsdp else "")


def test_every_family_trains_at_ep2_like_one_process_and_exports(tmp_path: Path, text_corpus: Path) -> None:
    """5 steps of each family imported into world 2 at EP=2 (MoE families) and EP=1, and with FSDP2
    (init_from read straight into the shards; a MoE and a dense family), equal one process's on the
    same global batch; each exported folder loads in transformers with the logits of the checkpoint
    epmoe trained."""
    from epmoe.train.cli import load_config
    from epmoe.train.trainer import train
    from tests.hf_tiny import FAMILIES

    data = ["data=text", f"data.path={text_corpus}"]
    folders = {f: save(f, tmp_path / f, vocab_size=256) for f in FAMILIES}  # 256: trains on bytes
    single = {f: train(load_config([*RUN, *data, f"train.init_from={folders[f]}", "train.batch_size=4"]),
                       tmp_path / f"{f}_single").losses for f in FAMILIES}  # fmt: skip
    jobs = [(f, ep, False) for f in FAMILIES for ep in ((2, 1) if f in MOE else (1,))]
    jobs += [("qwen3_moe", 2, True), ("llama", 1, True)]
    work = [([*RUN, *data, f"train.init_from={folders[f]}", f"parallel.ep={ep}", f"parallel.fsdp={fsdp}"],
             tmp_path / _run_name(f, ep, fsdp)) for f, ep, fsdp in jobs]  # fmt: skip
    tokens_BS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    for (family, ep, fsdp), result in zip(jobs, spawn_jobs(2, work)):
        losses, name = result["losses"], _run_name(family, ep, fsdp)
        assert len(losses) == STEPS
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, single[family]))
        assert worst <= 1e-5, f"{name}: relative loss difference {worst:.2e}"
        exported = tmp_path / f"{name}_hf"
        assert hf_main(["export", str(tmp_path / name), str(exported)]) == 0
        ref = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
        with torch.no_grad():
            theirs_BSV = ref(tokens_BS).logits
            ours_BSV = _trained_model(tmp_path / name)(tokens_BS).logits_BSV
            untrained_BSV = from_pretrained(folders[family])[1].eval()(tokens_BS).logits_BSV
        assert (theirs_BSV - ours_BSV).abs().max().item() <= 1e-5, name
        assert (untrained_BSV - ours_BSV).abs().max().item() > 1e-3, name  # it did train


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


def test_an_import_into_experts_sharded_over_expert_dp_trains_like_one_process(
    tmp_path: Path, text_corpus: Path
) -> None:
    """World 4 / EP 2 / FSDP2: each rank's experts are sharded over its expert-DP group of 2, so
    init_from assembles each stacked expert weight whole from its experts' tensors and cuts the
    shard; the losses equal one process's."""
    from epmoe.train.cli import load_config
    from epmoe.train.trainer import train

    data = ["data=text", f"data.path={text_corpus}"]
    folder = save("qwen3_moe", tmp_path / "qwen3_moe", vocab_size=256)
    single = train(load_config([*RUN, *data, f"train.init_from={folder}", "train.batch_size=8"]), tmp_path / "one")
    (sharded,) = spawn_jobs(4, [([*RUN, *data, f"train.init_from={folder}", "parallel.ep=2", "parallel.fsdp=true"],
                                 tmp_path / "w4")])  # fmt: skip
    worst = max(abs(a - b) / abs(b) for a, b in zip(sharded["losses"], single.losses))
    assert len(sharded["losses"]) == STEPS and worst <= 1e-5, f"relative loss difference {worst:.2e}"
