"""Decoder-only LM: embeddings, pre-norm blocks (RMSNorm, RoPE causal attention, dense or MoE
FFN), a final norm and the LM head. Written for one device; no torch.distributed here.

Shape key: B batch, S sequence length, D model width, H heads, Dh head size, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from epmoe.config import ModelConfig, RouterConfig
from epmoe.model.experts import MLP
from epmoe.model.moe import MoE
from epmoe.model.router import Routing


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    """MoE iff experts exist, past the leading dense layers, and on the moe_every stride."""
    if cfg.num_experts == 0 or layer < cfg.first_dense_layers:
        return False
    return (layer - cfg.first_dense_layers) % cfg.moe_every == 0


def rope_tables(max_seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos_SR, sin_SR with R = head_dim / 2 rotation frequencies."""
    inv_freq_R = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles_SR = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq_R)
    return angles_SR.cos(), angles_SR.sin()


def apply_rope(x_BHSDh: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
    """Rotate (even, odd) pairs of each head by position-dependent angles."""
    S = x_BHSDh.shape[2]
    x1, x2 = x_BHSDh[..., 0::2], x_BHSDh[..., 1::2]
    cos, sin = cos_SR[:S].to(x_BHSDh.dtype), sin_SR[:S].to(x_BHSDh.dtype)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2)  # (..., R, 2) -> (..., Dh), pairs back in place


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, out_init_scale: float):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        nn.init.normal_(self.qkv.weight, std=1 / math.sqrt(cfg.d_model))
        nn.init.normal_(self.out.weight, std=out_init_scale / math.sqrt(cfg.d_model))

    def forward(self, x_BSD: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        qkv = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, S, Dh)
        q, k = apply_rope(q, cos_SR, sin_SR), apply_rope(k, cos_SR, sin_SR)
        y_BHSDh = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y_BHSDh.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, router_cfg: RouterConfig, layer: int):
        super().__init__()
        out_scale = 1 / math.sqrt(2 * cfg.n_layers)  # residual branches start small (GPT-2)
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, out_scale)
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
        cos_SR, sin_SR = rope_tables(cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("cos_SR", cos_SR, persistent=False)
        self.register_buffer("sin_SR", sin_SR, persistent=False)

    def forward(self, tokens_BS: torch.Tensor) -> LMOutput:
        x_BSD = self.embed(tokens_BS)
        routings = []
        for block in self.blocks:
            x_BSD, routing = block(x_BSD, self.cos_SR, self.sin_SR)
            if routing is not None:
                routings.append(routing)
        logits_BSV = self.head(self.norm(x_BSD))
        return LMOutput(logits_BSV, routings)

    @torch.no_grad()
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
