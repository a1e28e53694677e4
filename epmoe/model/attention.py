"""Causal self-attention with rotary positions: standard (multi-head / grouped-query, optional
QK-norm and q/k/v biases) and DeepSeek's multi-head latent attention (MLA).

Shape key: B batch, S sequence length, D model width, H query heads, G key/value heads,
Dh head size, R rotary frequencies (half the rotated dims), L latent (low-rank) width,
P positions attended to (the cache's past ones and the S new ones; P = S without a cache),
V value dims of MLA. A rotary table's leading dim is B, or 1 where every row has the same positions.

Each variant computes what its Hugging Face family computes (tests/test_hf.py checks
the logits against `transformers`): grouped-query heads share k/v as `repeat_kv` does (query
head h reads k/v head h // (H / G)), QK-norm sits where Qwen3 (per head) or OLMoE (over the
whole projection) puts it, and RoPE rotates either interleaved pairs or the two halves.

With a `LayerCache` (kv_cache.py, generation) a forward computes q, k, v of its S new positions
only, rotated at their absolute positions (the cos/sin tables start at the cache's length),
appends k and v to the cache and attends to every position it holds.

With a document mask (documents.py, data.document_mask) each query attends only to the keys of
its own packed document, through SDPA with a boolean mask_B1SP. Measured against
`torch.nn.attention.flex_attention` on CPU (torch 2.13; B 8, 4 heads, S 256, Dh 32, 2 threads,
medians): SDPA with the mask (built each call, 0.4 ms of it) takes 12.8 ms forward+backward, plain
causal SDPA 11.3 ms. flex_attention has no backward on CPU at all (NotImplementedError); forward
only it takes 163 ms eagerly and 5.2 ms compiled (after 7.9 s of compiling), against SDPA's
4.4 ms, and `create_block_mask` takes 1.4 s eagerly, again for every batch, whose documents
differ. The mask is S x S bools per row (64 KiB at S 256).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from epmoe.config import ModelConfig
from epmoe.model.kv_cache import LayerCache

# DeepSeek's reference builds the latent norms (q_a_layernorm, kv_a_layernorm) with its
# RMSNorm's default eps, not config.rms_norm_eps
LATENT_NORM_EPS = 1e-6


def rope_tables(positions_BS: torch.Tensor, rotated_dims: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos_BSR, sin_BSR (fp32) at positions_BS (integer; B may be 1 for positions every row
    shares), R = rotated_dims / 2 frequencies; on positions_BS's device."""
    device = positions_BS.device
    inv_freq_R = 1.0 / theta ** (torch.arange(0, rotated_dims, 2, device=device).float() / rotated_dims)
    angles_BSR = positions_BS.float()[..., None] * inv_freq_R
    return angles_BSR.cos(), angles_BSR.sin()


