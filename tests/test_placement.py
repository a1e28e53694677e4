"""Placement maps and policies on small hand-worked cases: validity, the static layouts against the
one-map functions, load balance (balanced, redundant) and cross-layer affinity (HiGHS and greedy).

Shape key: Y MoE layers, E experts, S slots, R ranks, M most replicas of an expert, T tokens, K top-k
"""

from __future__ import annotations

import pytest
import torch

from epmoe.placement import policies
from epmoe.placement.affinity import affinity_placement
from epmoe.placement.load_policies import pack_balanced, replica_count_E
from epmoe.placement.placement import Placement, RoutingStats
from epmoe.placement.policies import PLACEMENTS


def rank_sets(placement: Placement, layer: int) -> set[frozenset[int]]:
    """The groups of experts sharing a rank, whatever the rank labels."""
    return {frozenset(placement.experts_on_rank(layer, r).tolist()) for r in range(placement.ep)}


def rank_of(placement: Placement, layer: int, expert: int) -> int:
    return placement.expert_of_slot_YS[layer].tolist().index(expert) // placement.slots_per_rank


# -- the map --------------------------------------------------------------------------------------


def test_routing_stats_from_topk_counts_loads_and_cooccurrence():
    topk_idx_YTK = torch.tensor([[[0, 1], [0, 2], [3, 1]], [[2, 3], [1, 2], [0, 3]]])  # Y=2, T=3, K=2, E=4
    stats = RoutingStats.from_topk(topk_idx_YTK, 4)
    assert stats.load_YE.tolist() == [[2, 2, 1, 1], [1, 1, 2, 2]]
    # token 0: {0,1} x {2,3}; token 1: {0,2} x {1,2}; token 2: {3,1} x {0,3}
    assert stats.cooc_YEE.tolist() == [[[0, 1, 2, 1], [1, 0, 1, 2], [0, 1, 1, 0], [1, 0, 0, 1]]]
    doubled = stats + stats
    assert doubled.load_YE.tolist() == [[4, 4, 2, 2], [2, 2, 4, 4]] and int(doubled.cooc_YEE.sum()) == 24


@pytest.mark.parametrize("name", ["contiguous", "round_robin"])
def test_static_placements_equal_the_one_map_policies(name):
    placement = PLACEMENTS[name](8, 4, 2, None, 3)
    assert placement.origin == name and placement.num_layers == 3 and placement.slots_per_rank == 2
    for layer in range(3):
        assert torch.equal(placement.slot_of_expert_E(layer), policies.POLICIES[name](8, 4))
        for rank in range(4):
            expected = policies.experts_on_rank(policies.POLICIES[name](8, 4), 4, rank)
            assert torch.equal(placement.experts_on_rank(layer, rank), expected)
    assert placement.experts_on_rank(0, 1).tolist() == ([2, 3] if name == "contiguous" else [1, 5])


@pytest.mark.parametrize(
    "expert_of_slot_YS, ep, num_experts, message",
    [
        (torch.tensor([[0, 1, 2, 3]], dtype=torch.int32), 2, 4, r"int64 tensor \[layers, slots\], got torch.int32"),
        (torch.tensor([0, 1, 2, 3]), 2, 4, r"got torch.int64 of shape \(4,\)"),
        (torch.tensor([[0, 1, 2, 3, 0, 1]]), 4, 4, r"slots \(6\) must be a multiple of ep \(4\)"),
        (torch.tensor([[0, 1, 2, 3]]), 2, 6, r"4 slots cannot hold 6 experts; need slots_per_rank >= 3"),
        (torch.tensor([[0, 1, 2, 4]]), 2, 4, r"expert ids must lie in \[0, 4\), got \[0, 4\]"),
        (torch.tensor([[0, 1, 2, 3], [0, 1, 1, 0]]), 2, 4, r"layer 1 places no slot for experts \[2, 3\]"),
    ],
)
def test_validate_rejects_bad_maps_with_the_values(expert_of_slot_YS, ep, num_experts, message):
    with pytest.raises(ValueError, match=message):
        Placement(expert_of_slot_YS, ep, num_experts)


def test_from_slot_of_expert_rejects_a_non_permutation():
    with pytest.raises(ValueError, match=r"permutation of 0..3, got \[0, 0, 1, 2\]"):
        Placement.from_slot_of_expert(torch.tensor([0, 0, 1, 2]), 2, 1)


def test_replicas_split_their_expert_load():
    placement = Placement(torch.tensor([[0, 1, 0, 2]]), ep=2, num_experts=3)  # expert 0 on both ranks
    assert placement.has_replicas and placement.replica_count_YE.tolist() == [[2, 1, 1]]
    assert placement.replica_slots_EM(0).tolist() == [[0, 2], [1, -1], [3, -1]]
    load_E = torch.tensor([10, 4, 6])
    assert placement.rank_load_R(0, load_E).tolist() == [5 + 4, 5 + 6]
    assert placement.imbalance(load_E[None]) == pytest.approx(11 / 10)
    with pytest.raises(ValueError, match="4 slots for 3 experts"):
        placement.slot_of_expert_E(0)


