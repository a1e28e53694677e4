"""`affinity` placement (MoETuner-style): place the experts of all MoE layers jointly so that tokens
going from expert i in layer y to expert j in layer y+1 stay on one rank as often as possible, which
saves the all-to-all hop between layers; each rank keeps its token load near the mean.

An ILP over x[y, e, r] (expert e of layer y on rank r), solved by scipy's HiGHS MILP with a time
limit; a greedy heuristic with local search when the ILP is too large or HiGHS finds nothing in
time. `Placement.origin` names the path taken ("affinity:highs ..." or "affinity:greedy ...").

Shape key:
  Y  MoE layers
  E  experts
  R  ranks in the EP group (ep)
  L  experts per rank (num_experts / ep)
  P  expert pairs (i in layer y, j in layer y+1) the ILP models
"""

from __future__ import annotations

import numpy as np
import torch

from epmoe.placement.load_policies import balanced_placement
from epmoe.placement.placement import Placement, RoutingStats, check_policy_args


def affinity_placement(
    num_experts: int,
    ep: int,
    slots_per_rank: int,
    stats: RoutingStats | None,
    num_layers: int,
    *,
    tolerance: float = 0.10,
    time_limit_s: float = 5.0,
    max_variables: int = 20_000,
    pairs_per_expert: int | None = 4,
) -> Placement:
    """Maximise the co-occurrence `stats.cooc_YEE` [Y-1, E, E] kept on one rank, each expert once
    per layer, subject to every rank's token load per layer (from `stats.load_YE` [Y, E]) staying
    within (1 + tolerance) * mean.

    tolerance: allowed load excess over the layer mean. Where no placement meets it (an expert
        alone exceeds it, say) that layer's limit relaxes to what `balanced` achieves; origin says so.
    time_limit_s: HiGHS's wall-clock limit.
    max_variables: above this ILP size go straight to the greedy heuristic (0 forces it).
    pairs_per_expert: model only each expert's top pairs (by co-occurrence, towards either
        neighbouring layer) in the ILP, to bound its size; None: every non-zero pair. The reported
        colocation and the greedy always count every pair.
    """
    check_policy_args("affinity", num_experts, ep, slots_per_rank, stats, num_layers, needs_stats=True)
    if num_layers > 1 and stats.cooc_YEE is None:
        raise ValueError("'affinity' placement needs RoutingStats.cooc_YEE (cross-layer co-occurrence); got None")
    load_YE = stats.load_YE.double()
    cooc_YEE = stats.cooc_YEE.double() if num_layers > 1 else torch.zeros(0, num_experts, num_experts)

    # Load limit per layer: (1 + tolerance) * mean, or what `balanced` reaches where that is more,
    # so that a feasible placement always exists (the balanced one).
    balanced = balanced_placement(num_experts, ep, slots_per_rank, stats, num_layers)
    mean_Y = load_YE.sum(-1) / ep
    cap_Y = torch.maximum((1 + tolerance) * mean_Y, balanced.rank_load_YR(load_YE).max(-1).values * (1 + 1e-9))
    relaxed = [y for y in range(num_layers) if cap_Y[y] > (1 + tolerance) * mean_Y[y] * (1 + 1e-9)]
    note = ""
    if relaxed:
        worst = float((cap_Y[relaxed] / mean_Y[relaxed]).max()) - 1
        note = f"; tolerance {tolerance:.2f} infeasible in layers {relaxed}, relaxed up to {worst:.2f}"

    rank_of_balanced_YE = _rank_of_expert_YE(balanced)
    greedy_YE, regrouped = _greedy(load_YE, cooc_YEE, ep, slots_per_rank, cap_Y, rank_of_balanced_YE)
    greedy_kept = _kept(greedy_YE, cooc_YEE)

    pairs_P4 = _pairs(cooc_YEE, pairs_per_expert)  # [P, 4]: y, i, j, weight
    num_vars = num_layers * num_experts * ep + len(pairs_P4) * ep

    if num_vars > max_variables:
        rank_YE, path = greedy_YE, f"greedy (ILP too large: {num_vars} variables > max_variables {max_variables})"
    else:
        milp_YE, status = _solve_milp(load_YE, pairs_P4, ep, slots_per_rank, cap_Y, time_limit_s)
        if milp_YE is None:
            rank_YE, path = greedy_YE, f"greedy (HiGHS found no placement in {time_limit_s:g} s: {status})"
        elif _kept(milp_YE, cooc_YEE) < greedy_kept:
            rank_YE, path = greedy_YE, f"greedy (kept more than HiGHS's placement, {status}; {num_vars} variables)"
        else:
            rank_YE, path = milp_YE, f"highs ({status}; {num_vars} variables)"

    if rank_YE is greedy_YE and regrouped:
        path += f"; layers {regrouped} took balanced groups"
    total = float(cooc_YEE.sum())
    kept = _kept(rank_YE, cooc_YEE) / total if total > 0 else 1.0
    origin = f"affinity:{path}; colocation {kept:.3f}{note}"
    expert_YE = torch.arange(num_experts).repeat(num_layers, 1)
    return Placement.from_ranks(rank_YE, expert_YE, ep, num_experts, origin=origin)