def apply_rope(x_BHSDh: torch.Tensor, cos_BSR: torch.Tensor, sin_BSR: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate each frequency's pair of dims by its position's angle (the tables' B is x's or 1).

    interleaved: the pairs are (0, 1), (2, 3), ... and stay in place. Otherwise the pairs are
    (i, i + R), Llama's `rotate_half`. Both give the same attention scores for weights laid out
    for them; which one a checkpoint's weights expect is a property of the family.
    """
    R = x_BHSDh.shape[-1] // 2
    # (B, S, R) -> (B, 1, S, R): one angle per position for every head
    cos, sin = cos_BSR.unsqueeze(1).to(x_BHSDh.dtype), sin_BSR.unsqueeze(1).to(x_BHSDh.dtype)
    if interleaved:
        x1, x2 = x_BHSDh[..., 0::2], x_BHSDh[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return rotated.flatten(-2)  # (..., R, 2) -> (..., Dh), pairs back in place
    x1, x2 = x_BHSDh[..., :R], x_BHSDh[..., R:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def causal_attention(
    q_BHSDh: torch.Tensor, k_BHPDh: torch.Tensor, v_BHPV: torch.Tensor, mask_B1SP: torch.Tensor | None = None
) -> torch.Tensor:
    """y_BHSV: S queries at the last S of P positions, each attending to itself and those before.

    SDPA's `is_causal` aligns its mask to the top left (query i sees keys 0..i), which is right
    only for P = S; after a cache's P - S past positions query i sees keys 0..P - S + i.
    mask_B1SP (bool, True = attend; causal already): the document mask, which replaces the rule.
    """
    if mask_B1SP is not None:
        return F.scaled_dot_product_attention(q_BHSDh, k_BHPDh, v_BHPV, attn_mask=mask_B1SP)
    S, P = q_BHSDh.shape[2], k_BHPDh.shape[2]
    if S == P:
        return F.scaled_dot_product_attention(q_BHSDh, k_BHPDh, v_BHPV, is_causal=True)
    if S == 1:  # the newest position sees every one
        return F.scaled_dot_product_attention(q_BHSDh, k_BHPDh, v_BHPV)
    mask_SP = torch.ones(S, P, dtype=torch.bool, device=q_BHSDh.device).tril(diagonal=P - S)
    return F.scaled_dot_product_attention(q_BHSDh, k_BHPDh, v_BHPV, attn_mask=mask_SP)


def _init(layer: nn.Linear, std: float) -> nn.Linear:
    nn.init.normal_(layer.weight, std=std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _linear(d_in: int, d_out: int, bias: bool, std: float) -> nn.Linear:
    return _init(nn.Linear(d_in, d_out, bias=bias), std)


class Attention(nn.Module):
    """Multi-head attention with G <= H key/value heads; q, k, v from one fused projection
    whose output rows are [q (H*Dh), k (G*Dh), v (G*Dh)]."""

    def __init__(self, cfg: ModelConfig, out_init_scale: float):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads(), cfg.head_size()
        self.interleaved = cfg.rope_interleaved
        H, G, Dh, D = self.n_heads, self.n_kv_heads, self.head_dim, cfg.d_model
        self.qkv = nn.Linear(D, (H + 2 * G) * Dh, bias=cfg.qkv_bias)
        self.out = nn.Linear(H * Dh, D, bias=cfg.out_bias)
        # both built, then both drawn: the order a seed's native model has always been drawn in
        _init(self.qkv, 1 / math.sqrt(D))
        _init(self.out, out_init_scale / math.sqrt(H * Dh))
        self.qk_norm = cfg.qk_norm
        self.q_norm = self.k_norm = None
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = nn.RMSNorm(Dh, eps=cfg.norm_eps), nn.RMSNorm(Dh, eps=cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm, self.k_norm = nn.RMSNorm(H * Dh, eps=cfg.norm_eps), nn.RMSNorm(G * Dh, eps=cfg.norm_eps)

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_BSR: torch.Tensor,
        sin_BSR: torch.Tensor,
        cache: LayerCache | None = None,
        mask_B1SP: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_BSD -> y_BSD; cos_BSR, sin_BSR: the tables of these S positions. cache: the layer's
        past keys and values (rotated, G heads), extended by these S positions. mask_B1SP: the
        document mask (causal_attention)."""
        B, S, _ = x_BSD.shape
        H, G, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x_BSD).split([H * Dh, G * Dh, G * Dh], dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.view(B, S, H, Dh), k.view(B, S, G, Dh), v.view(B, S, G, Dh)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, S, Dh)
        q, k = apply_rope(q, cos_BSR, sin_BSR, self.interleaved), apply_rope(k, cos_BSR, sin_BSR, self.interleaved)
        if cache is not None:  # (B, G, S, Dh) -> (B, G, P, Dh): the past positions' k, v before these
            k, v = cache.extend(k, v)
        if G < H:  # (B, G, P, Dh) -> (B, H, P, Dh): each k/v head serves H / G consecutive query heads
            k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
        y_BHSDh = causal_attention(q, k, v, mask_B1SP)
        return self.out(y_BHSDh.transpose(1, 2).reshape(B, S, H * Dh))


class LatentAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention.

    q: x -> (low-rank L_q, RMSNorm ->) H heads of [nope | rope] dims. k, v: x -> a latent of
    kv_lora_rank dims plus one shared rotary key of rope dims; the latent, normalised, expands
    to H heads of [k nope | v] dims. Only the rope dims are rotated; the scores scale by
    (nope + rope)^-1/2, and each head's value has v_head_dim dims.

    A cache holds each position's per-head keys [k nope | k rope] and values after kv_b_proj's
    up-projection (H * (nope + rope + v_head_dim) numbers per position): the plain exact form.
    DeepSeek's inference caches the normalised latent and the rotary key instead (kv_lora_rank +
    rope) and absorbs kv_b_proj into the query and output projections; this does not.
    """

    def __init__(self, cfg: ModelConfig, out_init_scale: float):
        super().__init__()
        D, H = cfg.d_model, cfg.n_heads
        self.n_heads, self.interleaved = H, cfg.rope_interleaved
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        q_out = H * (self.nope + self.rope)
        self.q_proj = self.q_a_proj = self.q_a_norm = self.q_b_proj = None
        if cfg.q_lora_rank:
            self.q_a_proj = _linear(D, cfg.q_lora_rank, cfg.qkv_bias, 1 / math.sqrt(D))
            self.q_a_norm = nn.RMSNorm(cfg.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = _linear(cfg.q_lora_rank, q_out, False, 1 / math.sqrt(cfg.q_lora_rank))
        else:
            self.q_proj = _linear(D, q_out, False, 1 / math.sqrt(D))
        self.kv_a_proj = _linear(D, self.kv_rank + self.rope, cfg.qkv_bias, 1 / math.sqrt(D))
        self.kv_a_norm = nn.RMSNorm(self.kv_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = _linear(self.kv_rank, H * (self.nope + self.v_dim), False, 1 / math.sqrt(self.kv_rank))
        self.out = _linear(H * self.v_dim, D, cfg.out_bias, out_init_scale / math.sqrt(H * self.v_dim))

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_BSR: torch.Tensor,
        sin_BSR: torch.Tensor,
        cache: LayerCache | None = None,
        mask_B1SP: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_BSD -> y_BSD; cos_BSR, sin_BSR: the tables of these S positions. cache: the layer's
        past per-head keys and values (after the up-projection), extended by these S positions.
        mask_B1SP: the document mask (causal_attention)."""
        B, S, _ = x_BSD.shape
        H = self.n_heads
        if self.q_proj is not None:
            q = self.q_proj(x_BSD)
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BSD)))
        q_nope, q_rope = q.view(B, S, H, self.nope + self.rope).transpose(1, 2).split([self.nope, self.rope], -1)
        latent_BSL, k_rope = self.kv_a_proj(x_BSD).split([self.kv_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_norm(latent_BSL)).view(B, S, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos_BSR, sin_BSR, self.interleaved)
        k_rope = apply_rope(k_rope.view(B, 1, S, self.rope), cos_BSR, sin_BSR, self.interleaved)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(B, H, S, self.rope)), dim=-1)  # one rotary key for all heads
        if cache is not None:  # (B, H, S, .) -> (B, H, P, .): the past positions' k, v before these
            k, v = cache.extend(k, v)
        y_BHSV = causal_attention(q, k, v, mask_B1SP)  # scale (nope + rope)^-1/2
        return self.out(y_BHSV.transpose(1, 2).reshape(B, S, H * self.v_dim))


def make_attention(cfg: ModelConfig, out_init_scale: float) -> nn.Module:
    """The attention `cfg.attention` names."""
    return LatentAttention(cfg, out_init_scale) if cfg.attention == "mla" else Attention(cfg, out_init_scale)


def rotated_dims(cfg: ModelConfig) -> int:
    """How many dims of each head RoPE rotates."""
    return cfg.qk_rope_head_dim if cfg.attention == "mla" else cfg.head_size()
