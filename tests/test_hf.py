"""Hugging Face import and export against `transformers` itself: every family's logits, the
round trip, both expert layouts, sharded folders, lazy per-rank reads, and the failures."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from epmoe.hf import HFError, from_pretrained, load_weights, save_pretrained
from epmoe.hf.convert import config_from_hf
from epmoe.model.moe import moe_layers
from epmoe.model.transformer import Transformer
from tests.hf_tiny import FAMILIES, build, save, tiny_configs

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")  # a declared dependency; skip only in a bare env

TOKENS_BS = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {f: save(f, root / f) for f in FAMILIES}


def reference_logits(folder: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS_BS).logits


def our_logits(model: Transformer) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(TOKENS_BS).logits_BSV


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_logits_equal_transformers(folders, family) -> None:
    cfg, model = from_pretrained(folders[family])
    assert cfg.model.family == family
    assert (our_logits(model) - reference_logits(folders[family])).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_import_then_export_is_bit_identical_and_loads_in_transformers(folders, family, tmp_path) -> None:
    cfg, model = from_pretrained(folders[family])
    out = save_pretrained(model, cfg, tmp_path / "out")
    original, exported = load_file(folders[family] / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)
    assert [k for k in original if not torch.equal(original[k], exported[k])] == []
    assert (reference_logits(out) - reference_logits(folders[family])).abs().max().item() <= 1e-6


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_stacked_expert_tensors_of_transformers_5_import_the_same(folders, family, tmp_path) -> None:
    """transformers >= 5 holds experts as [E, 2F, D] gate_up and [E, D, F] down tensors (and a
    Mixtral block as `mlp`); a folder written from its in-memory state dict imports the same."""
    state = {k: v.contiguous() for k, v in build(family).state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    (tmp_path / "stacked").mkdir()
    save_file(state, tmp_path / "stacked" / "model.safetensors")
    shutil.copy(folders[family] / "config.json", tmp_path / "stacked")
    stacked, per_expert = from_pretrained(tmp_path / "stacked")[1], from_pretrained(folders[family])[1]
    assert torch.equal(our_logits(stacked), our_logits(per_expert))


def test_sharded_export_with_index_loads_in_transformers(folders, tmp_path) -> None:
    cfg, model = from_pretrained(folders["qwen3_moe"])
    out = save_pretrained(model, cfg, tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    assert (reference_logits(out) - our_logits(model)).abs().max().item() <= 1e-5
    assert torch.equal(our_logits(from_pretrained(out)[1]), our_logits(model))  # and back


def test_an_expert_parallel_rank_reads_only_the_shared_tensors_and_its_own_experts(folders) -> None:
    folder = folders["olmoe"]  # 4 experts in each of 2 MoE layers; EP=2 rank 1 holds experts 2 and 3
    cfg, full = from_pretrained(folder)
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.router)
    mine = [2, 3]
    for moe in moe_layers(model):
        moe.experts.keep_experts(torch.tensor(mine))
    model.to_empty(device="cpu")
    read = load_weights(model, cfg, folder, {f"blocks.{i}.ffn": mine for i in range(cfg.model.n_layers)})

    with safe_open(folder / "model.safetensors", framework="pt") as f:  # the expected bytes, from the file
        sizes = {k: f.get_tensor(k).numel() * 4 for k in f.keys()}
    shared = sum(n for k, n in sizes.items() if ".experts." not in k)
    own = sum(n for k, n in sizes.items() if any(f".experts.{e}." in k for e in mine))
    assert read.bytes_read == shared + own
    assert own < sum(n for k, n in sizes.items() if ".experts." in k)
    for ours, whole in zip(moe_layers(model), moe_layers(full)):
        assert torch.equal(ours.experts.w_down_EFD, whole.experts.w_down_EFD[mine])


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_a_swapped_tensor_fails_naming_it(folders, tmp_path) -> None:
    def swap(t):  # expert 1's gate (w1, [F, D]) and down (w2, [D, F]) projections trade places
        moe = "model.layers.0.block_sparse_moe.experts.1"
        t[f"{moe}.w1.weight"], t[f"{moe}.w2.weight"] = t[f"{moe}.w2.weight"], t[f"{moe}.w1.weight"]

    bad = _edited_copy(folders["mixtral"], tmp_path / "bad", swap)
    named = r"tensor model\.layers\.0\.block_sparse_moe\.experts\.1\.w[12]\.weight has shape"
    with pytest.raises(HFError, match=named):
        from_pretrained(bad)


def test_a_missing_tensor_fails_naming_it(folders, tmp_path) -> None:
    bad = _edited_copy(folders["qwen2_moe"], tmp_path / "bad",
                       lambda t: t.pop("model.layers.1.mlp.shared_expert_gate.weight"))  # fmt: skip
    with pytest.raises(HFError, match=r"^missing tensor model\.layers\.1\.mlp\.shared_expert_gate\.weight "):
        from_pretrained(bad)


def test_an_extra_tensor_fails_naming_it(folders, tmp_path) -> None:
    bad = _edited_copy(folders["llama"], tmp_path / "bad",
                       lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))  # fmt: skip
    with pytest.raises(HFError, match=r"^unexpected tensor model\.layers\.0\.mlp\.extra\.weight:"):
        from_pretrained(bad)


def test_an_unsupported_option_fails_in_one_line(folders, tmp_path) -> None:
    bad = tmp_path / "yarn"
    shutil.copytree(folders["qwen3"], bad)
    hf = json.loads((bad / "config.json").read_text())
    hf["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (bad / "config.json").write_text(json.dumps(hf))
    with pytest.raises(HFError, match=r"^qwen3: rope type 'yarn' \(rope_scaling\) is not supported by epmoe"):
        from_pretrained(bad)


def test_export_refuses_a_non_empty_folder_and_leaves_nothing_behind(folders, tmp_path) -> None:
    cfg, model = from_pretrained(folders["llama"])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(HFError, match="exists and is not empty"):
        save_pretrained(model, cfg, tmp_path / "taken")
    with pytest.raises(TypeError):  # a failure mid-write: no folder and no temporary left
        save_pretrained(model, cfg, tmp_path / "new", max_shard_bytes="big")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_has_a_tiny_model_config_that_is_the_imported_architecture(family, tmp_path) -> None:
    from epmoe.train.cli import load_config

    tiny_configs(vocab_size=256)[family].save_pretrained(tmp_path)  # config.json only
    imported = config_from_hf(tmp_path)
    composed = load_config([f"model={family}_tiny"])
    assert (composed.model, composed.router) == (imported.model, imported.router)