def _rank_of_expert_YE(placement: Placement) -> torch.Tensor:
    """[Y, E] rank of each expert, for a placement without replicas."""
    rank_YE = torch.empty_like(placement.expert_of_slot_YS)
    rank_YE.scatter_(1, placement.expert_of_slot_YS, placement.rank_of_slot_S.expand_as(rank_YE).contiguous())
    return rank_YE


def _kept(rank_YE: torch.Tensor, cooc_YEE: torch.Tensor) -> float:
    """Co-occurrence kept on one rank: sum of cooc[y, i, j] over pairs with rank[y, i] == rank[y+1, j]."""
    same_YEE = rank_YE[:-1, :, None] == rank_YE[1:, None, :]
    return float((cooc_YEE * same_YEE).sum())


def _pairs(cooc_YEE: torch.Tensor, pairs_per_expert: int | None) -> np.ndarray:
    """[P, 4] float64 rows (y, i, j, cooc[y, i, j]) of the non-zero pairs the ILP models: all, or
    the union of each i's top pairs into layer y+1 and each j's top pairs from layer y."""
    keep_YEE = cooc_YEE > 0
    if pairs_per_expert is not None and cooc_YEE.shape[0] and pairs_per_expert < cooc_YEE.shape[-1]:
        top_YEE = torch.zeros_like(keep_YEE)
        k = pairs_per_expert
        top_YEE.scatter_(2, cooc_YEE.topk(k, dim=2).indices, True)  # i's top k partners j
        top_YEE.scatter_(1, cooc_YEE.topk(k, dim=1).indices, True)  # j's top k partners i
        keep_YEE &= top_YEE
    y, i, j = keep_YEE.nonzero(as_tuple=True)
    return np.column_stack([y.numpy(), i.numpy(), j.numpy(), cooc_YEE[y, i, j].numpy()]).reshape(-1, 4)


