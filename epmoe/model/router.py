"""Token -> expert routing: scores, (group-limited) top-k, balancing losses, capacity drops.

Shape key: T tokens (batch x sequence, flattened), S sequence length, B = T / S sequences,
D model width, E experts, K top-k, G expert groups.

The router picks experts with `scores + bias` (the bias is DeepSeek-V3's auxiliary-loss-free
balancing term and steers selection only) and weights the chosen experts' outputs with the
scores alone. Drops (with a capacity factor) are a `keep_TK` mask: the dispatcher skips
dropped (token, choice) pairs and the token's residual carries it through.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from epmoe.config import RouterConfig


@dataclass
class Routing:
    """What the router decided for T tokens; the dispatcher and the trainer read it."""

    topk_idx_TK: torch.Tensor  # int64 expert ids
    topk_w_TK: torch.Tensor  # combine weights (routed scaling applied)
    keep_TK: torch.Tensor | None  # False where capacity dropped the pair; None when dropless
    counts_E: torch.Tensor  # int64 tokens routed to each expert, before drops
    aux_loss: torch.Tensor  # scalar, coefficient applied (0 when off)
    z_loss: torch.Tensor  # scalar, coefficient applied (0 when off)

    def dropped(self) -> torch.Tensor:
        """Number of dropped (token, choice) pairs, a 0-d int64 tensor on the routing's device."""
        if self.keep_TK is None:
            return torch.zeros((), dtype=torch.long, device=self.topk_idx_TK.device)
        return (~self.keep_TK).sum()


def count_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """int64 counts_n[i] = occurrences of i in `ids` (values in 0..n-1): bincount(minlength=n).

    NOTE: a scatter-add, not torch.bincount, whose output length depends on the data (max id + 1):
    torch.compile would break the block's graph there (epmoe/parallel/compile.py).
    """
    flat = ids.reshape(-1)
    return torch.zeros(n, dtype=torch.long, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))


def group_limited_mask(
    scores_TE: torch.Tensor, n_groups: int, topk_groups: int, group_score: str = "top2_sum"
) -> torch.Tensor:
    """Bool mask_TE of experts in each token's `topk_groups` best groups.

    A group's score is the sum of its two best expert scores (`top2_sum`, DeepSeek-V3; its best
    one if the group has a single expert), or its best expert score (`max`, DeepSeek-V2).
    """
    T, E = scores_TE.shape
    per_group = E // n_groups
    scores_TGe = scores_TE.view(T, n_groups, per_group)
    if group_score == "max":
        group_score_TG = scores_TGe.max(dim=-1).values
    else:
        group_score_TG = scores_TGe.topk(min(2, per_group), dim=-1).values.sum(-1)
    top_groups_TK = group_score_TG.topk(topk_groups, dim=-1).indices
    group_mask_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
    group_mask_TG.scatter_(1, top_groups_TK, True)
    return group_mask_TG.repeat_interleave(per_group, dim=1)  # (T, G) -> (T, E)


# mean of a per-rank statistic over the data-parallel ranks (no autograd); installed from
# outside (epmoe.parallel) so that batch-level statistics cover the global batch
RankMean = Callable[[torch.Tensor], torch.Tensor]


def load_balance_loss(
    probs_TE: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    num_experts: int,
    seq_len: int | None,
    rank_mean: RankMean | None = None,
) -> torch.Tensor:
    """Switch/GShard balance loss E * sum_e f_e * P_e (1.0 when perfectly balanced).

    f_e: fraction of the T*K choices that went to e; P_e: mean routing probability of e.
    With `seq_len`, both are taken per sequence and the loss is averaged over sequences
    (DeepSeek-V3's sequence-wise variant); otherwise over the whole batch. Under data
    parallelism `rank_mean` makes f_e that of the global batch: each rank then holds
    E * sum_e f_e * P_e(own tokens), whose mean over ranks (and whose mean gradient) is the
    global batch's loss, exactly as one process would compute it (equal per-rank batches).
    """
    T, K = topk_idx_TK.shape
    S = seq_len or T
    B = T // S
    one_hot_BSKE = F.one_hot(topk_idx_TK.view(B, S, K), num_experts).to(probs_TE.dtype)
    f_BE = one_hot_BSKE.sum(dim=(1, 2)) / (S * K)
    if rank_mean is not None and seq_len is None:
        f_BE = rank_mean(f_BE)
    P_BE = probs_TE.view(B, S, num_experts).mean(dim=1)
    return num_experts * (f_BE * P_BE).sum(-1).mean()


def expert_capacity(capacity_factor: float, pairs: int, num_experts: int) -> int:
    """Slots per expert: ceil(capacity_factor * pairs / num_experts), pairs = T * K.

    Exact rational arithmetic on the factor as written (repr: 1.1 is 11/10, not the binary
    float just above it): in floats 1.1 * 200 / 20 is 11.000000000000002, whose ceil is 12.
    """
    return math.ceil(Fraction(repr(float(capacity_factor))) * pairs / num_experts)