def test_imbalance_weights_layers_by_their_load():
    placement = PLACEMENTS["contiguous"](4, 2, 2, None, 2)
    load_YE = torch.tensor([[3, 3, 1, 1], [5, 5, 5, 5]])  # layer 0: ranks 6 / 2; layer 1: 10 / 10
    assert placement.imbalance_Y(load_YE).tolist() == [1.5, 1.0]
    assert placement.imbalance(load_YE) == pytest.approx((6 + 10) / (4 + 10))  # sum of max / sum of mean


# -- load-following policies ----------------------------------------------------------------------


def test_balanced_evens_a_zipf_load_that_contiguous_does_not():
    load_YE = torch.tensor([[round(1000 / (e + 1) ** 0.4) for e in range(16)]])  # 1000, 758, ..., 330
    stats = RoutingStats(load_YE)
    contiguous = PLACEMENTS["contiguous"](16, 4, 4, stats, 1)
    balanced = PLACEMENTS["balanced"](16, 4, 4, stats, 1)
    assert contiguous.imbalance(load_YE) >= 1.5
    assert balanced.imbalance(load_YE) <= 1.05
    # optimal: the hottest expert's rank cannot do better than it plus the three coldest
    assert balanced.rank_load_YR(load_YE).max() == 1000 + 348 + 339 + 330
    assert {len(balanced.experts_on_rank(0, r)) for r in range(4)} == {4}


def test_balanced_finds_the_optimum_that_lpt_alone_misses():
    # loads 9 8 7 6 5 1 on 2 ranks of 3: LPT gives {9,6,5}=20 / {8,7,1}=16; the optimum is 18 / 18
    load_E = torch.tensor([9.0, 8, 7, 6, 5, 1])
    assert pack_balanced(load_E, 2, 3, max_swaps=0).tolist() == [0, 1, 1, 0, 0, 1]
    load_YE = torch.stack([load_E, load_E.flip(0)])  # layer 1: expert e has layer 0's load of 5 - e
    placement = PLACEMENTS["balanced"](6, 2, 3, RoutingStats(load_YE), 2)
    assert rank_sets(placement, 0) == {frozenset({0, 1, 5}), frozenset({2, 3, 4})}
    assert rank_sets(placement, 1) == {frozenset({5, 4, 0}), frozenset({3, 2, 1})}
    assert placement.rank_load_YR(load_YE).tolist() == [[18.0, 18.0], [18.0, 18.0]]


def test_pack_splits_copies_that_lpt_stacks_on_one_rank():
    # LPT: A -> rank 0, B C D fill rank 1, so both copies of Z land on rank 0; a swap with B splits them
    item_expert_N = torch.tensor([0, 1, 2, 3, 4, 4])  # A B C D Z Z
    rank_of_item_N = pack_balanced(torch.tensor([100, 1, 1, 1, 0.5, 0.5]), 2, 3, item_expert_N=item_expert_N)
    assert rank_of_item_N.tolist() == [0, 0, 1, 1, 1, 0]


def test_replicas_go_to_the_hottest_experts_and_not_past_every_rank():
    # 2 spare slots, ep 2: expert 0 is on both ranks after one replica, so the second goes to expert 1
    assert replica_count_E(torch.tensor([100, 1, 1, 1]), num_slots=6, ep=2).tolist() == [2, 2, 1, 1]


def test_redundant_replicates_hot_experts_and_beats_balanced():
    load_YE = torch.tensor([[120, 40, 10, 10, 10, 10, 10, 10]])  # mean rank load 55 on 4 ranks
    stats = RoutingStats(load_YE)
    balanced = PLACEMENTS["balanced"](8, 4, 2, stats, 1)
    redundant = PLACEMENTS["redundant"](8, 4, 3, stats, 1)  # 12 slots: 4 spare
    # spare slots by load per replica: expert 0 (120 -> 60), 0 (60 -> 40), then 0 and 1 tie at 40 and
    # fewer replicas wins: 1 (40 -> 20), then 0 (40 -> 30). Replicas carry 30 x4, 20 x2, 10 x6.
    assert redundant.replica_count_YE.tolist() == [[4, 2, 1, 1, 1, 1, 1, 1]]
    for rank in range(4):
        on_rank = redundant.experts_on_rank(0, rank).tolist()
        assert len(on_rank) == len(set(on_rank)) == 3  # no expert twice on a rank
    # each rank holds one 30; the two ranks with a 20 reach 30 + 20 + 10 = 60, the best possible
    assert sorted(redundant.rank_load_R(0, load_YE[0]).tolist()) == [50.0, 50.0, 60.0, 60.0]
    assert balanced.imbalance(load_YE) == pytest.approx(130 / 55)  # expert 0's rank: 120 + 10
    assert redundant.imbalance(load_YE) < balanced.imbalance(load_YE)


