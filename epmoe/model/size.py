"""How big a model is, from its config alone: parameter counts without building the model.

`Transformer(cfg)` with `model.n_layers=100000000` would take hours to build and more memory than
any machine has; the checks before a run (epmoe/train/preflight.py) need its size at once. One
block of each kind (dense, MoE) is built on the `meta` device (shapes only, no memory) and
counted once per layer of its kind, so the count follows the model code as it changes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from epmoe.choices import AttentionKind
from epmoe.config import ModelConfig, RouterConfig
from epmoe.model.transformer import Block, Transformer


@dataclass(frozen=True)
class ParameterCounts:
    non_expert: int  # embeddings, attention, norms, dense FFNs, routers, shared experts, head
    expert: int  # the routed experts' weights, all of them (every rank holds its share)

    @property
    def total(self) -> int:
        return self.non_expert + self.expert


def moe_layer_count(cfg: ModelConfig) -> int:
    """How many of the n_layers are MoE (transformer.is_moe_layer, counted without a loop)."""
    if cfg.num_experts == 0 or cfg.n_layers <= cfg.first_dense_layers:
        return 0
    return -(-(cfg.n_layers - cfg.first_dense_layers) // cfg.moe_every)  # ceil


def _block_counts(cfg: ModelConfig, router_cfg: RouterConfig, layer: int) -> tuple[int, int]:
    """(non-expert, expert) parameters of block `layer`."""
    with torch.device("meta"):
        block = Block(cfg, router_cfg, layer)
    expert = sum(p.numel() for p in block.ffn.experts.stacked_weights().values()) if block.is_moe else 0
    return sum(p.numel() for p in block.parameters()) - expert, expert


def parameter_counts(cfg: ModelConfig, router_cfg: RouterConfig) -> ParameterCounts:
    """The parameter counts of `Transformer(cfg, router_cfg)` (tied weights counted once)."""
    n_moe = moe_layer_count(cfg)
    n_dense = cfg.n_layers - n_moe
    non_expert = expert = 0
    if n_moe:
        moe_non_expert, expert_one = _block_counts(cfg, router_cfg, cfg.first_dense_layers)
        non_expert, expert = n_moe * moe_non_expert, n_moe * expert_one
    if n_dense:
        dense_layer = 0 if cfg.first_dense_layers or not n_moe else cfg.first_dense_layers + 1
        non_expert += n_dense * _block_counts(cfg, router_cfg, dense_layer)[0]
    with torch.device("meta"):  # embeddings, final norm and head: a model without blocks
        shell = Transformer(replace(cfg, n_layers=0), router_cfg)
    return ParameterCounts(non_expert + sum(p.numel() for p in shell.parameters()), expert)


def training_flops_per_token(cfg: ModelConfig, router_cfg: RouterConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward), the count MFU divides by:

        6 · N_active + 6 · n_layers · n_heads · (d_qk + d_v) · seq_len

    N_active: the parameters a token multiplies by — every non-expert parameter except the input
    embedding (a lookup; a tied embedding is counted once, as the head), plus top_k / num_experts of
    the routed experts' (the capacity's drops ignored). The second term is attention's scores and
    weighted sum (QKᵀ and AV, 2 FLOPs per multiply-add, ×3 for backward), the causal mask's half
    not subtracted, as PaLM's appendix B counts it; d_qk = d_v = head_dim for standard attention,
    nope + rope and v_head_dim for MLA."""
    counts = parameter_counts(cfg, router_cfg)
    embedding = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    active_experts = counts.expert * router_cfg.top_k / cfg.num_experts if cfg.num_experts else 0
    n_active = counts.non_expert - embedding + active_experts
    if cfg.attention == AttentionKind.mla:
        d_qk, d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        d_qk = d_v = cfg.head_size()
    return 6 * n_active + 6 * cfg.n_layers * cfg.n_heads * (d_qk + d_v) * seq_len
