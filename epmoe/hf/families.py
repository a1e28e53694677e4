"""One adapter per Hugging Face family: config.json <-> (ModelConfig, RouterConfig), and the
tensor links (links.py) between the family's checkpoint names and epmoe's parameters.

Families: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 (MoE) and Llama, Qwen3 (dense, the
starting points for upcycling). A config option epmoe does not implement (a RoPE scaling type,
sliding windows, QKV clipping, ...) is refused in one line naming the key; nothing is ignored
silently. Every translation here is checked against `transformers` itself
(tests/test_hf.py): the imported model's logits equal the reference's.
"""

from __future__ import annotations

from dataclasses import dataclass

from epmoe.config import ModelConfig, RouterConfig
from epmoe.hf.links import HFError, Link
from epmoe.model.transformer import is_moe_layer


def _unsupported(family: str, what: str) -> HFError:
    return HFError(f"{family}: {what} is not supported by epmoe; use a checkpoint without it")


@dataclass(frozen=True)
class Adapter:
    name: str  # epmoe's model.family, the config.json's model_type
    architecture: str  # config.json "architectures"
    # config.json keys of the number of routed experts, the published one first (transformers 5
    # writes Qwen3-MoE's as num_local_experts); empty: a dense family
    experts_key: tuple[str, ...]
    moe_module: str = "mlp"  # the MoE block's name in published checkpoints (Mixtral: block_sparse_moe)
    expert_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # Mixtral: w1, w3, w2
    shared_module: str | None = None  # shared experts' module name
    score_bias: bool = False  # the router has e_score_correction_bias (DeepSeek-V3)

    # -- config.json -> epmoe ----------------------------------------------------------------------

    def to_config(self, hf: dict) -> tuple[ModelConfig, RouterConfig]:
        """epmoe's model and router config of a config.json (raises HFError on what epmoe lacks)."""
        n = self.name
        if hf.get("hidden_act", "silu") != "silu":
            raise _unsupported(n, f"hidden_act={hf['hidden_act']!r} (epmoe's FFNs are SwiGLU)")
        rope = dict(hf.get("rope_parameters") or {})
        rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type != "default":
            raise _unsupported(n, f"rope type {rope_type!r} (rope_scaling)")
        if hf.get("partial_rotary_factor", 1.0) != 1.0:
            raise _unsupported(n, f"partial_rotary_factor={hf['partial_rotary_factor']}")
        if hf.get("sliding_window") and hf.get("use_sliding_window", True):
            raise _unsupported(n, f"sliding_window={hf['sliding_window']} (sliding-window attention)")
        if hf.get("mlp_bias"):
            raise _unsupported(n, "mlp_bias=true")
        if hf.get("clip_qkv") is not None:
            raise _unsupported(n, f"clip_qkv={hf['clip_qkv']}")
        if hf.get("mlp_only_layers"):
            raise _unsupported(n, f"mlp_only_layers={hf['mlp_only_layers']}")
        d, heads = hf["hidden_size"], hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or d // heads
        m = dict(
            family=n, vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=0 if head_dim == d // heads else head_dim,
            max_seq_len=hf["max_position_embeddings"], rope_theta=float(rope["rope_theta"]),
            norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_interleaved=False, dense_hidden=hf["intermediate_size"], num_experts=0, first_dense_layers=0,
            moe_every=1, n_shared_experts=0, exchange_dim=0, qkv_bias=bool(hf.get("attention_bias", False)),
            out_bias=bool(hf.get("attention_bias", False)),
        )  # fmt: skip
        r = dict(aux_loss="batch", aux_loss_coef=hf.get("router_aux_loss_coef", 0.01), z_loss_coef=0.0,
                 renormalize=bool(hf.get("norm_topk_prob", True)))  # fmt: skip
        if self.experts_key:
            key = next((k for k in self.experts_key if k in hf), self.experts_key[0])
            m.update(num_experts=hf[key], expert_hidden=hf.get("moe_intermediate_size") or hf["intermediate_size"])
            r.update(top_k=hf["num_experts_per_tok"])
            step = hf.get("decoder_sparse_step", 1)  # HF: layer i is MoE iff (i + 1) % step == 0
            m.update(first_dense_layers=step - 1, moe_every=step)
        self._family_config(hf, m, r)
        return ModelConfig(**m), RouterConfig(**r)

    def _family_config(self, hf: dict, m: dict, r: dict) -> None:
        n = self.name
        if n == "mixtral":
            if hf.get("router_jitter_noise"):
                raise _unsupported(n, f"router_jitter_noise={hf['router_jitter_noise']}")
            r.update(renormalize=True)
        elif n == "qwen2_moe":
            m.update(qkv_bias=bool(hf.get("qkv_bias", True)), out_bias=False, n_shared_experts=1,
                     shared_hidden=hf["shared_expert_intermediate_size"], shared_gate=True)  # fmt: skip
            r.update(renormalize=bool(hf.get("norm_topk_prob", False)))
        elif n in ("qwen3_moe", "qwen3"):
            m.update(qk_norm="head")
        elif n == "olmoe":
            m.update(qk_norm="full")
            r.update(renormalize=bool(hf.get("norm_topk_prob", False)), z_loss_coef=hf.get("router_z_loss_coef", 0.0))
        elif n == "deepseek_v3":
            if hf.get("moe_layer_freq", 1) != 1:
                raise _unsupported(n, f"moe_layer_freq={hf['moe_layer_freq']} (transformers' DeepSeek-V3 ignores it)")
            if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
                raise _unsupported(n, "a router other than sigmoid scores with noaux_tc top-k")
            m.update(attention="mla", n_kv_heads=0, head_dim=0, q_lora_rank=hf.get("q_lora_rank") or 0,
                     kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
                     qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
                     rope_interleaved=bool(hf.get("rope_interleave", True)),
                     first_dense_layers=hf["first_k_dense_replace"], moe_every=1,
                     n_shared_experts=hf.get("n_shared_experts") or 0,
                     shared_hidden=hf["moe_intermediate_size"])  # fmt: skip
            r.update(score_func="sigmoid", n_groups=hf.get("n_group") or 1, topk_groups=hf.get("topk_group") or 1,
                     group_score="top2_sum", routed_scaling=float(hf.get("routed_scaling_factor", 1.0)),
                     renormalize=bool(hf.get("norm_topk_prob", True)), aux_loss="sequence", aux_loss_coef=1e-4,
                     bias_update_rate=1e-3)  # fmt: skip

    # -- epmoe -> config.json ----------------------------------------------------------------------

    def to_hf_config(self, m: ModelConfig, r: RouterConfig) -> dict:
        """The config.json `transformers` builds this model from (the inverse of to_config)."""
        hf = dict(
            architectures=[self.architecture], model_type=self.name, vocab_size=m.vocab_size, hidden_size=m.d_model,
            num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.kv_heads(),
            max_position_embeddings=m.max_seq_len, rope_theta=m.rope_theta,
            rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta}, rms_norm_eps=m.norm_eps,
            tie_word_embeddings=m.tie_embeddings, hidden_act="silu", intermediate_size=m.dense_hidden,
            attention_bias=m.qkv_bias, torch_dtype="float32",
        )  # fmt: skip
        if m.head_dim:
            hf["head_dim"] = m.head_dim
        if self.experts_key:
            hf.update({self.experts_key[0]: m.num_experts, "num_experts_per_tok": r.top_k,
                       "moe_intermediate_size": m.expert_hidden, "norm_topk_prob": r.renormalize,
                       "decoder_sparse_step": m.moe_every, "output_router_logits": False})  # fmt: skip
        n = self.name
        if n == "mixtral":
            hf.update(intermediate_size=m.expert_hidden, sliding_window=None)
        elif n == "qwen2_moe":
            hf.update(qkv_bias=m.qkv_bias, attention_bias=False, shared_expert_intermediate_size=m.shared_hidden,
                      use_sliding_window=False, mlp_only_layers=[])  # fmt: skip
        elif n in ("qwen3_moe", "qwen3"):
            hf.update(head_dim=m.head_size(), use_sliding_window=False, mlp_only_layers=[])
        elif n == "olmoe":
            hf.update(intermediate_size=m.expert_hidden, clip_qkv=None)
        elif n == "deepseek_v3":
            hf.update(q_lora_rank=m.q_lora_rank or None, kv_lora_rank=m.kv_lora_rank,
                      qk_nope_head_dim=m.qk_nope_head_dim, qk_rope_head_dim=m.qk_rope_head_dim,
                      v_head_dim=m.v_head_dim, head_dim=m.qk_rope_head_dim, rope_interleave=m.rope_interleaved,
                      first_k_dense_replace=m.first_dense_layers, n_shared_experts=m.n_shared_experts,
                      n_group=r.n_groups, topk_group=r.topk_groups, routed_scaling_factor=r.routed_scaling,
                      num_key_value_heads=m.n_heads, num_nextn_predict_layers=0)  # fmt: skip
        return hf

    # -- tensors --------------------------------------------------------------------------------------

    def ignored(self, their_names: list[str], m: ModelConfig) -> dict[str, str]:
        """HF tensors deliberately not imported, with the reason (printed by the import)."""
        out = {}
        for name in their_names:
            if m.tie_embeddings and name == "lm_head.weight":
                out[name] = "tied to model.embed_tokens.weight (tie_word_embeddings)"
            elif name.startswith(f"model.layers.{m.n_layers}.") and self.name == "deepseek_v3":
                out[name] = "a multi-token-prediction layer (num_nextn_predict_layers): epmoe trains none"
            elif name.endswith("rotary_emb.inv_freq"):
                out[name] = "a RoPE table epmoe computes itself"
        return out

    def links(self, m: ModelConfig, stacked_layers: set[int] = frozenset()) -> list[Link]:
        """Every link of a model of config `m`; MoE layers in `stacked_layers` read transformers-5
        stacked expert tensors instead of the per-expert ones."""
        out = [Link("embed.weight", "model.embed_tokens.weight"), Link("norm.weight", "model.norm.weight")]
        if not m.tie_embeddings:
            out.append(Link("head.weight", "lm_head.weight"))
        for i in range(m.n_layers):
            ours, theirs = f"blocks.{i}", f"model.layers.{i}"
            out += [Link(f"{ours}.attn_norm.weight", f"{theirs}.input_layernorm.weight"),
                    Link(f"{ours}.ffn_norm.weight", f"{theirs}.post_attention_layernorm.weight")]  # fmt: skip
            out += self._attention_links(m, f"{ours}.attn", f"{theirs}.self_attn")
            if is_moe_layer(m, i):
                out += self._moe_links(m, f"{ours}.ffn", theirs, i in stacked_layers)
            else:
                out += _mlp_links(f"{ours}.ffn", f"{theirs}.mlp")
        return out

    def _attention_links(self, m: ModelConfig, ours: str, theirs: str) -> list[Link]:
        if m.attention == "mla":
            out = [Link(f"{ours}.kv_a_proj.weight", f"{theirs}.kv_a_proj_with_mqa.weight"),
                   Link(f"{ours}.kv_a_norm.weight", f"{theirs}.kv_a_layernorm.weight"),
                   Link(f"{ours}.kv_b_proj.weight", f"{theirs}.kv_b_proj.weight"),
                   Link(f"{ours}.out.weight", f"{theirs}.o_proj.weight")]  # fmt: skip
            if m.q_lora_rank:
                out += [Link(f"{ours}.q_a_proj.weight", f"{theirs}.q_a_proj.weight"),
                        Link(f"{ours}.q_a_norm.weight", f"{theirs}.q_a_layernorm.weight"),
                        Link(f"{ours}.q_b_proj.weight", f"{theirs}.q_b_proj.weight")]  # fmt: skip
            else:
                out.append(Link(f"{ours}.q_proj.weight", f"{theirs}.q_proj.weight"))
            if m.qkv_bias:
                out += [Link(f"{ours}.kv_a_proj.bias", f"{theirs}.kv_a_proj_with_mqa.bias")]
                if m.q_lora_rank:
                    out.append(Link(f"{ours}.q_a_proj.bias", f"{theirs}.q_a_proj.bias"))
            if m.out_bias:
                out.append(Link(f"{ours}.out.bias", f"{theirs}.o_proj.bias"))
            return out
        q, kv = m.n_heads * m.head_size(), m.kv_heads() * m.head_size()
        rows = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
        kinds = ("weight", "bias") if m.qkv_bias else ("weight",)
        out = [Link(f"{ours}.qkv.{kind}", f"{theirs}.{p}.{kind}", ours_rows=r)
               for kind in kinds for p, r in rows.items()]  # fmt: skip
        out.append(Link(f"{ours}.out.weight", f"{theirs}.o_proj.weight"))
        if m.out_bias:
            out.append(Link(f"{ours}.out.bias", f"{theirs}.o_proj.bias"))
        if m.qk_norm != "none":
            out += [Link(f"{ours}.q_norm.weight", f"{theirs}.q_norm.weight"),
                    Link(f"{ours}.k_norm.weight", f"{theirs}.k_norm.weight")]  # fmt: skip
        return out

    def _moe_links(self, m: ModelConfig, ours: str, layer: str, stacked: bool) -> list[Link]:
        # transformers >= 5 holds a Mixtral's block as `mlp`, and writes it back as block_sparse_moe
        moe = f"{layer}.{'mlp' if stacked else self.moe_module}"
        out = [Link(f"{ours}.router.gate.weight", f"{moe}.gate.weight")]
        if self.score_bias:
            out.append(Link(f"{ours}.router.expert_bias_E", f"{moe}.gate.e_score_correction_bias"))
        F = m.expert_hidden
        for e in range(m.num_experts):
            if stacked:  # gate_up_proj [E, 2F, D]: gate rows first; down_proj [E, D, F]
                gate_up, down = f"{moe}.experts.gate_up_proj", f"{moe}.experts.down_proj"
                out += [Link(f"{ours}.experts.w_gate_EDF", gate_up, e, None, True, (0, F), True),
                        Link(f"{ours}.experts.w_up_EDF", gate_up, e, None, True, (F, 2 * F), True),
                        Link(f"{ours}.experts.w_down_EFD", down, e, None, True, None, True)]  # fmt: skip
            else:
                gate, up, down = self.expert_proj
                out += [Link(f"{ours}.experts.{w}", f"{moe}.experts.{e}.{p}.weight", e, transpose=True)
                        for w, p in (("w_gate_EDF", gate), ("w_up_EDF", up), ("w_down_EFD", down))]  # fmt: skip
        if self.shared_module and m.n_shared_experts:
            out += _mlp_links(f"{ours}.shared", f"{moe}.{self.shared_module}")
            if m.shared_gate:
                out.append(Link(f"{ours}.shared.output_gate.weight", f"{moe}.shared_expert_gate.weight"))
        return out


