"""Placement policies that follow the token load: `balanced` (each expert once, equal load per
rank) and `redundant` (DeepSeek EPLB-style replicas of hot experts), on one packing routine.

Both decide each MoE layer on its own, from the tokens per expert that layer saw (RoutingStats).

Shape key:
  Y  MoE layers
  E  experts
  R  ranks in the EP group (ep)
  L  slots per rank
  N  items to pack onto ranks: experts, or replicas of experts (N = R * L)
"""

from __future__ import annotations

from collections import Counter

import torch

from epmoe.placement.placement import Placement, RoutingStats, check_policy_args


def pack_balanced(
    item_load_N: torch.Tensor,
    ep: int,
    slots_per_rank: int,
    item_expert_N: torch.Tensor | None = None,
    max_swaps: int | None = None,
) -> torch.Tensor:
    """[N] int64 rank of each item: every rank gets exactly `slots_per_rank` items and the max rank
    load is as small as the heuristic finds. Items with the same `item_expert_N` (replicas of one
    expert) go to different ranks where the slot counts allow it.

    1. LPT: heaviest item first, onto the least-loaded rank with a free slot (and no copy of it).
    2. Split copies of one expert that step 1 had to stack on a rank, by swaps with other ranks.
    3. Swaps: the best pairwise swap between the most-loaded rank and any other, while one lowers
       that rank's load without making the pair's max as high; LPT alone misses with a fixed slot
       count per rank (e.g. loads 9 8 7 6 5 1 on 2 ranks: LPT 20/16, swaps 18/18).
    """
    N = len(item_load_N)
    if N != ep * slots_per_rank:
        raise ValueError(f"{N} items cannot fill ep ({ep}) * slots_per_rank ({slots_per_rank}) slots exactly")
    load = item_load_N.double().tolist()
    expert = item_expert_N.tolist() if item_expert_N is not None else list(range(N))
    eps = 1e-9 * max(sum(load), 1.0)  # float noise: a swap must win by more than this
    rank_of = [0] * N
    rank_load = [0.0] * ep
    members: list[list[int]] = [[] for _ in range(ep)]
    held: list[Counter[int]] = [Counter() for _ in range(ep)]  # copies of each expert per rank

    def move(i: int, src: int | None, dst: int) -> None:
        if src is not None:
            members[src].remove(i)
            held[src][expert[i]] -= 1
            rank_load[src] -= load[i]
        members[dst].append(i)
        held[dst][expert[i]] += 1
        rank_load[dst] += load[i]
        rank_of[i] = dst

    def swap(i: int, j: int) -> None:
        a, b = rank_of[i], rank_of[j]
        move(i, a, b)
        move(j, b, a)

    # 1. LPT under the slot count
    for i in sorted(range(N), key=lambda i: (-load[i], i)):
        free = [r for r in range(ep) if len(members[r]) < slots_per_rank]
        fresh = [r for r in free if held[r][expert[i]] == 0] or free
        move(i, None, min(fresh, key=lambda r: (rank_load[r], r)))

    # 2. split stacked copies: swap one with an item of another rank that holds neither expert
    for i in range(N):
        a = rank_of[i]
        if held[a][expert[i]] < 2:
            continue
        options = [
            (abs(load[i] - load[j]), j)
            for b in range(ep)
            if b != a and held[b][expert[i]] == 0
            for j in members[b]
            if held[a][expert[j]] == 0
        ]
        if options:  # none: more copies than ranks, a stack is unavoidable
            swap(i, min(options)[1])

    # 3. pairwise swaps off the most-loaded rank
    for _ in range(max_swaps if max_swaps is not None else 4 * N):
        a = max(range(ep), key=lambda r: (rank_load[r], -r))
        best: tuple[float, int, int] | None = None
        for b in range(ep):
            if b == a:
                continue
            for i in members[a]:
                for j in members[b]:
                    d = load[i] - load[j]
                    if d <= eps or held[b][expert[i]] or held[a][expert[j]]:
                        continue  # no gain, or it would stack two copies of an expert on one rank
                    new_max = max(rank_load[a] - d, rank_load[b] + d)
                    if new_max < rank_load[a] - eps and (best is None or new_max < best[0]):
                        best = (new_max, i, j)
        if best is None:
            break
        swap(best[1], best[2])
    return torch.tensor(rank_of, dtype=torch.int64)


def replica_count_E(load_E: torch.Tensor, num_slots: int, ep: int) -> torch.Tensor:
    """[E] int64 slots per expert: one each, then every spare slot to the expert with the highest
    load per replica (ties: fewer replicas, then lower id). An expert already on all `ep` ranks gets
    no more while others can use one: a second copy on the same rank balances nothing."""
    E = len(load_E)
    load = load_E.double().tolist()
    count = [1] * E
    for _ in range(num_slots - E):
        open_ = [e for e in range(E) if count[e] < ep] or list(range(E))  # all on every rank: stack
        count[min(open_, key=lambda e: (-load[e] / count[e], count[e], e))] += 1
    return torch.tensor(count, dtype=torch.int64)


def balanced_placement(
    num_experts: int, ep: int, slots_per_rank: int, stats: RoutingStats | None, num_layers: int
) -> Placement:
    """Each expert once per layer (slots_per_rank == num_experts / ep), ranks' token loads equalised
    per layer by `pack_balanced` over `stats.load_YE` [Y, E]."""
    check_policy_args("balanced", num_experts, ep, slots_per_rank, stats, num_layers, needs_stats=True)
    expert_YN = torch.arange(num_experts).repeat(num_layers, 1)
    rank_YN = torch.stack([pack_balanced(load_E, ep, slots_per_rank) for load_E in stats.load_YE])
    return Placement.from_ranks(rank_YN, expert_YN, ep, num_experts, origin="balanced")


def redundant_placement(
    num_experts: int, ep: int, slots_per_rank: int, stats: RoutingStats | None, num_layers: int
) -> Placement:
    """DeepSeek EPLB-style: the ep * slots_per_rank - num_experts spare slots of each layer hold
    replicas of that layer's hottest experts (`replica_count_E`), each replica carrying an even share
    of its expert's tokens; then `pack_balanced` places the replicas, copies of one expert on
    different ranks. With no spare slots this is `balanced`."""
    check_policy_args("redundant", num_experts, ep, slots_per_rank, stats, num_layers, needs_stats=True, replicas=True)
    num_slots = ep * slots_per_rank
    rank_rows, expert_rows = [], []
    for load_E in stats.load_YE:
        count_E = replica_count_E(load_E, num_slots, ep)
        expert_N = torch.repeat_interleave(torch.arange(num_experts), count_E)
        item_load_N = load_E.double()[expert_N] / count_E[expert_N]  # tokens split evenly among replicas
        rank_rows.append(pack_balanced(item_load_N, ep, slots_per_rank, item_expert_N=expert_N))
        expert_rows.append(expert_N)
    return Placement.from_ranks(torch.stack(rank_rows), torch.stack(expert_rows), ep, num_experts, origin="redundant")
