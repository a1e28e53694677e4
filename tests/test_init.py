"""Meta-device initialisation (epmoe/model/init.py, epmoe/parallel/materialize.py), without a
process group: every tensor of every model config gets a recorded rule, the rules are what the
modules' constructors say, a rank's expert rows are the one-process model's rows of those
experts, tied weights stay tied, and a tied Hugging Face model imports tied."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from epmoe.model.init import Rule, build_on_meta, initialise
from epmoe.parallel.materialize import materialize
from epmoe.train.cli import load_config

from .conftest import REPO, TINY

MODEL_CONFIGS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))


@pytest.mark.parametrize("model", MODEL_CONFIGS)
def test_every_tensor_of_every_model_config_has_a_rule(model: str) -> None:
    cfg = load_config([f"model={model}", "model.n_layers=2", "model.first_dense_layers=1"])
    meta, plan = build_on_meta(cfg.model, cfg.router, seed=0)
    names = {n for n, _ in meta.named_parameters()} | {n for n, _ in meta.named_buffers()}
    assert names == set(plan.rules) and all(t.is_meta for t in meta.parameters())


def test_the_rules_are_the_constructors_initialisation() -> None:
    cfg = load_config([*TINY, "model.tie_embeddings=false"])
    _, plan = build_on_meta(cfg.model, cfg.router, seed=0)
    D, F = cfg.model.d_model, cfg.model.expert_hidden  # noqa: N806
    rules = plan.rules
    assert rules["embed.weight"] == Rule("normal_", (0.0, 0.02))
    assert rules["head.weight"] == Rule("normal_", (0.0, 0.02))
    assert rules["blocks.0.attn_norm.weight"] == Rule("fill_", (1.0,))
    assert rules["blocks.0.ffn.router.expert_bias_E"] == Rule("fill_", (0.0,))
    bound = 1 / math.sqrt(D)  # nn.Linear's kaiming-uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert rules["blocks.0.ffn.router.gate.weight"].op == "uniform_"
    assert rules["blocks.0.ffn.router.gate.weight"].args == pytest.approx((-bound, bound))
    assert rules["blocks.0.ffn.experts.w_gate_EDF"] == Rule("normal_", (0.0, 1 / math.sqrt(D)))
    out_scale = 1 / math.sqrt(2 * cfg.model.n_layers)  # GPT-2's residual scaling of output projections
    assert rules["blocks.1.ffn.experts.w_down_EFD"].args == pytest.approx((0.0, out_scale / math.sqrt(F)))


def test_materialised_values_follow_the_rules_and_do_not_depend_on_the_layout() -> None:
    cfg = load_config(TINY)
    whole, plan = build_on_meta(cfg.model, cfg.router, seed=3)
    initialise(whole, plan, torch.device("cpu"))
    assert torch.equal(whole.blocks[0].attn_norm.weight, torch.ones(cfg.model.d_model))
    assert torch.equal(whole.blocks[1].ffn.router.expert_bias_E, torch.zeros(cfg.model.num_experts))
    embed = whole.embed.weight
    assert abs(embed.std().item() - 0.02) < 0.002 and abs(embed.mean().item()) < 0.002
    # a rank holding experts 3 and 1 (in that order) draws exactly the one-process rows of those
    part, plan = build_on_meta(cfg.model, cfg.router, seed=3)
    for moe in (b.ffn for b in part.blocks):
        moe.experts.keep_experts(torch.tensor([3, 1]))
    materialize(part, plan, {f"blocks.{i}.ffn": [3, 1] for i in range(cfg.model.n_layers)}, torch.device("cpu"))
    for name, p in part.named_parameters():
        ref = whole.get_parameter(name)
        expected = ref[[3, 1]] if "experts.w_" in name else ref
        assert torch.equal(p, expected), name
    other, plan = build_on_meta(cfg.model, cfg.router, seed=4)
    initialise(other, plan, torch.device("cpu"))
    assert not torch.equal(other.embed.weight, whole.embed.weight)  # the seed does matter


def test_tied_embeddings_stay_tied_through_materialisation() -> None:
    cfg = load_config(TINY)  # tie_embeddings=true by default
    model, plan = build_on_meta(cfg.model, cfg.router, seed=0)
    initialise(model, plan, torch.device("cpu"))
    assert model.head.weight is model.embed.weight
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})


def test_a_tied_hugging_face_model_imports_tied(tmp_path: Path) -> None:
    """tie_word_embeddings=true (Qwen3's small models): the head must be the embedding after the
    meta-device import, as in transformers, not an untied copy that would train apart."""
    transformers = pytest.importorskip("transformers")
    from epmoe.hf import from_pretrained
    from tests.hf_tiny import perturbed, tiny_configs

    hf_cfg = tiny_configs()["qwen3"]
    hf_cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    ref = perturbed(transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32), "none")
    ref.save_pretrained(tmp_path / "qwen3")
    cfg, model = from_pretrained(tmp_path / "qwen3")
    assert cfg.model.tie_embeddings and model.head.weight is model.embed.weight
    tokens_BS = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ref(tokens_BS).logits - model.eval()(tokens_BS).logits_BSV).abs().max().item()
    assert diff <= 1e-5


def test_a_checkpoint_of_a_tied_model_loads_tied(tmp_path: Path) -> None:
    """load_model (export, generate, eval, upcycle) assigns the loaded tensors: the head must stay the
    embedding, or an optimizer built over the model would hold one parameter more than was saved."""
    from epmoe.train.checkpoint_model import load_model
    from tests.tiny_checkpoint import random_model, save_checkpoint

    cfg = load_config(TINY)
    save_checkpoint(tmp_path / "run", cfg, random_model(cfg))
    model = load_model(tmp_path / "run").model
    assert cfg.model.tie_embeddings and model.head.weight is model.embed.weight
