"""The MoE layer's pieces: permutation round trips, the grouped experts against their loop
reference, a one-expert MoE against a dense MLP, the full Transformer and bf16 autocast.

Shape key: T tokens, K choices per token, D model width, F expert hidden size, E experts,
N kept (token, choice) pairs sorted by expert, B sequences, S sequence length, V vocab.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from epmoe.config import ModelConfig, RouterConfig
from epmoe.model import experts
from epmoe.model.dispatch import LocalDispatcher, Side
from epmoe.model.experts import HAS_GROUPED_MM, MLP, GroupedExperts, auto_impl
from epmoe.model.moe import MoE, moe_layers, named_moe_layers
from epmoe.model.permute import make_permutation, permute, unpermute
from epmoe.model.router import Routing
from epmoe.model.transformer import Transformer, is_moe_layer

# --- permutation ---------------------------------------------------------------------------

# T = 3, K = 2, E = 4 (expert 3 gets nothing). Flat pair index = token * K + k:
#   pair: 0  1  2  3  4  5
#   bin:  2  0  1  2  0  2
# Stable sort by bin: bin 0 <- pairs 1, 4; bin 1 <- pair 2; bin 2 <- pairs 0, 3, 5.
BINS_TK = [[2, 0], [1, 2], [0, 2]]


def test_make_permutation_sorts_pairs_by_expert_stably():
    perm = make_permutation(torch.tensor(BINS_TK), None, num_bins=4)
    assert perm.choice_N.tolist() == [1, 4, 2, 0, 3, 5]
    assert perm.token_N.tolist() == [0, 2, 1, 0, 1, 2]
    assert perm.counts_E.tolist() == [2, 1, 3, 0]


def test_permuted_rows_of_each_expert_are_contiguous_and_in_token_order():
    torch.manual_seed(0)
    bins_TK = torch.randint(0, 5, (40, 3))
    perm = make_permutation(bins_TK, None, num_bins=5)
    expert_N = bins_TK.reshape(-1)[perm.choice_N]
    start = 0
    for e, count in enumerate(perm.counts_E.tolist()):
        assert count == int((bins_TK == e).sum())  # counted by hand from the ids
        assert bool((expert_N[start : start + count] == e).all())
        tokens = perm.token_N[start : start + count]
        assert bool((tokens[1:] >= tokens[:-1]).all())
        start += count
    assert start == 40 * 3


def test_make_permutation_skips_dropped_pairs():
    # drop pair 1 (t0 k1 -> bin 0) and pair 4 (t2 k0 -> bin 0): bin 0 is left empty
    keep_TK = torch.tensor([[True, False], [True, True], [False, True]])
    perm = make_permutation(torch.tensor(BINS_TK), keep_TK, num_bins=4)
    assert perm.choice_N.tolist() == [2, 0, 3, 5]
    assert perm.token_N.tolist() == [1, 0, 1, 2]
    assert perm.counts_E.tolist() == [0, 1, 3, 0]


def test_permute_then_unpermute_with_top1_unit_weights_returns_x():
    torch.manual_seed(0)
    x_TD = torch.randn(6, 4, dtype=torch.float64)
    bins_TK = torch.tensor([[3], [0], [3], [1], [0], [2]])
    perm = make_permutation(bins_TK, None, num_bins=4)
    x_ND = permute(x_TD, perm)
    assert torch.equal(x_ND, x_TD[[1, 4, 3, 5, 0, 2]])  # sorted by expert, ties in token order
    y_TD = unpermute(x_ND, perm, torch.ones(6, 1, dtype=torch.float64))
    assert torch.equal(y_TD, x_TD)


def test_permute_then_unpermute_with_top2_unit_weights_returns_2x():
    torch.manual_seed(0)
    x_TD = torch.randn(3, 4, dtype=torch.float64)
    perm = make_permutation(torch.tensor(BINS_TK), None, num_bins=4)
    y_TD = unpermute(permute(x_TD, perm), perm, torch.ones(3, 2, dtype=torch.float64))
    assert torch.equal(y_TD, 2 * x_TD)


def test_unpermute_weights_kept_choices_and_dropped_pairs_contribute_zero():
    torch.manual_seed(0)
    x_TD = torch.randn(4, 4, dtype=torch.float64)
    bins_TK = torch.tensor([[2, 0], [1, 2], [0, 2], [1, 0]])
    # t0 keeps k0 only, t1 both, t2 k1 only, t3 nothing
    keep_TK = torch.tensor([[True, False], [True, True], [False, True], [False, False]])
    w_TK = torch.tensor([[0.25, 0.5], [0.5, 0.25], [0.125, 2.0], [1.0, 1.0]], dtype=torch.float64)
    perm = make_permutation(bins_TK, keep_TK, num_bins=3)
    y_TD = unpermute(permute(x_TD, perm), perm, w_TK)
    expected = torch.stack([0.25 * x_TD[0], 0.75 * x_TD[1], 2.0 * x_TD[2], torch.zeros(4, dtype=torch.float64)])
    assert torch.equal(y_TD, expected)


def test_local_dispatcher_sends_each_row_to_its_expert_and_back():
    # Expert e multiplies its rows by (e + 1), so token t gets sum_k w_tk (e_tk + 1) x_t.
    torch.manual_seed(0)
    x_TD = torch.randn(3, 4, dtype=torch.float64)
    idx_TK = torch.tensor(BINS_TK)
    w_TK = torch.tensor([[0.5, 0.25], [1.0, 0.5], [0.25, 0.75]], dtype=torch.float64)
    routing = Routing(idx_TK, w_TK, None, torch.bincount(idx_TK.view(-1), minlength=4), 0, 0)

    class ScalingExperts(GroupedExperts):
        def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
            scale_N = torch.repeat_interleave(torch.arange(1, 5, dtype=x_ND.dtype), counts_E)
            return x_ND * scale_N.unsqueeze(1)

    class Doubling(torch.nn.Module):
        def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
            return 2 * x_TD

    experts = ScalingExperts(4, 4, 2, impl="loop")  # the loop path never fuses dispatch
    y_TD, none = LocalDispatcher(4)(x_TD, routing, experts)
    assert none is None
    # the side computation runs on its own input, beside the routed experts
    y2_TD, side_TD = LocalDispatcher(4)(x_TD, routing, experts, Side(Doubling(), x_TD + 1))
    torch.testing.assert_close(y2_TD, y_TD, atol=0, rtol=0)
    torch.testing.assert_close(side_TD, 2 * (x_TD + 1), atol=0, rtol=0)
    # t0: 0.5 * 3 + 0.25 * 1 = 1.75; t1: 1.0 * 2 + 0.5 * 3 = 3.5; t2: 0.25 * 1 + 0.75 * 3 = 2.5
    expected = x_TD * torch.tensor([[1.75], [3.5], [2.5]], dtype=torch.float64)
    torch.testing.assert_close(y_TD, expected, atol=1e-12, rtol=0)


# --- grouped experts vs the loop reference -------------------------------------------------


def _expert_pair(activation: str, E: int, D: int, F_: int) -> tuple[GroupedExperts, GroupedExperts]:
    grouped = GroupedExperts(E, D, F_, activation, impl="grouped")
    loop = GroupedExperts(E, D, F_, activation, impl="loop")
    loop.load_state_dict(grouped.state_dict())
    assert (grouped.impl, loop.impl) == ("grouped", "loop")
    return grouped, loop


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("reduce", ["random_grad", "sum"])
def test_grouped_experts_match_loop_in_outputs_and_gradients(activation, reduce):
    # Experts 0, 2 and 4 get no rows. `.sum()` sends a zero-stride (expanded) gradient.
    torch.manual_seed(0)
    E, D, F_ = 5, 8, 16
    counts_E = torch.tensor([0, 3, 0, 6, 0])
    grouped, loop = _expert_pair(activation, E, D, F_)
    x_ND = torch.randn(9, D)
    g_ND = torch.randn(9, D)

    def run(module: GroupedExperts) -> tuple[torch.Tensor, torch.Tensor]:
        x = x_ND.clone().requires_grad_()
        y = module(x, counts_E)
        (y.sum() if reduce == "sum" else (y * g_ND).sum()).backward()
        return y, x.grad

    y_grouped, dx_grouped = run(grouped)
    y_loop, dx_loop = run(loop)
    torch.testing.assert_close(y_grouped, y_loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx_grouped, dx_loop, atol=1e-5, rtol=1e-5)
    names = ["w_gate_EDF", "w_down_EFD"] + (["w_up_EDF"] if activation == "swiglu" else [])
    for name in names:
        g_grouped, g_loop = getattr(grouped, name).grad, getattr(loop, name).grad
        torch.testing.assert_close(g_grouped, g_loop, atol=1e-5, rtol=1e-5, msg=name)
        for e in (0, 2, 4):  # no rows, no gradient
            assert torch.equal(g_grouped[e], torch.zeros_like(g_grouped[e])), (name, e)
        assert g_grouped[3].abs().sum() > 0


def test_grouped_experts_backward_with_no_rows_and_sum_gives_zero_weight_grads():
    experts = GroupedExperts(3, 8, 16, "swiglu", impl="grouped")
    x = torch.randn(0, 8, requires_grad=True)
    experts(x, torch.zeros(3, dtype=torch.int64)).sum().backward()
    assert torch.equal(experts.w_gate_EDF.grad, torch.zeros(3, 8, 16))


def test_gelu_experts_have_no_up_projection():
    experts = GroupedExperts(2, 8, 16, "gelu", impl="loop")
    assert experts.w_up_EDF is None
    assert sorted(n for n, _ in experts.named_parameters()) == ["w_down_EFD", "w_gate_EDF"]


def test_loop_experts_compute_the_per_expert_ffn_by_hand():
    # GELU, E = 2, D = F = 1: expert e maps x -> gelu(a_e x) b_e. Rows (1, 2) go to e0, row 3 to e1.
    experts = GroupedExperts(2, 1, 1, "gelu", impl="loop")
    with torch.no_grad():
        experts.w_gate_EDF.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1))
        experts.w_down_EFD.copy_(torch.tensor([3.0, 0.5]).view(2, 1, 1))
    y = experts(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([2, 1]))
    expected = torch.stack(
        [F.gelu(torch.tensor(2.0)) * 3, F.gelu(torch.tensor(4.0)) * 3, F.gelu(torch.tensor(-3.0)) * 0.5]
    )
    torch.testing.assert_close(y.view(-1), expected, atol=1e-6, rtol=0)


# --- one expert, top-1 == dense MLP --------------------------------------------------------


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("impl", ["grouped", "loop", "fused"])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_one_expert_top1_moe_equals_dense_mlp(activation, impl, score_func):
    torch.manual_seed(0)
    D, H = 16, 32
    cfg = ModelConfig(
        d_model=D, num_experts=1, expert_hidden=H, activation=activation, expert_impl=impl, n_shared_experts=0
    )
    moe = MoE(cfg, RouterConfig(top_k=1, score_func=score_func, renormalize=True, aux_loss="none"))
    mlp = MLP(D, H, activation)
    with torch.no_grad():  # GroupedExperts stores (E, D, F) / (E, F, D); nn.Linear stores (out, in)
        mlp.w_gate.weight.copy_(moe.experts.w_gate_EDF[0].t())
        if activation == "swiglu":
            mlp.w_up.weight.copy_(moe.experts.w_up_EDF[0].t())
        mlp.w_down.weight.copy_(moe.experts.w_down_EFD[0].t())

    x = torch.randn(2, 5, D)
    g = torch.randn(2, 5, D)
    x_moe, x_mlp = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_moe, routing = moe(x_moe)
    y_mlp = mlp(x_mlp)
    assert torch.equal(routing.topk_w_TK, torch.ones(10, 1))  # renormalised single choice
    torch.testing.assert_close(y_moe, y_mlp, atol=1e-5, rtol=1e-5)
    (y_moe * g).sum().backward()
    (y_mlp * g).sum().backward()
    torch.testing.assert_close(x_moe.grad, x_mlp.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.experts.w_down_EFD.grad[0], mlp.w_down.weight.grad.t(), atol=1e-5, rtol=1e-5)


# --- the full model ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_experts, first_dense, moe_every, layout",
    [
        (4, 1, 2, [False, True, False, True, False]),
        (4, 0, 1, [True, True, True, True, True]),
        (4, 2, 1, [False, False, True, True, True]),
        (4, 0, 3, [True, False, False, True, False]),
        (0, 0, 1, [False, False, False, False, False]),
    ],
)
def test_is_moe_layer_matches_hand_listed_layout(num_experts, first_dense, moe_every, layout):
    cfg = ModelConfig(n_layers=5, num_experts=num_experts, first_dense_layers=first_dense, moe_every=moe_every)
    assert [is_moe_layer(cfg, i) for i in range(5)] == layout


def test_transformer_forward_backward_with_shared_experts_dense_layers_and_moe_every():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=32, d_model=16, n_layers=5, n_heads=2, max_seq_len=16, num_experts=4,
        moe_every=2, first_dense_layers=1, dense_hidden=32, expert_hidden=8,
        n_shared_experts=2, shared_hidden=8,
    )  # fmt: skip
    model = Transformer(cfg, RouterConfig(top_k=2, aux_loss="batch", aux_loss_coef=0.01, z_loss_coef=1e-3))
    model.train()
    assert [isinstance(b.ffn, MoE) for b in model.blocks] == [False, True, False, True, False]
    layers = moe_layers(model)
    assert [name for name, _ in named_moe_layers(model)] == ["blocks.1.ffn", "blocks.3.ffn"]
    for layer in layers:  # 2 shared experts of hidden 8 are one MLP of hidden 16
        assert isinstance(layer.shared, MLP) and layer.shared.w_gate.weight.shape == (16, 16)
        assert layer.experts.w_gate_EDF.shape == (4, 16, 8)

    tokens = torch.randint(0, 32, (2, 8))
    out = model(tokens)
    assert out.logits_BSV.shape == (2, 8, 32)
    assert len(out.routings) == 2
    for routing in out.routings:
        assert routing.topk_idx_TK.shape == (16, 2)
        assert int(routing.counts_E.sum()) == 16 * 2
        assert routing.aux_loss.item() > 0 and routing.z_loss.item() > 0

    ce = F.cross_entropy(out.logits_BSV[:, :-1].reshape(-1, 32), tokens[:, 1:].reshape(-1))
    loss = ce + sum(r.aux_loss + r.z_loss for r in out.routings)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for layer in layers:
        assert layer.router.gate.weight.grad.abs().sum() > 0
        assert layer.shared.w_down.weight.grad.abs().sum() > 0
        used = layer.experts.w_down_EFD.grad.flatten(1).abs().sum(1) > 0
        assert used.any()
    for i in (0, 2, 4):  # the dense layers
        assert model.blocks[i].ffn.w_down.weight.grad.abs().sum() > 0


# --- bf16 autocast -------------------------------------------------------------------------


def test_bf16_autocast_moe_forward_is_close_to_fp32():
    # bf16 keeps 8 bits of mantissa (relative step 2^-8 ~ 0.4%); the gate and three chained
    # expert matmuls over D = F = 16 stay within 2% of the largest output (~0.6% measured).
    # The same seed routes identically in both precisions, so no near-tie flips an expert.
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, num_experts=4, expert_hidden=16, n_shared_experts=1, shared_hidden=16)
    moe = MoE(cfg, RouterConfig(top_k=2, aux_loss="none"))
    x = torch.randn(2, 8, 16)
    y_fp32, routing_fp32 = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bf16, routing_bf16 = moe(x)
    assert y_bf16.dtype == torch.float32  # the residual stream stays in the input's dtype
    assert routing_bf16.topk_w_TK.dtype == torch.float32
    assert torch.equal(routing_bf16.topk_idx_TK, routing_fp32.topk_idx_TK)
    scale = y_fp32.abs().max().item()
    torch.testing.assert_close(y_bf16, y_fp32, atol=0.02 * scale, rtol=0)
    assert (y_bf16 - y_fp32).abs().max().item() > 0  # bf16 really ran


@pytest.mark.parametrize("with_drops", [False, True])
def test_permute_and_combine_gradients_pass_gradcheck(with_drops: bool):
    torch.manual_seed(0)
    T, K, D, E = 5, 2, 3, 3
    idx_TK = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]])
    keep_TK = torch.rand(T, K) > 0.3 if with_drops else None
    perm = make_permutation(idx_TK, keep_TK, E)
    x_TD = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    w_TK = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    scale_ND = torch.randn(perm.choice_N.numel(), D, dtype=torch.float64)  # a stand-in expert
    assert torch.autograd.gradcheck(lambda x, w: unpermute(permute(x, perm) * scale_ND, perm, w), (x_TD, w_TK))


def test_combine_matches_the_scatter_reference_with_drops():
    torch.manual_seed(1)
    T, K, D, E = 6, 2, 4, 3
    idx_TK = torch.randint(0, E, (T, K))
    keep_TK = torch.tensor([[True, False], [True, True], [False, False], [True, True], [False, True], [True, True]])
    perm = make_permutation(idx_TK, keep_TK, E)
    y_ND = torch.randn(perm.choice_N.numel(), D, dtype=torch.float64)
    w_TK = torch.rand(T, K, dtype=torch.float64)
    expected_TD = torch.zeros(T, D, dtype=torch.float64)
    for n, pair in enumerate(perm.choice_N.tolist()):  # the slow reference: scatter pair by pair
        expected_TD[pair // K] += w_TK[pair // K, pair % K] * y_ND[n]
    assert torch.allclose(unpermute(y_ND, perm, w_TK), expected_TD, rtol=0, atol=1e-12)
    assert torch.equal(unpermute(y_ND, perm, w_TK)[2], torch.zeros(D, dtype=torch.float64))  # all dropped


def test_auto_expert_path_on_cpu_picks_by_sorted_row_bytes_and_retained_host_memory(monkeypatch):
    cpu = torch.device("cpu")
    assert auto_impl(cpu, (32 << 20) - 1, memory_retained=True) == "loop"
    assert auto_impl(cpu, 32 << 20, memory_retained=False) == "fused"
    assert HAS_GROUPED_MM  # torch 2.13, as the Makefile pins
    assert auto_impl(cpu, 32 << 20, memory_retained=True) == "grouped"
    monkeypatch.setattr(experts, "host_memory_retained", lambda: False)  # glibc's default malloc
    torch.manual_seed(0)
    auto = GroupedExperts(3, 8, 16, "swiglu", impl="auto")
    # fp32 rows of width 8 are 32 bytes: top-2 of 2**19 tokens is exactly 32 MB of sorted rows
    assert auto.fuses_dispatch(torch.empty(2**19, 8), top_k=2)
    assert not auto.fuses_dispatch(torch.empty(2**19 - 1, 8), top_k=2)
    assert GroupedExperts(3, 8, 16, impl="fused").fuses_dispatch(torch.empty(4, 8), top_k=1)
    grouped = GroupedExperts(3, 8, 16, "swiglu", impl="grouped")
    grouped.load_state_dict(auto.state_dict())
    counts_E = torch.tensor([2, 0, 5])
    x_ND = torch.randn(7, 8)
    torch.testing.assert_close(auto(x_ND, counts_E), grouped(x_ND, counts_E), atol=1e-5, rtol=1e-5)


def _moe_pair(activation: str, capacity: float | None, shared: int) -> tuple[MoE, MoE]:
    cfg = ModelConfig(d_model=16, num_experts=6, expert_hidden=12, activation=activation, n_shared_experts=shared,
                      shared_hidden=8)  # fmt: skip
    router_cfg = RouterConfig(top_k=2, capacity_factor=capacity, aux_loss="batch", aux_loss_coef=0.1)
    fused = MoE(dataclasses.replace(cfg, expert_impl="fused"), router_cfg)
    fused.router.expert_bias_E[5] = -100.0  # selection-only bias: expert 5 never gets a row
    loop = MoE(dataclasses.replace(cfg, expert_impl="loop"), router_cfg)
    loop.load_state_dict(fused.state_dict())
    return fused, loop


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize(("capacity", "shared"), [(None, 0), (0.5, 1)])
def test_fused_dispatch_matches_the_loop_reference_in_outputs_and_all_gradients(activation, capacity, shared):
    torch.manual_seed(3)
    fused, loop = _moe_pair(activation, capacity, shared)
    x_BSD = torch.randn(2, 9, 16)
    g_BSD = torch.randn(2, 9, 16)
    results = []
    for moe in (fused, loop):
        x = x_BSD.clone().requires_grad_()
        y, routing = moe(x)
        ((y * g_BSD).sum() + routing.aux_loss).backward()
        results.append((y, x.grad, routing))
    (y_f, dx_f, r_f), (y_l, dx_l, r_l) = results
    if capacity is not None:
        assert int(r_f.dropped()) > 0  # capacity 0.5 must drop pairs for the test to cover drops
    assert r_f.counts_E[5] == 0
    torch.testing.assert_close(y_f, y_l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx_f, dx_l, atol=1e-5, rtol=1e-5)
    for (name, p_f), p_l in zip(fused.named_parameters(), loop.parameters()):
        torch.testing.assert_close(p_f.grad, p_l.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_fused_dispatch_under_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(4)
    fused, _ = _moe_pair("swiglu", None, 0)
    x_BSD = torch.randn(2, 16, 16)
    y32, _ = fused(x_BSD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _ = fused(x_BSD)
    assert (y16.float() - y32).abs().max() <= 0.02 * y32.abs().max()


def test_combine_and_permute_are_exact_when_split_into_many_token_blocks(monkeypatch):
    import epmoe.model.permute as permute_module

    monkeypatch.setattr(permute_module, "CHUNK_BYTES", 1)  # one token per block
    torch.manual_seed(2)
    T, K, D, E = 7, 3, 4, 4
    idx_TK = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    keep_TK = torch.rand(T, K) > 0.25
    perm = make_permutation(idx_TK, keep_TK, E)
    assert len(permute_module._token_chunks(perm, D * 8)) == T
    y_ND = torch.randn(perm.choice_N.numel(), D, dtype=torch.float64)
    w_TK = torch.rand(T, K, dtype=torch.float64)
    expected_TD = torch.zeros(T, D, dtype=torch.float64)
    for n, pair in enumerate(perm.choice_N.tolist()):
        expected_TD[pair // K] += w_TK[pair // K, pair % K] * y_ND[n]
    assert torch.allclose(unpermute(y_ND, perm, w_TK), expected_TD, rtol=0, atol=1e-12)
    x_TD = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    w_TK.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: unpermute(permute(x, perm) * 2.0, perm, w), (x_TD, w_TK))


def test_exchange_dim_runs_the_routed_experts_at_width_x_with_gradients_everywhere():
    cfg = ModelConfig(d_model=16, num_experts=4, expert_hidden=8, n_shared_experts=1, shared_hidden=8,
                      exchange_dim=6, expert_impl="loop")  # fmt: skip
    torch.manual_seed(0)
    moe = MoE(cfg, RouterConfig(top_k=2))
    assert tuple(moe.experts.w_gate_EDF.shape) == (4, 6, 8)  # [E, X, F]: the experts see width X
    assert tuple(moe.descend.weight.shape) == (6, 16) and tuple(moe.ascend.weight.shape) == (16, 6)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y, routing = moe(x)
    assert y.shape == (2, 5, 16)
    (y.square().sum() + routing.aux_loss).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_exchange_dim_with_identity_projections_equals_the_plain_layer():
    plain_cfg = ModelConfig(d_model=8, num_experts=4, expert_hidden=8, n_shared_experts=0, expert_impl="loop")
    torch.manual_seed(0)
    plain = MoE(plain_cfg, RouterConfig(top_k=2))
    wide = MoE(dataclasses.replace(plain_cfg, exchange_dim=8), RouterConfig(top_k=2))
    wide.load_state_dict(plain.state_dict(), strict=False)  # router and experts; projections stay
    with torch.no_grad():
        wide.descend.weight.copy_(torch.eye(8))
        wide.ascend.weight.copy_(torch.eye(8))
    x = torch.randn(3, 4, 8)
    torch.testing.assert_close(wide(x)[0], plain(x)[0], atol=1e-6, rtol=1e-6)
