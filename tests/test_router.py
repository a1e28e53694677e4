"""Router: top-k selection, weights, group-limited routing, balancing losses, bias, capacity.

Every expectation here is worked by hand from a gate whose scores are known: the gate is
the identity (D = E), so the logits are the input rows themselves. Softmax scores p come
from logits log(p); sigmoid scores p from logits logit(p) = log(p / (1 - p)).

Shape key: T tokens, D model width, E experts, K top-k.
"""

from __future__ import annotations

import math

import pytest
import torch

from epmoe.config import ModelConfig, RouterConfig
from epmoe.model.moe import MoE
from epmoe.model.router import Router, capacity_keep_mask, expert_capacity, group_limited_mask, load_balance_loss


def identity_router(num_experts: int, **router_kwargs) -> Router:
    """A router over E experts whose gate is the identity: logits_TE = x_TE."""
    router = Router(num_experts, num_experts, RouterConfig(**router_kwargs))
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(num_experts))
    return router


def softmax_logits(probs: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is exactly `probs` (rows summing to 1)."""
    return torch.tensor(probs, dtype=torch.float64).log().float()


def sigmoid_logits(scores: list[list[float]]) -> torch.Tensor:
    """Logits whose sigmoid is `scores`."""
    s = torch.tensor(scores, dtype=torch.float64)
    return (s / (1 - s)).log().float()


# --- top-k selection and weights ------------------------------------------------------------


def test_softmax_topk_picks_highest_probabilities_in_descending_order_and_renormalises():
    router = identity_router(4, top_k=2, score_func="softmax", renormalize=True, aux_loss="none")
    x = softmax_logits([[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.15, 0.25]])
    routing = router(x)
    assert routing.topk_idx_TK.tolist() == [[3, 2], [0, 3]]
    # token 0: 0.4 and 0.3 -> 4/7, 3/7; token 1: 0.5 and 0.25 -> 2/3, 1/3
    expected = torch.tensor([[4 / 7, 3 / 7], [2 / 3, 1 / 3]])
    torch.testing.assert_close(routing.topk_w_TK, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(routing.topk_w_TK.sum(-1), torch.ones(2), atol=1e-6, rtol=0)
    assert routing.counts_E.tolist() == [1, 0, 1, 2]
    assert routing.keep_TK is None and int(routing.dropped()) == 0


def test_softmax_without_renormalisation_weights_are_the_raw_probabilities():
    router = identity_router(4, top_k=2, score_func="softmax", renormalize=False, aux_loss="none")
    routing = router(softmax_logits([[0.1, 0.2, 0.3, 0.4]]))
    assert routing.topk_idx_TK.tolist() == [[3, 2]]
    torch.testing.assert_close(routing.topk_w_TK, torch.tensor([[0.4, 0.3]]), atol=1e-6, rtol=0)


def test_sigmoid_topk_picks_highest_scores_and_renormalises_to_one():
    router = identity_router(4, top_k=2, score_func="sigmoid", renormalize=True, aux_loss="none")
    routing = router(sigmoid_logits([[0.2, 0.9, 0.5, 0.7]]))
    assert routing.topk_idx_TK.tolist() == [[1, 3]]
    # 0.9 / 1.6 and 0.7 / 1.6
    torch.testing.assert_close(routing.topk_w_TK, torch.tensor([[0.5625, 0.4375]]), atol=1e-6, rtol=0)


def test_sigmoid_without_renormalisation_weights_are_the_raw_scores():
    router = identity_router(4, top_k=2, score_func="sigmoid", renormalize=False, aux_loss="none")
    routing = router(sigmoid_logits([[0.2, 0.9, 0.5, 0.7]]))
    assert routing.topk_idx_TK.tolist() == [[1, 3]]
    torch.testing.assert_close(routing.topk_w_TK, torch.tensor([[0.9, 0.7]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("renormalize, expected", [(True, [1.40625, 1.09375]), (False, [2.25, 1.75])])
def test_routed_scaling_multiplies_the_combine_weights(renormalize, expected):
    router = identity_router(
        4, top_k=2, score_func="sigmoid", renormalize=renormalize, routed_scaling=2.5, aux_loss="none"
    )
    routing = router(sigmoid_logits([[0.2, 0.9, 0.5, 0.7]]))
    # renormalised: 2.5 * (0.5625, 0.4375); raw: 2.5 * (0.9, 0.7)
    torch.testing.assert_close(routing.topk_w_TK, torch.tensor([expected]), atol=1e-6, rtol=0)


def test_expert_bias_steers_selection_but_not_the_weights():
    router = identity_router(4, top_k=1, score_func="sigmoid", renormalize=False, aux_loss="none")
    router.expert_bias_E.copy_(torch.tensor([0.0, -0.5, 0.0, 0.0]))
    # expert 1 has the best score (0.9) but 0.9 - 0.5 = 0.4 < 0.7, so expert 3 is chosen
    routing = router(sigmoid_logits([[0.2, 0.9, 0.5, 0.7]]))
    assert routing.topk_idx_TK.tolist() == [[3]]
    torch.testing.assert_close(routing.topk_w_TK, torch.tensor([[0.7]]), atol=1e-6, rtol=0)


# --- group-limited routing (DeepSeek-V3) ---------------------------------------------------

# E = 8 in 4 groups of 2. Group scores (sum of the group's top two = the whole group here):
#   g0: e0 0.95 + e1 0.05 = 1.00   g1: e2 0.60 + e3 0.55 = 1.15
#   g2: e4 0.70 + e5 0.50 = 1.20   g3: e6 0.10 + e7 0.20 = 0.30
# With topk_groups = 2, g2 and g1 are eligible, so top-2 is e4 (0.70), e2 (0.60): the
# globally best expert e0 (0.95) is excluded because its group loses.
GROUPED_SCORES = [[0.95, 0.05, 0.60, 0.55, 0.70, 0.50, 0.10, 0.20]]


def test_group_limited_routing_excludes_best_expert_whose_group_loses():
    router = identity_router(
        8, top_k=2, score_func="sigmoid", renormalize=False, n_groups=4, topk_groups=2, aux_loss="none"
    )
    routing = router(sigmoid_logits(GROUPED_SCORES))
    assert routing.topk_idx_TK.tolist() == [[4, 2]]
    torch.testing.assert_close(routing.topk_w_TK, torch.tensor([[0.70, 0.60]]), atol=1e-6, rtol=0)


def test_without_groups_the_same_scores_pick_the_global_best():
    router = identity_router(8, top_k=2, score_func="sigmoid", renormalize=False, aux_loss="none")
    routing = router(sigmoid_logits(GROUPED_SCORES))
    assert routing.topk_idx_TK.tolist() == [[0, 4]]


def test_group_limited_mask_uses_sum_of_top_two_per_group():
    # Two groups of 4, one group allowed. g0 = [0.9, 0.05, 0.05, 0.05]: best 0.9, top-2
    # sum 0.95, total 1.05. g1 = [0.5, 0.5, 0, 0]: best 0.5, top-2 sum 1.0, total 1.0.
    # Only the top-2 sum ranks g1 first (the best-one and whole-group sums pick g0).
    scores = torch.tensor([[0.9, 0.05, 0.05, 0.05, 0.5, 0.5, 0.0, 0.0]])
    mask = group_limited_mask(scores, n_groups=2, topk_groups=1)
    assert mask.tolist() == [[False, False, False, False, True, True, True, True]]


def test_group_limited_mask_with_single_expert_groups_uses_the_expert_score():
    scores = torch.tensor([[0.3, 0.9, 0.1, 0.5]])
    mask = group_limited_mask(scores, n_groups=4, topk_groups=2)
    assert mask.tolist() == [[False, True, False, True]]


# --- balance losses ------------------------------------------------------------------------


def test_batch_load_balance_loss_by_hand():
    # E = 2, K = 1, T = 4; choices [0, 0, 0, 1] -> f = (3/4, 1/4)
    # P = mean probs = ((0.9 + 0.8 + 0.6 + 0.3) / 4, (0.1 + 0.2 + 0.4 + 0.7) / 4) = (0.65, 0.35)
    # loss = 2 * (0.75 * 0.65 + 0.25 * 0.35) = 2 * 0.575 = 1.15
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    idx = torch.tensor([[0], [0], [0], [1]])
    loss = load_balance_loss(probs, idx, num_experts=2, seq_len=None)
    assert loss.item() == pytest.approx(1.15, abs=1e-6)


def test_router_batch_aux_loss_is_coef_times_hand_worked_loss():
    router = identity_router(2, top_k=1, score_func="softmax", aux_loss="batch", aux_loss_coef=0.01)
    router.train()
    routing = router(softmax_logits([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]]))
    assert routing.topk_idx_TK.view(-1).tolist() == [0, 0, 0, 1]
    assert routing.aux_loss.item() == pytest.approx(0.01 * 1.15, abs=1e-7)


def test_balanced_choices_give_aux_loss_of_exactly_coef():
    # E = 4, K = 2, T = 2: every expert chosen once, so f_e = 1/4 and the loss is
    # 4 * sum_e (1/4) P_e = sum_e P_e = 1, whatever the probabilities are.
    router = identity_router(4, top_k=2, score_func="softmax", aux_loss="batch", aux_loss_coef=0.05)
    router.train()
    routing = router(softmax_logits([[0.4, 0.3, 0.2, 0.1], [0.1, 0.15, 0.35, 0.4]]))
    assert sorted(routing.topk_idx_TK.view(-1).tolist()) == [0, 1, 2, 3]
    assert routing.aux_loss.item() == pytest.approx(0.05 * 1.0, abs=1e-7)


# Two sequences of two tokens, E = 2, K = 1. Sequence 0 sends both tokens to e0, sequence 1
# both to e1: each sequence is imbalanced, the batch is balanced.
#   batch:    f = (1/2, 1/2), P = (2.2/4, 1.8/4) = (0.55, 0.45) -> 2 * 0.5 * 1.0 = 1.0
#   sequence: seq 0 f = (1, 0), P0 = 0.8 -> 1.6; seq 1 f = (0, 1), P1 = 0.7 -> 1.4; mean 1.5
SEQ_PROBS = [[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6]]
SEQ_IDX = [[0], [0], [1], [1]]


def test_sequence_level_loss_differs_from_batch_level_by_hand():
    probs, idx = torch.tensor(SEQ_PROBS), torch.tensor(SEQ_IDX)
    assert load_balance_loss(probs, idx, 2, seq_len=None).item() == pytest.approx(1.0, abs=1e-6)
    assert load_balance_loss(probs, idx, 2, seq_len=2).item() == pytest.approx(1.5, abs=1e-6)


@pytest.mark.parametrize("kind, expected", [("batch", 1.0), ("sequence", 1.5)])
def test_router_aux_loss_kind_batch_vs_sequence(kind, expected):
    router = identity_router(2, top_k=1, score_func="softmax", aux_loss=kind, aux_loss_coef=0.1)
    router.train()
    routing = router(softmax_logits(SEQ_PROBS), seq_len=2)
    assert routing.topk_idx_TK.tolist() == SEQ_IDX
    assert routing.aux_loss.item() == pytest.approx(0.1 * expected, abs=1e-6)


def test_sigmoid_aux_loss_normalises_scores_per_token():
    # sigmoid scores (0.6, 0.2) and (0.1, 0.3) normalise to (0.75, 0.25) and (0.25, 0.75);
    # choices e0 and e1 -> f = (1/2, 1/2), P = (0.5, 0.5) -> loss 2 * 0.5 = 1.0. Token 0's
    # unnormalised scores would give P = (0.35, 0.25) and a loss of 0.6 instead.
    router = identity_router(2, top_k=1, score_func="sigmoid", aux_loss="batch", aux_loss_coef=1.0)
    router.train()
    routing = router(sigmoid_logits([[0.6, 0.2], [0.1, 0.3]]))
    assert routing.topk_idx_TK.tolist() == [[0], [1]]
    assert routing.aux_loss.item() == pytest.approx(1.0, abs=1e-6)


def test_z_loss_is_coef_times_mean_squared_logsumexp():
    # rows (0, 0) -> lse = log 2; (0, log 3) -> lse = log 4 = 2 log 2
    # mean of squares = (1 + 4) / 2 * (log 2)^2 = 2.5 (log 2)^2
    router = identity_router(2, top_k=1, aux_loss="none", z_loss_coef=0.001)
    router.train()
    routing = router(torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]]))
    assert routing.z_loss.item() == pytest.approx(0.001 * 2.5 * math.log(2) ** 2, rel=1e-6)
    assert routing.aux_loss.item() == 0.0


def test_balance_losses_are_zero_in_eval_mode():
    router = identity_router(2, top_k=1, aux_loss="batch", aux_loss_coef=0.1, z_loss_coef=0.1)
    router.eval()
    routing = router(softmax_logits(SEQ_PROBS))
    assert routing.aux_loss.item() == 0.0
    assert routing.z_loss.item() == 0.0


# --- aux-loss-free bias balancing ----------------------------------------------------------


def test_update_bias_moves_by_exactly_rate_against_the_load():
    # counts (8, 2, 5, 5): mean 5 -> e0 overloaded (bias -rate), e1 underloaded (+rate),
    # e2 and e3 exactly at the mean (unchanged). rate = 0.25 is exact in binary.
    router = identity_router(4, top_k=1, bias_update_rate=0.25)
    counts = torch.tensor([8, 2, 5, 5])
    router.update_bias(counts)
    assert router.expert_bias_E.tolist() == [-0.25, 0.25, 0.0, 0.0]
    router.update_bias(counts)
    router.update_bias(counts)
    assert router.expert_bias_E.tolist() == [-0.75, 0.75, 0.0, 0.0]


def test_update_bias_is_a_no_op_when_rate_is_zero():
    router = identity_router(4, top_k=1, bias_update_rate=0.0)
    router.update_bias(torch.tensor([8, 2, 5, 5]))
    assert router.expert_bias_E.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_bias_updates_balance_a_strongly_skewed_gate():
    torch.manual_seed(0)
    E, T = 4, 512
    router = identity_router(E, top_k=1, score_func="sigmoid", aux_loss="none", bias_update_rate=0.005)
    skew = torch.tensor([2.0, 0.0, 0.0, 0.0])  # expert 0's logit is 2 higher on every token

    def imbalance(counts_E: torch.Tensor) -> float:
        return (counts_E.max() / counts_E.float().mean()).item()

    first = router(0.5 * torch.randn(T, E) + skew).counts_E
    assert imbalance(first) > 3.9  # nearly every token on expert 0 (4.0 is all of them)
    router.update_bias(first)
    for _ in range(59):  # route a fresh batch, then step the bias with its counts
        router.update_bias(router(0.5 * torch.randn(T, E) + skew).counts_E)
    last = [imbalance(router(0.5 * torch.randn(T, E) + skew).counts_E) for _ in range(5)]
    # the bias closes the ~0.38 score gap (sigmoid(2) - sigmoid(0)) to within a few rates;
    # what is left is sampling noise of ~128 tokens per expert
    assert sum(last) / len(last) < 1.3 and max(last) < 1.45
    bias = router.expert_bias_E
    assert bias[0] < 0 and (bias[1:] > 0).all()


# --- capacity drops ------------------------------------------------------------------------

# T = 4, K = 2, E = 3, capacity 2. Pairs in position priority (k = 0 for all tokens first):
#   k=0: t0->e0, t1->e0, t2->e0, t3->e1     k=1: t0->e1, t1->e2, t2->e1, t3->e0
#   e0: t0k0, t1k0 kept; t2k0, t3k1 dropped. e1: t3k0, t0k1 kept; t2k1 dropped. e2: t1k1.
CAP_IDX = [[0, 1], [0, 2], [0, 1], [1, 0]]
CAP_W = [[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.55, 0.45]]


def test_capacity_position_policy_earlier_tokens_and_first_choices_win():
    keep = capacity_keep_mask(torch.tensor(CAP_IDX), torch.tensor(CAP_W), 2, 3, "position")
    # t3's first choice (e1) beats t0's second choice although t3 comes later
    assert keep.tolist() == [[True, True], [True, True], [False, False], [True, False]]


def test_capacity_probability_policy_highest_weights_win():
    # e0 pairs: t2k0 0.9, t1k0 0.7 kept; t0k0 0.6, t3k1 0.45 dropped.
    # e1 pairs: t3k0 0.55, t0k1 0.4 kept; t2k1 0.1 dropped. e2: t1k1 0.3 kept.
    keep = capacity_keep_mask(torch.tensor(CAP_IDX), torch.tensor(CAP_W), 2, 3, "probability")
    assert keep.tolist() == [[False, True], [True, True], [True, False], [True, False]]


def test_router_capacity_is_ceil_of_factor_times_pairs_per_expert():
    # T = 4, K = 1, E = 2, factor 1.0 -> capacity ceil(4 / 2) = 2; choices (0, 0, 0, 1):
    # the third token on e0 is dropped. counts_E is counted before drops.
    router = identity_router(2, top_k=1, aux_loss="none", capacity_factor=1.0)
    routing = router(softmax_logits([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]]))
    assert routing.keep_TK.tolist() == [[True], [True], [False], [True]]
    assert int(routing.dropped()) == 1
    assert routing.counts_E.tolist() == [3, 1]


@pytest.mark.parametrize(
    ("factor", "pairs", "num_experts", "capacity"),
    [
        (1.1, 200, 20, 11),  # 1.1 * 200 / 20 = 11 exactly; in floats 11.000000000000002 -> 12
        (1.1, 50, 5, 11),  # 55 / 5 = 11; in floats also just above 11
        (1.25, 16, 4, 5),  # 1.25 * (T 8 * K 2) / 4 = 5
        (1.0, 7, 2, 4),  # 3.5 rounds up
        (1.1, 201, 20, 12),  # 221.1 / 20 = 11.055 rounds up
        (2, 3, 4, 2),  # an int factor: 6 / 4 = 1.5 rounds up
    ],
)
def test_router_capacity_is_ceil_of_factor_times_pairs_per_expert_in_exact_arithmetic(
    factor: float, pairs: int, num_experts: int, capacity: int
) -> None:
    assert expert_capacity(factor, pairs, num_experts) == capacity


def test_router_capacity_of_1_1_times_200_tokens_over_20_experts_is_11_slots():
    # T = 200, K = 1, E = 20: tokens 0..11 pick e0 (12 tokens), the other 188 spread over e1..e19
    # (at most 10 each). Capacity 11 keeps e0's first 11 and drops token 11; nothing else drops.
    expert_T = torch.tensor([0] * 12 + [1 + t % 19 for t in range(188)])
    router = identity_router(20, top_k=1, renormalize=False, aux_loss="none", capacity_factor=1.1)
    routing = router(5.0 * torch.nn.functional.one_hot(expert_T, 20).float())
    assert routing.topk_idx_TK[:, 0].tolist() == expert_T.tolist()
    assert routing.counts_E[0].item() == 12 and routing.counts_E[1:].max().item() == 10
    assert (~routing.keep_TK[:, 0]).nonzero().flatten().tolist() == [11]
    assert int(routing.dropped()) == 1


def test_capacity_large_enough_to_drop_nothing_equals_dropless():
    torch.manual_seed(0)
    E, K = 4, 2
    cfg = ModelConfig(d_model=16, num_experts=E, expert_hidden=16, n_shared_experts=0)
    dropless = MoE(cfg, RouterConfig(top_k=K, aux_loss="none"))
    # capacity_factor = E makes capacity = T * K, which no expert can exceed
    capped = MoE(cfg, RouterConfig(top_k=K, aux_loss="none", capacity_factor=float(E)))
    capped.load_state_dict(dropless.state_dict())
    x = torch.randn(2, 8, 16)
    y_dropless, r_dropless = dropless(x)
    y_capped, r_capped = capped(x)
    assert r_dropless.keep_TK is None
    assert r_capped.keep_TK.shape == (16, K) and bool(r_capped.keep_TK.all())
    assert int(r_capped.dropped()) == 0
    assert torch.equal(r_capped.topk_idx_TK, r_dropless.topk_idx_TK)
    torch.testing.assert_close(y_capped, y_dropless, atol=1e-6, rtol=0)


def test_capacity_drops_remove_the_dropped_expert_contribution():
    # A tight capacity drops pairs, which changes the layer's output for those tokens only.
    torch.manual_seed(0)
    E = 4
    cfg = ModelConfig(d_model=16, num_experts=E, expert_hidden=16, n_shared_experts=0)
    dropless = MoE(cfg, RouterConfig(top_k=1, aux_loss="none"))
    capped = MoE(cfg, RouterConfig(top_k=1, aux_loss="none", capacity_factor=0.5))
    capped.load_state_dict(dropless.state_dict())
    x = torch.randn(1, 16, 16)
    y_dropless, _ = dropless(x)
    y_capped, routing = capped(x)
    keep_T = routing.keep_TK[:, 0]
    assert int(routing.dropped()) > 0
    # K = 1: a dropped token's routed output is exactly 0; kept tokens are unchanged
    assert torch.equal(y_capped[0, ~keep_T], torch.zeros(int((~keep_T).sum()), 16))
    torch.testing.assert_close(y_capped[0, keep_T], y_dropless[0, keep_T], atol=1e-6, rtol=0)


def test_probability_drop_policy_keeps_the_most_confident_tokens_with_top1():
    # softmax rows [.6,.4], [.7,.3], [.99,.01], [.3,.7]: top-1 sends tokens 0, 1, 2 to e0 and
    # token 3 to e1; capacity ceil(1.0 * 4 / 2) = 2 keeps e0's two most confident (.99, .7)
    # and drops token 0 (.6), although top-1 renormalised weights are all 1.0.
    probs = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.99, 0.01], [0.3, 0.7]])
    router = Router(2, 2, RouterConfig(top_k=1, capacity_factor=1.0, drop_policy="probability", aux_loss="none"))
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(2))
    routing = router(probs.log())
    assert routing.topk_idx_TK.squeeze(1).tolist() == [0, 0, 0, 1]
    assert routing.keep_TK.squeeze(1).tolist() == [False, True, True, True]
