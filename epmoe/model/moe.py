"""The MoE feed-forward layer: router -> dispatcher(experts) -> combine, plus shared experts.

Shape key: B sequences, S sequence length, T = B*S tokens, D model width, X exchange width.

1. the router picks top-k experts per token and their weights (and balancing losses);
2. the dispatcher sorts (token, choice) pairs into per-expert segments, runs the experts
   and sums the weighted outputs back per token (LocalDispatcher here; expert parallelism
   swaps in an all-to-all dispatcher from outside);
3. shared experts (always on, DeepSeekMoE) see every token and are added; they are the
   dispatcher's side computation, which a dispatcher that exchanges runs while tokens travel.
With `exchange_dim` X > 0 (BigMac: descend, communicate, compute, communicate, ascend) the
tokens are projected D -> X before step 2 and the routed output X -> D after it: the
exchange and the routed experts run at width X. The router and shared experts see width D.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from epmoe.config import ModelConfig, RouterConfig
from epmoe.model.dispatch import Dispatcher, LocalDispatcher, Side
from epmoe.model.experts import MLP, GroupedExperts
from epmoe.model.router import Router, Routing


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, router_cfg: RouterConfig, out_init_scale: float = 1.0):
        super().__init__()
        self.router = Router(cfg.d_model, cfg.num_experts, router_cfg)
        width = cfg.exchange_dim or cfg.d_model  # what the routed experts see
        self.experts = GroupedExperts(
            cfg.num_experts, width, cfg.expert_hidden, cfg.activation, cfg.expert_impl, out_init_scale
        )
        self.descend = self.ascend = None
        if cfg.exchange_dim:
            self.descend = nn.Linear(cfg.d_model, width, bias=False)
            self.ascend = nn.Linear(width, cfg.d_model, bias=False)
            nn.init.normal_(self.descend.weight, std=1 / math.sqrt(cfg.d_model))
            nn.init.normal_(self.ascend.weight, std=out_init_scale / math.sqrt(width))
        # n shared experts of hidden h are one MLP of hidden n*h (DeepSeekMoE)
        self.shared = (
            MLP(
                cfg.d_model,
                cfg.n_shared_experts * cfg.shared_hidden,
                cfg.activation,
                out_init_scale,
                output_gate=cfg.shared_gate,
            )
            if cfg.n_shared_experts > 0
            else None
        )
        self.dispatcher: Dispatcher = LocalDispatcher(cfg.num_experts)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing = self.router(x_TD, seq_len=S)
        routed_in = x_TD if self.descend is None else self.descend(x_TD)  # (T, D) -> (T, X)
        side = Side(self.shared, x_TD) if self.shared is not None else None
        y_TD, shared_TD = self.dispatch(routed_in, routing, side)
        if self.ascend is not None:
            y_TD = self.ascend(y_TD)  # (T, X) -> (T, D)
        if shared_TD is not None:
            y_TD = y_TD + shared_TD
        return y_TD.view(B, S, D).to(x_BSD.dtype), routing

    def dispatch(
        self, x_TD: torch.Tensor, routing: Routing, side: Side | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Step 2, the dispatcher's call on this layer's experts: the seam torch.compile keeps out
        of its graphs (epmoe/parallel/compile.py shadows it per instance with an eager one)."""
        return self.dispatcher(x_TD, routing, self.experts, side)


def expert_weight_names(model: nn.Module) -> dict[str, tuple[int, str]]:
    """{full parameter name: (MoE layer y, weight name)} of every stacked expert weight of `model`."""
    return {f"{prefix}.experts.{w}": (y, w) for y, (prefix, moe) in enumerate(named_moe_layers(model))
            for w in moe.experts.stacked_weights()}  # fmt: skip


def named_moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """(module name, MoE) of every MoE layer of `model`, in model order: MoE layer y is the y-th."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE layer of `model`, in model order."""
    return [m for _, m in named_moe_layers(model)]
