"""Tiny random Hugging Face models of every family epmoe imports, built with `transformers`
itself from configs written here (nothing downloaded), their weights drawn at random (not
transformers' init, whose ones and zeros would hide a swapped norm or bias)."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-6)  # fmt: skip


def tiny_configs(vocab_size: int = 96) -> dict:
    """vocab_size >= 256 makes a model that trains on bytes (no tokenizer.json in its folder)."""
    import transformers as tr

    COMMON = {**globals()["COMMON"], "vocab_size": vocab_size}  # noqa: N806
    return {
        "mixtral": tr.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": tr.Qwen2MoeConfig(**COMMON, intermediate_size=40, moe_intermediate_size=16,
                                       shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                       norm_topk_prob=False),
        "qwen3_moe": tr.Qwen3MoeConfig(**COMMON, head_dim=16, intermediate_size=40, moe_intermediate_size=16,
                                       num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
        "olmoe": tr.OlmoeConfig(**COMMON, intermediate_size=16, num_experts=4, num_experts_per_tok=2),
        # MLA: transformers' DeepSeek-V3 needs num_key_value_heads == num_attention_heads
        "deepseek_v3": tr.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=40,
                                           moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                                           n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1,
                                           q_lora_rank=12, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                           v_head_dim=6, routed_scaling_factor=2.5, norm_topk_prob=True),
        "llama": tr.LlamaConfig(**COMMON, intermediate_size=40),
        "qwen3": tr.Qwen3Config(**COMMON, head_dim=16, intermediate_size=40),
    }  # fmt: skip


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "llama", "qwen3"]


def build(family: str, seed: int = 0, vocab_size: int = 96):
    """A `transformers` model of the family with every weight and buffer drawn from N(0, 0.3^2)
    (norm weights around 1, so the model stays well scaled), in eval mode."""
    import transformers as tr

    torch.manual_seed(seed)
    model = tr.AutoModelForCausalLM.from_config(tiny_configs(vocab_size)[family], dtype=torch.float32)
    return perturbed(model, "e_score_correction_bias")


def perturbed(model: torch.nn.Module, bias_suffix: str) -> torch.nn.Module:
    """`model` in eval mode with every weight redrawn from N(0, 0.3^2) (norm weights around 1, so
    it stays well scaled) and the routers' balancing biases (buffers named *bias_suffix) from
    N(0, 0.1^2): well away from an init's symmetries. Draws from torch's global generator."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
        for name, b in model.named_buffers():
            if name.endswith(bias_suffix):
                b.copy_(torch.randn_like(b) * 0.1)
    return model.eval()


def save(family: str, folder: Path, seed: int = 0, vocab_size: int = 96) -> Path:
    """Write the family's tiny model as a Hugging Face folder (the published per-expert layout)."""
    build(family, seed, vocab_size).save_pretrained(folder)
    return folder


def save_tokenizer(folder: Path, texts: list[str], vocab_size: int, eos: str = "<|endoftext|>") -> Path:
    """A byte-level BPE tokenizer.json trained with the `tokenizers` library on `texts`, with `eos`
    as its only special token, written into `folder` (beside a model's files, as a hub folder has it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder
