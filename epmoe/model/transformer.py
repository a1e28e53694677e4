"""Decoder-only LM: embeddings, pre-norm blocks (RMSNorm, RoPE causal attention from
attention.py, dense or MoE FFN), a final norm and the LM head. Written for one device; no
torch.distributed here.

Shape key: B batch, S sequence length, D model width, R rotary frequencies, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from epmoe.config import ModelConfig, RouterConfig
from epmoe.model.attention import make_attention, rope_tables, rotated_dims
from epmoe.model.experts import MLP
from epmoe.model.moe import MoE
from epmoe.model.router import Routing


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    """MoE iff experts exist, past the leading dense layers, and on the moe_every stride."""
    if cfg.num_experts == 0 or layer < cfg.first_dense_layers:
        return False
    return (layer - cfg.first_dense_layers) % cfg.moe_every == 0


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, router_cfg: RouterConfig, layer: int):
        super().__init__()
        out_scale = 1 / math.sqrt(2 * cfg.n_layers)  # residual branches start small (GPT-2)
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = make_attention(cfg, out_scale)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.is_moe = is_moe_layer(cfg, layer)
        self.ffn: nn.Module = (
            MoE(cfg, router_cfg, out_scale)
            if self.is_moe
            else MLP(cfg.d_model, cfg.dense_hidden, cfg.activation, out_scale)
        )

    def forward(self, x_BSD: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor):
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos_SR, sin_SR)
        h_BSD = self.ffn_norm(x_BSD)
        if self.is_moe:  # the MoE layer also returns its routing
            y_BSD, routing = self.ffn(h_BSD)
            return x_BSD + y_BSD, routing
        return x_BSD + self.ffn(h_BSD), None


@dataclass
class LMOutput:
    logits_BSV: torch.Tensor
    routings: list[Routing]  # one per MoE layer, in layer order


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, router_cfg: RouterConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)  # GPT-2; small so tied logits start near uniform
        self.blocks = nn.ModuleList(Block(cfg, router_cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=0.02)

    def forward(self, tokens_BS: torch.Tensor) -> LMOutput:
        x_BSD = self.embed(tokens_BS)
        # built per call for this length (S x R, small): a table for an imported model's whole
        # context (max_position_embeddings, 128k and more) would not be
        cos_SR, sin_SR = rope_tables(tokens_BS.shape[1], rotated_dims(self.cfg), self.cfg.rope_theta, x_BSD.device)
        routings = []
        for block in self.blocks:
            x_BSD, routing = block(x_BSD, cos_SR, sin_SR)
            if routing is not None:
                routings.append(routing)
        logits_BSV = self.head(self.norm(x_BSD))
        return LMOutput(logits_BSV, routings)

    @torch.no_grad()
    def moe_blocks(self) -> list[int]:
        """The block index of each MoE layer, in order (metrics name layers `moe/L{i}/...` by it)."""
        return [i for i, block in enumerate(self.blocks) if block.is_moe]

    def generate(self, prompt_S: torch.Tensor, n_new: int, temperature: float = 0.8, generator=None) -> torch.Tensor:
        """Sample n_new tokens after prompt_S (1-D); returns prompt and continuation."""
        tokens = prompt_S.clone()
        for _ in range(n_new):
            context_1S = tokens[-self.cfg.max_seq_len :].unsqueeze(0)
            logits_V = self(context_1S).logits_BSV[0, -1].float()
            probs_V = (logits_V / max(temperature, 1e-5)).softmax(-1)
            nxt = torch.multinomial(probs_V, 1, generator=generator)
            tokens = torch.cat([tokens, nxt])
        return tokens
