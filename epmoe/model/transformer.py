"""Decoder-only LM: embeddings, pre-norm blocks (RMSNorm, RoPE causal attention from
attention.py, dense or MoE FFN), a final norm and the LM head; and generation from it, with a
key/value cache (kv_cache.py) or without one (the slow reference). Written for one device; no
torch.distributed here.

With `doc_ids_BS` (documents.py; data.document_mask) the forward keeps attention within each
packed document and restarts its positions, so each document computes what it would alone.

Shape key: B batch, S sequence length, D model width, R rotary frequencies, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from epmoe.config import ModelConfig, RouterConfig
from epmoe.model.attention import make_attention, rope_tables, rotated_dims
from epmoe.model.documents import document_mask, document_positions
from epmoe.model.experts import MLP
from epmoe.model.kv_cache import KVCache, LayerCache
from epmoe.model.moe import MoE, moe_layers
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

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_BSR: torch.Tensor,
        sin_BSR: torch.Tensor,
        cache: LayerCache | None = None,
        mask_B1SS: torch.Tensor | None = None,
    ):
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos_BSR, sin_BSR, cache, mask_B1SS)
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

    def forward(
        self, tokens_BS: torch.Tensor, cache: KVCache | None = None, doc_ids_BS: torch.Tensor | None = None
    ) -> LMOutput:
        """Logits of every position of tokens_BS. cache: the keys and values of the positions
        before these (generation); tokens_BS then sits at positions cache.length.. and is added.
        doc_ids_BS: each position's packed document (documents.document_ids): attention stays
        within a document and positions restart at each one's first token; None: one sequence."""
        x_BSD = self.embed(tokens_BS)
        mask_B1SS = None
        if doc_ids_BS is None:
            start = 0 if cache is None else cache.length
            positions_BS = torch.arange(start, start + tokens_BS.shape[1], device=x_BSD.device).unsqueeze(0)
        else:
            if cache is not None:  # generation continues one document: nothing to mask
                raise ValueError("doc_ids_BS is for packed training windows; a forward with a KV cache takes none")
            positions_BS, mask_B1SS = document_positions(doc_ids_BS), document_mask(doc_ids_BS)
        # built per call for these positions (B x S x R, small): a table for an imported model's whole
        # context (max_position_embeddings, 128k and more) would not be
        cos_BSR, sin_BSR = rope_tables(positions_BS, rotated_dims(self.cfg), self.cfg.rope_theta)
        routings = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache.layers[i]
            x_BSD, routing = block(x_BSD, cos_BSR, sin_BSR, layer_cache, mask_B1SS)
            if routing is not None:
                routings.append(routing)
        logits_BSV = self.head(self.norm(x_BSD))
        return LMOutput(logits_BSV, routings)

    def moe_blocks(self) -> list[int]:
        """The block index of each MoE layer, in order (metrics name layers `moe/L{i}/...` by it)."""
        return [i for i, block in enumerate(self.blocks) if block.is_moe]

    def caches_exactly(self) -> bool:
        """Whether a token's output depends only on the tokens before it, as a KV cache needs:
        not under capacity routing, whose drops depend on every token of the batch."""
        return all(moe.router.routes_each_token_alone() for moe in moe_layers(self))

    @torch.no_grad()
    def generate(
        self,
        prompt_S: torch.Tensor,
        n_new: int,
        temperature: float = 0.8,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Continue prompt_S (1-D token ids, at least one) by n_new tokens; returns prompt and
        continuation, 1-D.

        temperature 0: greedy (the argmax); > 0: sampled from softmax(logits / temperature) with
        `generator`. The context of each token is the last max_seq_len tokens, at positions
        0.. of that window, as the model trained. use_cache=False recomputes that window for
        every token: the slow reference. use_cache=True runs the prompt once into a KV cache,
        then one token per step: the same tokens (the same logits to float rounding).
        NOTE: once the sequence outgrows max_seq_len the window slides by one token per step and
        every token in it changes position, so each such step runs the whole window again, as
        slow as use_cache=False there. Under capacity routing (`caches_exactly` False) every
        step runs the whole window too: a token's drops depend on the tokens after it.
        Under expert parallelism every rank calls this with the same prompt and generator:
        each forward exchanges tokens with the others (one token per rank per cached step).
        """
        if temperature < 0:
            raise ValueError(f"temperature={temperature}: use 0 for greedy decoding or a positive value to sample")
        if prompt_S.dim() != 1 or prompt_S.numel() == 0:
            raise ValueError(f"prompt_S must be a non-empty 1-D tensor of token ids, got shape {tuple(prompt_S.shape)}")
        window = self.cfg.max_seq_len
        tokens_S = prompt_S.clone()
        use_cache = use_cache and self.caches_exactly()
        cache = KVCache(len(self.blocks), min(window, len(tokens_S) + n_new)) if use_cache else None
        for i in range(n_new):
            # positions stay put while the sequence fits the window: the cache holds all but the newest
            cached = cache is not None and len(tokens_S) <= window
            if cached and i > 0:
                logits_V = self(tokens_S[-1:].unsqueeze(0), cache).logits_BSV[0, -1]
            else:  # the prompt (into the cache), or the whole window
                logits_V = self(tokens_S[-window:].unsqueeze(0), cache if cached else None).logits_BSV[0, -1]
            tokens_S = torch.cat([tokens_S, next_token(logits_V, temperature, generator)])
        return tokens_S


def next_token(logits_V: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token (shape (1,)) of one position's logits: the argmax at temperature 0, else a
    sample of softmax(logits / temperature) drawn with `generator`."""
    if temperature == 0:
        return logits_V.argmax().view(1)
    probs_V = (logits_V.float() / temperature).softmax(-1)
    return torch.multinomial(probs_V, 1, generator=generator)