def test_load_policies_reject_bad_arguments():
    stats = RoutingStats(torch.ones(1, 8))
    with pytest.raises(ValueError, match=r"'balanced' placement needs RoutingStats"):
        PLACEMENTS["balanced"](8, 2, 4, None, 1)
    with pytest.raises(ValueError, match=r"slots_per_rank \(5\) must be num_experts / ep \(4\); use 'redundant'"):
        PLACEMENTS["balanced"](8, 2, 5, stats, 1)
    with pytest.raises(ValueError, match=r"ep \(3\) must divide num_experts \(8\).*\[1, 2, 4, 8\]"):
        PLACEMENTS["contiguous"](8, 3, 3, None, 1)
    with pytest.raises(ValueError, match=r"slots_per_rank \(1\) \* ep \(4\) slots cannot hold 8 experts"):
        PLACEMENTS["redundant"](8, 4, 1, stats, 1)
    with pytest.raises(ValueError, match=r"stats cover 1 layers x 8 experts, but the model has 2 MoE layers"):
        PLACEMENTS["balanced"](8, 2, 4, stats, 2)


LAYOUTS = [(1, 8, 1), (2, 4, 3), (4, 2, 2)]  # (ep, slots_per_rank, num_layers) for 8 experts


@pytest.mark.parametrize(
    "name, ep, slots_per_rank, num_layers",
    [(name, *layout) for name in sorted(PLACEMENTS) for layout in LAYOUTS] + [("redundant", 4, 3, 2)],
)
def test_every_policy_returns_a_full_map(name, ep, slots_per_rank, num_layers):
    gen = torch.Generator().manual_seed(ep * 10 + num_layers)
    topk_idx_YTK = torch.randint(0, 8, (num_layers, 64, 1), generator=gen)
    placement = PLACEMENTS[name](8, ep, slots_per_rank, RoutingStats.from_topk(topk_idx_YTK, 8), num_layers)
    assert placement.expert_of_slot_YS.shape == (num_layers, ep * slots_per_rank)
    assert placement.origin.startswith(name)
    for layer in range(num_layers):  # every expert placed (validate ran), exactly once unless replicated
        assert placement.replica_count_YE[layer].min() >= 1
        if slots_per_rank * ep == 8:
            assert sorted(placement.expert_of_slot_YS[layer].tolist()) == list(range(8))


# -- affinity -------------------------------------------------------------------------------------

PI_Y = [[3, 6, 0, 5, 7, 1, 4, 2], [5, 2, 7, 0, 3, 6, 1, 4]]  # expert i in layer y -> PI_Y[y][i] in y+1


def strong_pair_trace() -> RoutingStats:
    """300 tokens, top-1, 3 MoE layers of 8 experts: 20 + 5e tokens start at expert e; a token moves
    from i to PI_Y[y][i], except every 10th (layer 0 -> 1) or 7th (1 -> 2), which goes elsewhere."""
    first_T = torch.cat([torch.full((20 + 5 * e,), e) for e in range(8)])
    t = torch.arange(len(first_T))
    second_T = torch.where(t % 10 == 0, (first_T + 3) % 8, torch.tensor(PI_Y[0])[first_T])
    third_T = torch.where(t % 7 == 0, (second_T + 5) % 8, torch.tensor(PI_Y[1])[second_T])
    return RoutingStats.from_topk(torch.stack([first_T, second_T, third_T])[:, :, None], 8)


@pytest.mark.parametrize("path, options", [("highs", {}), ("greedy", {"max_variables": 0})])
def test_affinity_keeps_strongly_cooccurring_experts_together(path, options):
    stats = strong_pair_trace()
    placement = affinity_placement(8, 2, 4, stats, 3, tolerance=0.10, **options)
    assert placement.origin.startswith(f"affinity:{path}")
    for y in range(2):
        for i in range(8):
            assert rank_of(placement, y, i) == rank_of(placement, y + 1, PI_Y[y][i]), (y, i, placement.origin)
    assert (placement.imbalance_Y(stats.load_YE) <= 1.10 + 1e-9).all()
    balanced = PLACEMENTS["balanced"](8, 2, 4, stats, 3)
    assert placement.colocation(stats.cooc_YEE) > 0.95 > 0.65 > balanced.colocation(stats.cooc_YEE)


