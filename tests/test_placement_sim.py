"""The placement simulator's cost model (benchmarks/placement_cost.py) on hand-worked cases: 2 nodes x
2 GPUs (ranks 0, 1 on node 0; ranks 2, 3 on node 1), 4 experts, a handful of tokens whose home is
rank t mod 4. Rows of 1000 bytes, so bytes = rows * 1000; a step doubles the forward pass.

Shape key: Y MoE layers, T tokens, K top-k, S slots, R ranks
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import placement_cost as sim
from benchmarks.placement_sim import node_affinity_placement
from epmoe.placement.placement import Placement, RoutingStats

ROW = 1000
CLUSTER = sim.Cluster(
    gpus_per_node=2,
    nvlink_gbps=1.0,
    ib_gbps=0.5,
    nvlink_latency_us=1.0,
    ib_latency_us=2.0,
    hidden=ROW,
    bytes_per_elem=1,
)


def contiguous(layers: int) -> Placement:
    return Placement(torch.arange(4).repeat(layers, 1), ep=4, num_experts=4)


def test_return_path_top1_bytes_load_and_time():
    # token 0 (rank 0) -> e0 rank 0: local; 1 (rank 1) -> e0: intra; 2 (rank 2) -> e1: inter; 3 (rank 3) -> e0: inter
    topk_YTK = torch.tensor([[[0], [0], [1], [0]]])
    res = sim.simulate(topk_YTK, contiguous(1), CLUSTER)
    assert res.load_YR.tolist() == [[3, 1, 0, 0]]
    assert res.load_ratio == pytest.approx(3.0)  # max 3 / mean 1
    # dispatch + combine, doubled for the backward: 2 inter rows -> 8, 1 intra row -> 4
    assert res.ret.inter_bytes == 8 * ROW and res.ret.intra_bytes == 4 * ROW
    assert res.ret.kept_local == pytest.approx(0.25)
    # slowest link per exchange: one IB row (1000 B / 0.5 GB/s = 2 us) + one IB message (2 us) = 4 us;
    # the NVLink row costs 1 us + 1 us. Dispatch + combine, times two for the backward: 16 us.
    assert res.ret.seconds == pytest.approx(16e-6)
    # one layer: the forward path is the return path
    assert res.fwd.inter_bytes == res.ret.inter_bytes and res.fwd.seconds == pytest.approx(res.ret.seconds)


def test_forward_path_top2_counts_each_pair_as_half_a_row():
    # one token at home rank 0: layer 0 picks e0 (rank 0), e2 (rank 2); layer 1 picks e1 (rank 1), e3 (rank 3)
    topk_YTK = torch.tensor([[[0, 2]], [[1, 3]]])
    res = sim.simulate(topk_YTK, contiguous(2), CLUSTER)
    # forward: dispatch 0->0 local, 0->2 inter; hop pairs (0->1 intra, 0->3 inter, 2->1 inter, 2->3 intra)
    # of 1/2 row each; return 1->0 intra, 3->0 inter. Inter 1 + 1 + 1 = 3, intra 1 + 1 = 2 rows, x2.
    assert res.fwd.inter_bytes == 6 * ROW and res.fwd.intra_bytes == 4 * ROW
    assert res.fwd.kept_local == pytest.approx(1 / 6)
    # return: layer 0 moves 1 inter row each way, layer 1 one intra and one inter row each way
    assert res.ret.inter_bytes == 8 * ROW and res.ret.intra_bytes == 4 * ROW
    assert res.load_YR.tolist() == [[1, 0, 1, 0], [0, 1, 0, 1]]
    assert res.load_ratio == pytest.approx(2.0)


def test_forward_path_rewards_consecutive_experts_on_one_rank():
    # home rank 1 -> e2 in layer 0 (rank 2, node 1) -> e3 in layer 1 -> home
    topk_YTK = torch.tensor([[[0], [2]], [[1], [3]]])  # token 0 (rank 0): e0 -> e1; token 1 (rank 1): e2 -> e3
    apart = sim.simulate(topk_YTK, contiguous(2), CLUSTER)
    # token 0: 0->0 local, hop 0->1 intra, 1->0 intra; token 1: 1->2 inter, hop 2->3 intra, 3->1 inter
    assert apart.fwd.inter_bytes == 4 * ROW and apart.fwd.intra_bytes == 6 * ROW
    # layer 1 with e1 on rank 0 and e3 on rank 2 (swapped with e0, e2): both hops stay on their rank
    together = Placement(torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]]), ep=4, num_experts=4)
    res = sim.simulate(topk_YTK, together, CLUSTER)
    assert res.fwd.inter_bytes == 4 * ROW and res.fwd.intra_bytes == 0
    assert res.fwd.kept_local == pytest.approx(4 / 6)
    # the return path does not care where layer 1's experts sit relative to layer 0's
    assert res.ret.inter_bytes == apart.ret.inter_bytes == 8 * ROW


def test_replicas_same_rank_then_same_node_then_in_turn():
    # slots (2 per rank): rank 0 [e0, e1], rank 1 [e0, e3], rank 2 [e2, e3], rank 3 [e1, e2]
    placement = Placement(torch.tensor([[0, 1, 0, 3, 2, 3, 1, 2]]), ep=4, num_experts=4)
    topk_YTK = torch.tensor([[[3], [3], [0], [3], [2], [1], [0], [1]]])  # token t at home rank t % 4
    dest_TK = sim.destination_ranks(torch.arange(8) % 4, topk_YTK[0], sim.replica_ranks_EM(placement, 0), 2)
    # t0: e3 on node 0 at rank 1; t1: e3 on its own rank; t2, t6: e0 has no copy on node 1, so rank 0 then 1;
    # t3: e3's node-1 copy; t4: e2 only on node 1, first turn rank 2; t5: e1's node-0 copy; t7: e1 on its rank
    assert dest_TK.flatten().tolist() == [1, 1, 0, 2, 2, 0, 1, 3]
    res = sim.simulate(topk_YTK, placement, CLUSTER)
    assert res.load_YR.tolist() == [[2, 3, 2, 1]] and res.load_ratio == pytest.approx(1.5)
    # 2 local (t1, t7), 3 intra (t0, t3, t5), 3 inter (t2, t4, t6); dispatch + combine, x2
    assert res.ret.inter_bytes == 12 * ROW and res.ret.intra_bytes == 12 * ROW
    assert res.ret.kept_local == pytest.approx(0.25)


def test_tokens_per_rank_scales_bytes_not_balance():
    topk_YTK = torch.tensor([[[0], [0], [1], [0]]])  # 1 trace token per rank
    base = sim.simulate(topk_YTK, contiguous(1), CLUSTER)
    scaled = sim.simulate(topk_YTK, contiguous(1), CLUSTER, tokens_per_rank=3)
    assert scaled.ret.inter_bytes == 3 * base.ret.inter_bytes and scaled.ret.intra_bytes == 3 * base.ret.intra_bytes
    assert scaled.load_ratio == base.load_ratio
    # bandwidth term triples (3 rows: 6 us), messages do not (2 us): (6 + 2) us x 2 exchanges x 2
    assert scaled.ret.seconds == pytest.approx(32e-6)


def test_replicas_split_evenly_without_locality():
    # as above, but every choice of a replicated expert goes to its replicas in turn, home h starting at
    # its (h mod 2)-th: t0 e3 -> rank 1, t1 e3 -> 2, t2 e0 -> 0, t3 e3 -> 2, t4 e2 -> 2, t5 e1 -> 3,
    # t6 e0 (home 2's second) -> 1, t7 e1 -> 3
    placement = Placement(torch.tensor([[0, 1, 0, 3, 2, 3, 1, 2]]), ep=4, num_experts=4)
    expert_TK = torch.tensor([[3], [3], [0], [3], [2], [1], [0], [1]])
    rank_EM = sim.replica_ranks_EM(placement, 0)
    assert rank_EM.tolist() == [[0, 1], [0, 3], [2, 3], [1, 2]]
    dest_TK = sim.destination_ranks(torch.arange(8) % 4, expert_TK, rank_EM, 2, local=False)
    assert dest_TK.flatten().tolist() == [1, 2, 0, 2, 2, 3, 1, 3]
    res = sim.simulate(expert_TK[None], placement, CLUSTER, local_replicas=False)
    assert res.load_YR.tolist() == [[1, 2, 3, 2]]
    # moves: t0 0->1 intra, t1 1->2 inter, t2 2->0 inter, t3 3->2 intra, t4 0->2 inter, t5 1->3 inter,
    # t6 2->1 inter, t7 3->3 local: 5 inter, 2 intra rows; dispatch + combine, x2
    assert res.ret.inter_bytes == 20 * ROW and res.ret.intra_bytes == 8 * ROW


def test_node_affinity_keeps_pairs_on_one_node():
    # 8 experts, 2 MoE layers; tokens of expert i in layer 0 all go to expert (3 * i) % 8 in layer 1
    E, partner_E = 8, (3 * torch.arange(8)) % 8
    load_YE = torch.full((2, E), 10)
    cooc_YEE = torch.zeros(1, E, E, dtype=torch.int64)
    cooc_YEE[0, torch.arange(E), partner_E] = 10
    placement = node_affinity_placement(E, ep=4, gpus_per_node=2, stats=RoutingStats(load_YE, cooc_YEE), num_layers=2)
    node_YE = torch.stack([placement.rank_share_YER[y].argmax(1) // 2 for y in range(2)])  # [Y, E] node of each expert
    assert torch.equal(node_YE[0], node_YE[1, partner_E])
    assert placement.imbalance(load_YE) == pytest.approx(1.0)  # 2 experts of equal load on every rank