def _solve_milp(
    load_YE: torch.Tensor, pairs_P4: np.ndarray, ep: int, L: int, cap_Y: torch.Tensor, time_limit_s: float
) -> tuple[torch.Tensor | None, str]:
    """([Y, E] rank per expert or None, HiGHS's status in words).

    Variables: x[y, e, r] binary, then z[p, r] in [0, 1] (both ends of pair p = (y, i, j) on rank r).
      max   sum_p w_p * sum_r z[p, r]
      s.t.  sum_r x[y, e, r] = 1                    each expert on one rank
            sum_e x[y, e, r] = L                    each rank full
            sum_e load[y, e] * x[y, e, r] <= cap_y  load limit
            z[p, r] <= x[y, i, r],  z[p, r] <= x[y + 1, j, r]
    z needs no integrality: at a maximum it equals min of the two x, integral once x is.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp  # NOTE: here, not at the top: only affinity pays
    from scipy.sparse import coo_array

    Y, E = load_YE.shape
    R = ep
    P = len(pairs_P4)
    nx = Y * E * R
    xid = np.arange(nx).reshape(Y, E, R)  # x[y, e, r] -> column
    rows, cols, vals, lo, hi = [], [], [], [], []
    row = 0

    def add(r_idx: np.ndarray, c_idx: np.ndarray, v: np.ndarray, lb: np.ndarray, ub: np.ndarray) -> None:
        nonlocal row
        rows.append(r_idx + row)
        cols.append(c_idx)
        vals.append(v)
        lo.append(lb)
        hi.append(ub)
        row += len(lb)

    ones = np.ones(nx)
    add(np.arange(Y * E).repeat(R), xid.reshape(-1), ones, np.ones(Y * E), np.ones(Y * E))  # one rank each
    by_rank = xid.transpose(0, 2, 1).reshape(-1)  # columns ordered (y, r, e)
    add(np.arange(Y * R).repeat(E), by_rank, ones, np.full(Y * R, L), np.full(Y * R, L))  # ranks full
    # load limit, in units of the layer mean so the coefficients stay near 1
    mean_Y = (load_YE.sum(-1) / R).clamp_min(1e-12).numpy()
    unit_YE = load_YE.numpy() / mean_Y[:, None]
    load_coef = np.repeat(unit_YE, R, axis=0).reshape(-1)  # [Y, E] -> [Y * R * E] in (y, r, e) order
    add(np.arange(Y * R).repeat(E), by_rank, load_coef, np.full(Y * R, -np.inf), (cap_Y.numpy() / mean_Y).repeat(R))
    if P:
        py, pi, pj = (pairs_P4[:, c].astype(np.int64) for c in range(3))
        zid = nx + np.arange(P * R)  # z[p, r] -> column, (p, r) order
        pr = np.arange(P * R)
        coef = np.concatenate([np.ones(P * R), -np.ones(P * R)])  # z - x <= 0
        for end_PR in (xid[py, pi], xid[py + 1, pj]):  # [P, R] columns of each pair end's x
            cols_zx = np.concatenate([zid, end_PR.reshape(-1)])
            add(np.tile(pr, 2), cols_zx, coef, np.full(P * R, -np.inf), np.zeros(P * R))

    A = coo_array((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(row, nx + P * R))
    c = np.zeros(nx + P * R)
    if P:
        c[nx:] = -np.repeat(pairs_P4[:, 3] / pairs_P4[:, 3].max(), R)  # milp minimises
    ub = np.ones(nx + P * R)
    # Ranks are interchangeable: relabel them by the lowest layer-0 expert they hold, and expert e of
    # layer 0 sits on a rank <= e. Cuts the R! symmetric copies of every solution.
    for e in range(min(E, R)):
        ub[xid[0, e, e + 1 :]] = 0
    integrality = np.concatenate([np.ones(nx), np.zeros(P * R)])
    res = milp(
        c,
        constraints=LinearConstraint(A.tocsr(), np.concatenate(lo), np.concatenate(hi)),
        integrality=integrality,
        bounds=Bounds(np.zeros(nx + P * R), ub),
        options={"time_limit": time_limit_s, "disp": False},
    )
    status = {0: "optimal", 1: "time limit", 2: "infeasible", 3: "unbounded"}.get(res.status, res.message)
    if res.x is None:
        return None, status
    x_YER = res.x[:nx].reshape(Y, E, R)
    if res.status == 1 and getattr(res, "mip_gap", None) is not None:
        status = f"time limit, gap {res.mip_gap:.1%}"
    return torch.from_numpy(x_YER.argmax(-1)).to(torch.int64), status


def _greedy(
    load_YE: torch.Tensor, cooc_YEE: torch.Tensor, ep: int, L: int, cap_Y: torch.Tensor, balanced_YE: torch.Tensor
) -> tuple[torch.Tensor, list[int]]:
    """([Y, E] rank per expert, the layers that took balanced groups), by a forward pass and a local
    search; every layer within cap_Y.

    1. Layer 0 as `balanced` places it.
    2. Layer y: experts most tied to one rank of layer y-1 first, each onto the rank holding most of
       its layer-(y-1) partners among ranks with a free slot and room under the load limit. If a
       rank ends over the limit, take `balanced`'s layer y instead, its groups matched to ranks
       for most co-occurrence (Hungarian assignment).
    3. Local search: per layer, apply the best swap of two experts that keeps more co-occurrence
       with both neighbouring layers and stays under the load limit, until none helps.
    """
    from scipy.optimize import linear_sum_assignment  # NOTE: lazy, as in _solve_milp

    Y, E = load_YE.shape
    R = ep
    rank_YE = balanced_YE.clone()
    regrouped: list[int] = []
    eye_R = torch.eye(R, dtype=torch.float64)
    for y in range(1, Y):
        score_ER = cooc_YEE[y - 1].T @ eye_R[rank_YE[y - 1]]  # [E, R] co-occurrence with each rank's experts
        load, cap = load_YE[y].tolist(), float(cap_Y[y])
        order = sorted(range(E), key=lambda e: (-float(score_ER[e].max()), -load[e], e))
        rank_load, free = [0.0] * R, [L] * R
        for e in order:
            room = [r for r in range(R) if free[r] and rank_load[r] + load[e] <= cap] or [
                r for r in range(R) if free[r]
            ]
            r = max(room, key=lambda r: (float(score_ER[e, r]), -rank_load[r], -r))
            rank_YE[y, e] = r
            rank_load[r] += load[e]
            free[r] -= 1
        if max(rank_load) > cap:  # the greedy boxed itself in: balanced groups, best-matched to ranks
            group_score_RR = eye_R[balanced_YE[y]].T @ score_ER  # [balanced group, rank]
            _, rank_of_group = linear_sum_assignment(group_score_RR.numpy(), maximize=True)
            rank_YE[y] = torch.from_numpy(rank_of_group)[balanced_YE[y]]
            regrouped.append(y)

    for _ in range(3):  # sweeps of the local search
        improved = False
        for y in range(Y):
            improved |= _improve_layer(rank_YE, y, load_YE[y], cooc_YEE, float(cap_Y[y]), eye_R)
        if not improved:
            break
    return rank_YE, regrouped


def _improve_layer(
    rank_YE: torch.Tensor, y: int, load_E: torch.Tensor, cooc_YEE: torch.Tensor, cap: float, eye_R: torch.Tensor
) -> bool:
    """Swap pairs of layer-y experts in place while a swap keeps more co-occurrence; returns whether
    any did. A layer-y swap leaves the others' ranks alone, so the affinity table W stays valid."""
    Y, E = rank_YE.shape
    W_ER = torch.zeros(E, eye_R.shape[0], dtype=torch.float64)  # co-occurrence of e with rank r's neighbours
    if y > 0:
        W_ER += cooc_YEE[y - 1].T @ eye_R[rank_YE[y - 1]]
    if y < Y - 1:
        W_ER += cooc_YEE[y] @ eye_R[rank_YE[y + 1]]
    eps = 1e-9 * max(float(W_ER.sum()), 1.0)
    improved = False
    for _ in range(E):
        rank_E = rank_YE[y]
        rank_load_R = eye_R[rank_E].T @ load_E
        own_E = W_ER.gather(1, rank_E[:, None]).squeeze(1)
        cross_EE = W_ER[:, rank_E]  # [e, f]: e's affinity with f's rank
        gain_EE = cross_EE + cross_EE.T - own_E[:, None] - own_E[None, :]  # swap e <-> f
        shift_EE = load_E[None, :] - load_E[:, None]  # load e's rank gains when e leaves and f arrives
        fits_EE = (rank_load_R[rank_E][:, None] + shift_EE <= cap) & (rank_load_R[rank_E][None, :] - shift_EE <= cap)
        gain_EE = torch.where(fits_EE & (rank_E[:, None] != rank_E[None, :]), gain_EE, -torch.inf)
        best = int(gain_EE.argmax())
        e, f = divmod(best, E)
        if not gain_EE[e, f] > eps:
            break
        rank_YE[y, e], rank_YE[y, f] = rank_E[f].clone(), rank_E[e].clone()
        improved = True
    return improved