def test_affinity_says_when_it_falls_back_and_why():
    stats = strong_pair_trace()
    greedy = affinity_placement(8, 2, 4, stats, 3, max_variables=10)
    assert "ILP too large" in greedy.origin and "max_variables 10" in greedy.origin
    with pytest.raises(ValueError, match="needs RoutingStats.cooc_YEE"):
        affinity_placement(8, 2, 4, RoutingStats(stats.load_YE), 3)


def test_affinity_relaxes_an_infeasible_tolerance_to_what_balanced_reaches():
    # expert 0 (layer 0) and 1 (layer 1) alone carry 10 of 13 tokens: no rank can stay near the mean
    topk_idx_YTK = torch.tensor([[0] * 10 + [1, 2, 3], [1] * 10 + [0, 2, 3]])[:, :, None]
    stats = RoutingStats.from_topk(topk_idx_YTK, 4)
    for options in ({}, {"max_variables": 0}):
        placement = affinity_placement(4, 2, 2, stats, 2, tolerance=0.10, **options)
        assert "tolerance 0.10 infeasible in layers [0, 1], relaxed up to 0.69" in placement.origin  # 11 / 6.5
        assert placement.rank_load_YR(stats.load_YE).max(-1).values.tolist() == [11.0, 11.0]
        assert rank_of(placement, 0, 0) == rank_of(placement, 1, 1)  # the 10 tokens 0 -> 1 stay on a rank


def test_affinity_greedy_takes_balanced_groups_when_following_affinity_overloads_a_rank():
    # Both layers' loads 3 3 2 2 1 1 (balanced: 6 / 6, limit 6.6). Every layer-1 expert co-occurs
    # most with layer-0 expert 0, so the greedy piles onto its rank: 3 + 3, then 2 and 1 no longer
    # fit, and the last free slot is there again (7 > 6.6). Balanced groups {0, 2, 4} / {1, 3, 5}
    # instead, the first on expert 0's rank (co-occurrence 60 + 40 + 20 against 50 + 30 + 10).
    load_YE = torch.tensor([[3, 3, 2, 2, 1, 1]] * 2)
    cooc_YEE = torch.zeros(1, 6, 6)
    cooc_YEE[0, 0] = torch.tensor([60, 50, 40, 30, 20, 10])
    stats = RoutingStats(load_YE, cooc_YEE)
    for path, options in (("highs", {}), ("greedy", {"max_variables": 0})):
        placement = affinity_placement(6, 2, 3, stats, 2, tolerance=0.10, **options)
        assert placement.origin.startswith(f"affinity:{path}")
        assert rank_sets(placement, 1) == {frozenset({0, 2, 4}), frozenset({1, 3, 5})}
        assert placement.experts_on_rank(1, rank_of(placement, 0, 0)).tolist() == [0, 2, 4]
        assert placement.colocation(cooc_YEE) == pytest.approx(120 / 210)
    assert "layers [1] took balanced groups" in placement.origin


# --- slot maps: where a rank sends each (token, choice) ---


def test_slot_map_without_replicas_is_the_slot_of_each_expert() -> None:
    from epmoe.comm.slot_map import SlotMap

    slots = SlotMap.from_slot_of_expert(torch.tensor([2, 0, 3, 1]), ep=2, rank=1)
    assert not slots.has_replicas and slots.slots_per_rank == 2
    assert slots(torch.tensor([[0, 1], [3, 2]])).tolist() == [[2, 0], [1, 3]]


def test_slot_map_prefers_the_own_replica_then_spreads_over_the_others() -> None:
    from epmoe.comm.slot_map import SlotMap

    # ep 3, 2 slots per rank: rank 0 holds experts 0, 1; rank 1 holds 0, 2; rank 2 holds 3, 1
    expert_of_slot = torch.tensor([0, 1, 0, 2, 3, 1])
    on_rank1 = SlotMap(expert_of_slot, ep=3, rank=1)
    assert on_rank1.replicas_E.tolist() == [2, 2, 1, 1]
    # expert 0 has a replica here (slot 2); expert 1 does not: its pairs alternate between slots 1 and 5
    assert on_rank1(torch.tensor([[0, 1], [1, 3], [0, 1]])).tolist() == [[2, 5], [1, 4], [2, 5]]
    on_rank2 = SlotMap(expert_of_slot, ep=3, rank=2)
    # expert 0 has no replica on rank 2: pairs 0, 1, 2, 3 (t * K + k) go to slots 0, 2, 0, 2
    assert on_rank2(torch.tensor([[0, 0], [0, 0]])).tolist() == [[0, 2], [0, 2]]
    assert on_rank2(torch.tensor([[1, 3]])).tolist() == [[5, 4]]  # its own replica of 1, its 3
    with pytest.raises(ValueError, match=r"experts \[2\] have no slot"):
        SlotMap(torch.tensor([0, 1, 0, 3]), ep=2, rank=0, num_experts=4)