def capacity_keep_mask(
    topk_idx_TK: torch.Tensor, topk_score_TK: torch.Tensor, capacity: int, num_experts: int, policy: str
) -> torch.Tensor:
    """keep_TK: which (token, choice) pairs fit in each expert's `capacity` slots.

    policy "position": earlier tokens win (Switch); choices of rank k=0 for all tokens come
    before k=1, so a token's first choice is dropped last. "probability": the pairs with the
    highest routing score win. Built from a sort, never a T x E x C mask.
    """
    T, K = topk_idx_TK.shape
    flat_idx = topk_idx_TK.t().reshape(-1)  # (K*T,) in priority order k-major, then position
    if policy == "probability":
        order = topk_score_TK.t().reshape(-1).argsort(descending=True, stable=True)
    else:
        order = torch.arange(K * T, device=flat_idx.device)
    expert_of_order = flat_idx[order]
    # rank of each pair within its expert, in priority order
    by_expert = expert_of_order.argsort(stable=True)
    counts_E = count_ids(expert_of_order, num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_sorted = torch.arange(K * T, device=flat_idx.device) - starts_E[expert_of_order[by_expert]]
    rank_in_expert = torch.empty_like(rank_sorted)
    rank_in_expert[order[by_expert]] = rank_sorted
    return (rank_in_expert < capacity).view(K, T).t()


class Router(nn.Module):
    """Linear gate D -> E, top-k selection and balancing terms. See the module docstring."""

    expert_bias_E: torch.Tensor

    def __init__(self, d_model: int, num_experts: int, cfg: RouterConfig):
        super().__init__()
        self.cfg = cfg
        self.num_experts = num_experts
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        # Selection-only bias for aux-loss-free balancing: a buffer, saved in checkpoints,
        # moved by `update_bias`, never trained by gradients.
        self.register_buffer("expert_bias_E", torch.zeros(num_experts, dtype=torch.float32))
        self.rank_mean: RankMean | None = None  # set by epmoe.parallel when world > 1

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> Routing:
        cfg, E = self.cfg, self.num_experts
        # routing math in fp32, the gate matmul included, also under autocast (DeepSeek-V3)
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        if cfg.score_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
        else:
            scores_TE = logits_TE.sigmoid()

        select_TE = scores_TE.detach() + self.expert_bias_E
        if cfg.n_groups > 1:
            mask_TE = group_limited_mask(select_TE, cfg.n_groups, cfg.topk_groups, cfg.group_score)
            select_TE = select_TE.masked_fill(~mask_TE, float("-inf"))
        topk_idx_TK = select_TE.topk(cfg.top_k, dim=-1).indices
        topk_scores_TK = scores_TE.gather(1, topk_idx_TK)
        topk_w_TK = topk_scores_TK
        if cfg.renormalize:
            topk_w_TK = topk_w_TK / topk_w_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        topk_w_TK = topk_w_TK * cfg.routed_scaling

        zero = logits_TE.new_zeros(())
        aux_loss = zero
        if cfg.aux_loss != "none" and cfg.aux_loss_coef > 0 and self.training:
            # sigmoid scores are normalised per token to act as probabilities (DeepSeek-V3)
            probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
            per_seq = seq_len if cfg.aux_loss == "sequence" else None
            aux_loss = cfg.aux_loss_coef * load_balance_loss(probs_TE, topk_idx_TK, E, per_seq, self.rank_mean)
        z_loss = zero
        if cfg.z_loss_coef > 0 and self.training:
            z_loss = cfg.z_loss_coef * torch.logsumexp(logits_TE, dim=-1).square().mean()

        keep_TK = None
        if cfg.capacity_factor is not None:
            capacity = expert_capacity(cfg.capacity_factor, topk_idx_TK.numel(), E)
            # "probability" ranks pairs by their raw routing score, comparable across tokens
            # (renormalised weights are per-token shares: all 1.0 with top-1)
            keep_TK = capacity_keep_mask(topk_idx_TK, topk_scores_TK.detach(), capacity, E, cfg.drop_policy)
        counts_E = count_ids(topk_idx_TK, E)
        return Routing(topk_idx_TK, topk_w_TK, keep_TK, counts_E, aux_loss, z_loss)

    def routes_each_token_alone(self) -> bool:
        """Whether a token's experts and weights depend on that token only (a KV cache relies on
        it): dropless. A capacity factor drops by the whole batch's choices."""
        return self.cfg.capacity_factor is None

    @torch.no_grad()
    def update_bias(self, counts_E: torch.Tensor) -> None:
        """Aux-loss-free balancing step: bias_e += rate * sign(mean load - load_e).

        Call once per optimizer step with the tokens per expert summed over that step (and,
        under data parallelism, over all ranks).
        """
        if self.cfg.bias_update_rate <= 0:
            return
        load_E = counts_E.to(self.expert_bias_E)
        self.expert_bias_E += self.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E)