def _mlp_links(ours: str, theirs: str) -> list[Link]:
    return [Link(f"{ours}.w_gate.weight", f"{theirs}.gate_proj.weight"),
            Link(f"{ours}.w_up.weight", f"{theirs}.up_proj.weight"),
            Link(f"{ours}.w_down.weight", f"{theirs}.down_proj.weight")]  # fmt: skip


FAMILIES: dict[str, Adapter] = {
    f.name: f
    for f in (
        Adapter("mixtral", "MixtralForCausalLM", ("num_local_experts",), moe_module="block_sparse_moe",
               expert_proj=("w1", "w3", "w2")),
        Adapter("qwen2_moe", "Qwen2MoeForCausalLM", ("num_experts",), shared_module="shared_expert"),
        Adapter("qwen3_moe", "Qwen3MoeForCausalLM", ("num_experts", "num_local_experts")),
        Adapter("olmoe", "OlmoeForCausalLM", ("num_experts",)),
        Adapter("deepseek_v3", "DeepseekV3ForCausalLM", ("n_routed_experts",), shared_module="shared_experts",
               score_bias=True),
        Adapter("llama", "LlamaForCausalLM", ()),
        Adapter("qwen3", "Qwen3ForCausalLM", ()),
    )
}  # fmt: skip


def family_of(hf: dict, where: str) -> Adapter:
    """The adapter of a config.json's model_type."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise HFError(f"{where}: model_type {model_type!r} is not supported; epmoe imports {', '.join(FAMILIES)}")
    return FAMILIES[model_type]
