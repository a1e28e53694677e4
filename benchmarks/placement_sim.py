"""Placement simulator: replay a routing trace from an epmoe training run on a modelled GPU cluster
and report, for every policy in `epmoe.placement.policies.PLACEMENTS`, the load of the busiest rank,
the bytes that cross nodes and the modelled all-to-all time per training step, at EP 8 ... 256.

    .venv/bin/python benchmarks/placement_sim.py --trace outputs/trace_256e_400/routing_trace.pt \
        [outputs/trace_256e_400_noaux/routing_trace.pt] --from-step 200 [--ep 8 16 32 64 128 256] \
        [--out benchmarks/results/placement_sim.md] [--plot benchmarks/results/placement_sim.png]

The trace (recipe; 15-20 minutes on 2 shared CPU cores): a 6-layer byte-level LM on the Python
standard library, first layer dense, then 5 MoE layers of 256 experts (hidden 32) and one shared
expert, softmax top-8 with the batch aux loss 0.01 (the default `router=topk`), 400 steps of
32 sequences x 32 bytes; every 2nd step keeps the routers' choices of all 1024 tokens of the
micro-batch (200 samples, 16 MB):

    .venv/bin/python -m epmoe.train model.num_experts=256 router.top_k=8 model.expert_hidden=32 \
        model.d_model=128 model.n_heads=4 model.n_layers=6 model.first_dense_layers=1 \
        model.moe_every=1 model.expert_impl=grouped train.steps=400 train.batch_size=32 \
        data.seq_len=32 train.precision=fp32 train.eval_every=0 train.eval_batches=1 \
        train.sample_bytes=0 train.log_every=20 logger.plots=false logger.progress=false \
        logger.routing_trace_every=2 logger.routing_trace_tokens=1024 hydra.run.dir=outputs/trace_256e_400

A second trace, the same run with `router.aux_loss=none` (and hydra.run.dir=outputs/trace_256e_400_noaux):
without the balance loss the routers collapse onto ~15 of 256 experts per layer, 8 of them chosen by
nearly every token, a skew that persists from step to step (the opposite extreme).

Why this shape: a trace sample holds one micro-batch (1024 tokens here), far fewer than an EP-256
step sees, so samples are pooled (item 2 below), and many short sequences per batch make a sample
less dominated by a few source files. Routing settles late: in the first ~100 steps the router
collapses onto few experts and the aux loss moves the hot spots around from step to step, which no
placement fitted on earlier steps can follow; `--from-step` drops that phase. Even later the hot
experts drift (with the aux loss, tokens per expert of steps 200-298 and 300-400 correlate at 0.38).

Fit and evaluation. The samples kept (training steps from `--from-step` on) split in time: the
load-following policies (`balanced`, `redundant`, `affinity`) are fitted on `RoutingStats.from_topk`
of the first half (`--fit-fraction`) and every policy is evaluated on the second half, pooled into
one stream of tokens, as a placement computed from recent statistics then serves the steps that
follow. `redundant` gets `--spare-slots` (1) extra slots per rank; `affinity` runs with its defaults
and its solver path (HiGHS or greedy) is printed from `Placement.origin`. Extra rows, not policies:
`(oracle)` fits a policy on the evaluation half itself (perfect statistics; the gap to the plain row
is drift between the halves); `redundant/even` replays redundant's map with replicas split evenly
(no locality, item 3); `affinity/node` runs `affinity` with nodes in place of ranks, then `balanced`
within each node (`node_affinity_placement`), the objective that inter-node bytes reward. The
"fit half" column is the load ratio on the statistics the policy was fitted on, as it planned it.

The cluster model (every assumption; change the numbers with the flags):

1. Ranks and links. EP ranks, `--gpus-per-node` G (8) per node, rank r on node r // G. Within a node
   NVLink at `--nvlink-gbps` (450 GB/s per GPU per direction, H100 NVLink 4); across nodes one NIC
   per GPU at `--ib-gbps` (50 GB/s = 400 Gb/s InfiniBand per direction; rail-optimised fabric, no
   congestion, no forwarding through NVLink to another GPU's NIC). Sending and receiving run at full
   speed at once, as do NVLink and IB.
2. Tokens. Token t of the pooled evaluation stream lives on rank t mod EP (its home), so every rank
   holds the same number of tokens and sees the same routing mix. The trace's counts are scaled to
   `--tokens-per-rank` (4096) tokens per rank per step; each token-choice (one of the top-k) that
   moves is one row of `--hidden` (4096) elements of `--bytes` (2, bf16) in each direction. Rows
   are not deduplicated: a token with two choices on one remote rank sends two rows, as epmoe's
   all-to-all dispatcher does (DeepEP-style per-node deduplication would send fewer).
3. Replicas (`redundant`). A token's choice of a replicated expert goes to the replica on its home
   rank, else to the replicas on its home node, else to all replicas, taken in turn (round robin
   over the tokens of each (home rank, expert)), so the split is as even as the counts allow. The
   load each replica receives follows from this rule, not from the even split the policy planned.
4. Token paths, two models:
   - return: home -> expert rank of layer y (dispatch) -> home (combine), for every MoE layer;
     attention and dense layers run at home. This is epmoe's (and every EP trainer's) path. With
     each expert in one slot, which rank holds an expert cannot change how many rows cross nodes in
     expectation (homes are uniform), only how they spread over ranks.
   - forward (MoETuner's setting): home -> layer 0's experts, then each layer-(y+1) choice is sent
     straight from the rank of the layer-y expert it comes from -> ... -> last layer -> home. With
     top-k each of the token's k next-layer copies comes from one of its k current copies, each
     equally likely: every (i in layer y, j in layer y+1) pair of the co-occurrence carries 1/k of a
     row. It ignores that attention between the layers needs the whole sequence (MoETuner serves
     inference and pins attention); it is the path where cross-layer placement matters, and the one
     `affinity` targets: it maximises the co-occurrence kept on one rank.
   Both models put a token's replica choice where the return model does (rule 3), so their loads
   agree; the table's load column is theirs.
5. Time. Each exchange (a layer's dispatch, its combine, a forward hop) is a synchronous all-to-all;
   its time is the slowest rank's max over (link, direction) of bytes / bandwidth + messages *
   latency, where messages are the peers that rank sends to (receives from) over that link (a pair
   counts if the trace has any row between them) and latency is `--nvlink-latency-us` (1 us) or
   `--ib-latency-us` (2 us), i.e. messages to different peers are issued one after another. A step
   is the forward pass's exchanges plus the backward's, which are the same exchanges transposed
   (same bytes, same time): bytes and time per step are twice the forward pass's. Expert compute,
   overlap of compute with communication, and the launch cost of a collective are left out.
6. Load. A rank's load in a layer is the rows it computes (its experts' token-choices, local ones
   included). Every MoE layer waits for its busiest rank, so "load max/mean" is sum over layers of
   the max rank load / sum of the mean rank load (`Placement.imbalance`'s aggregate), 1.00 perfect.
   The pooled evaluation stream is finite, so even a perfectly uniform router shows max/mean > 1:
   the "noise floor" line gives that ratio for a uniform random top-k router over the same number of
   tokens under `contiguous`.

Shape key:
  Y  MoE layers
  T  tokens of the pooled stream
  K  experts chosen per token (top-k)
  E  experts
  R  ranks in the EP group (ep)
  M  most replicas any expert has in a layer
  C  token-choices (T * K) or choice pairs (T * K * K)
  N  trace samples (training steps)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from epmoe.placement.load_policies import pack_balanced
from epmoe.placement.placement import Placement, RoutingStats
from epmoe.placement.policies import PLACEMENTS
from epmoe.train.routing_stats import load_trace

TARGET_LOAD, TARGET_CUT = 1.10, 0.20


@dataclass(frozen=True)
class Cluster:
    """The modelled machine and the model's token size (see the module docstring, items 1, 2, 5)."""

    gpus_per_node: int = 8
    nvlink_gbps: float = 450.0  # GB/s per GPU per direction
    ib_gbps: float = 50.0  # GB/s per GPU NIC per direction
    nvlink_latency_us: float = 1.0  # per message
    ib_latency_us: float = 2.0  # per message
    hidden: int = 4096
    bytes_per_elem: int = 2

    @property
    def row_bytes(self) -> int:
        return self.hidden * self.bytes_per_elem


@dataclass
class PathCost:
    """One token-path model's cost per training step (forward + backward)."""

    inter_bytes: float  # bytes that cross nodes, summed over ranks
    intra_bytes: float  # bytes that move between GPUs of one node
    seconds: float  # modelled all-to-all time, summed over the step's exchanges
    kept_local: float  # fraction of rows that stay on their rank


@dataclass
class SimResult:
    load_ratio: float  # sum_y max_r load / sum_y mean_r load
    load_YR: torch.Tensor  # [Y, R] rows each rank computes per layer (trace scale)
    ret: PathCost  # the return path: home -> expert -> home
    fwd: PathCost  # MoETuner's path: home -> layer 0 -> layer 1 -> ... -> home


def replica_ranks_EM(placement: Placement, layer: int) -> torch.Tensor:
    """[E, M] the ranks holding each expert's replicas in `layer`, padded with -1."""
    slots_EM = placement.replica_slots_EM(layer)
    return torch.where(slots_EM >= 0, slots_EM // placement.slots_per_rank, -1)


def destination_ranks(
    home_T: torch.Tensor, expert_TK: torch.Tensor, rank_EM: torch.Tensor, gpus_per_node: int, local: bool = True
) -> torch.Tensor:
    """[T, K] the rank that computes each token-choice: the replica on the token's home rank, else
    those on its home node, else all replicas (local=False: always all replicas); several candidates
    are taken in turn by the tokens of each (home, expert), in token order, home h starting at its
    (h mod n)-th candidate so that the remainders spread too (docstring, item 3)."""
    T, K = expert_TK.shape
    E = rank_EM.shape[0]
    expert_C = expert_TK.reshape(-1)  # [T, K] -> [C], token-major
    home_C = home_T.repeat_interleave(K)
    cand_CM = rank_EM[expert_C]
    valid_CM = cand_CM >= 0
    same_rank_CM = valid_CM & (cand_CM == home_C[:, None])
    same_node_CM = valid_CM & (cand_CM // gpus_per_node == (home_C // gpus_per_node)[:, None])
    use_CM = torch.where(
        same_rank_CM.any(1, keepdim=True) & local,
        same_rank_CM,
        torch.where(same_node_CM.any(1, keepdim=True) & local, same_node_CM, valid_CM),
    )
    # turn of each choice among the earlier choices of the same (home, expert): stable sort by key
    key_C = home_C * E + expert_C
    order_C = torch.argsort(key_C, stable=True)
    key_sorted_C = key_C[order_C]
    idx_C = torch.arange(len(key_C))
    starts_C = torch.ones_like(key_sorted_C, dtype=torch.bool)
    starts_C[1:] = key_sorted_C[1:] != key_sorted_C[:-1]
    group_start_C = torch.cummax(torch.where(starts_C, idx_C, 0), 0).values
    turn_C = torch.empty_like(idx_C)
    turn_C[order_C] = idx_C - group_start_C
    pick_C = (turn_C + home_C) % use_CM.sum(1)  # which usable candidate; each home starts at its own
    col_C = ((use_CM.cumsum(1) == (pick_C + 1)[:, None]) & use_CM).int().argmax(1)
    return cand_CM.gather(1, col_C[:, None]).view(T, K)


def flow_RR(src_C: torch.Tensor, dst_C: torch.Tensor, R: int, weight: float = 1.0) -> torch.Tensor:
    """[R, R] float64 rows sent from rank a (row) to rank b (column); the diagonal stays local."""
    w_C = torch.full(src_C.shape, weight, dtype=torch.float64)
    return torch.bincount(src_C * R + dst_C, weights=w_C, minlength=R * R).view(R, R)


def exchange_cost(rows_RR: torch.Tensor, cluster: Cluster, scale: float) -> tuple[float, float, float]:
    """(inter-node bytes, intra-node bytes, seconds) of one all-to-all whose trace rows are `rows_RR`
    [R, R], each standing for `scale` rows of `cluster.row_bytes` (docstring, item 5)."""
    R = rows_RR.shape[0]
    node_R = torch.arange(R) // cluster.gpus_per_node
    same_node_RR = node_R[:, None] == node_R[None, :]
    off_diag_RR = ~torch.eye(R, dtype=torch.bool)
    bytes_RR = rows_RR * (scale * cluster.row_bytes)
    slowest = 0.0
    for link_RR, gbps, latency_us in (
        (same_node_RR & off_diag_RR, cluster.nvlink_gbps, cluster.nvlink_latency_us),
        (~same_node_RR, cluster.ib_gbps, cluster.ib_latency_us),
    ):
        on_link_RR = torch.where(link_RR, bytes_RR, 0.0)
        msgs_RR = (link_RR & (rows_RR > 0)).double()
        for dim in (1, 0):  # 1: what each rank sends, 0: what it receives
            t_R = on_link_RR.sum(dim) / (gbps * 1e9) + msgs_RR.sum(dim) * latency_us * 1e-6
            slowest = max(slowest, float(t_R.max()))
    inter = float(torch.where(~same_node_RR, bytes_RR, 0.0).sum())
    intra = float(torch.where(same_node_RR & off_diag_RR, bytes_RR, 0.0).sum())
    return inter, intra, slowest


def path_cost(exchanges: list[torch.Tensor], cluster: Cluster, scale: float) -> PathCost:
    """The cost of one forward pass's exchanges [R, R] each, doubled for the backward (item 5)."""
    inter = intra = seconds = local = total = 0.0
    for rows_RR in exchanges:
        i, a, s = exchange_cost(rows_RR, cluster, scale)
        inter, intra, seconds = inter + i, intra + a, seconds + s
        local, total = local + float(rows_RR.diagonal().sum()), total + float(rows_RR.sum())
    return PathCost(2 * inter, 2 * intra, 2 * seconds, local / total if total else 1.0)


def simulate(
    topk_idx_YTK: torch.Tensor,
    placement: Placement,
    cluster: Cluster,
    tokens_per_rank: float | None = None,
    local_replicas: bool = True,
) -> SimResult:
    """Replay `topk_idx_YTK` [Y, T, K] (the same T tokens through every MoE layer) on `placement`.

    tokens_per_rank: the modelled tokens per rank per step; the trace's rows are scaled by
        tokens_per_rank * R / T. None: no scaling, each trace token is one token.
    local_replicas: a replicated expert's choice prefers the replica on the home rank, then node
        (item 3); False: every replica in turn, the even split `redundant` plans with.
    """
    Y, T, K = topk_idx_YTK.shape
    R = placement.ep
    if placement.num_layers != Y:
        raise ValueError(f"placement has {placement.num_layers} layers, the trace {Y} MoE layers")
    scale = 1.0 if tokens_per_rank is None else tokens_per_rank * R / T
    home_T = torch.arange(T) % R
    home_C = home_T.repeat_interleave(K)
    dest_YTK = torch.stack(
        [
            destination_ranks(
                home_T, topk_idx_YTK[y].long(), replica_ranks_EM(placement, y), cluster.gpus_per_node, local_replicas
            )
            for y in range(Y)
        ]
    )
    dispatch = [flow_RR(home_C, dest_YTK[y].reshape(-1), R) for y in range(Y)]
    load_YR = torch.stack([rows_RR.sum(0) for rows_RR in dispatch])
    ret = path_cost([x for rows_RR in dispatch for x in (rows_RR, rows_RR.T)], cluster, scale)

    hops = []
    for y in range(Y - 1):  # every (copy i in layer y, copy j in layer y+1) pair carries 1/K row
        src_C = dest_YTK[y][:, :, None].expand(T, K, K).reshape(-1)  # [T, K_i, K_j] -> [C]
        dst_C = dest_YTK[y + 1][:, None, :].expand(T, K, K).reshape(-1)
        hops.append(flow_RR(src_C, dst_C, R, 1.0 / K))
    fwd = path_cost([dispatch[0], *hops, dispatch[-1].T], cluster, scale)

    load_ratio = float(load_YR.max(1).values.sum() / load_YR.mean(1).sum())
    return SimResult(load_ratio, load_YR, ret, fwd)


def pooled(topk_idx_NYTK: torch.Tensor) -> torch.Tensor:
    """[N, Y, T, K] samples -> [Y, N * T, K]: one stream of tokens, each keeping its path through the layers."""
    N, Y, T, K = topk_idx_NYTK.shape
    return topk_idx_NYTK.long().permute(1, 0, 2, 3).reshape(Y, N * T, K)


def noise_floor(num_experts: int, top_k: int, ep: int, num_layers: int, tokens: int, cluster: Cluster) -> float:
    """Load max/mean of a uniform random top-k router over `tokens` tokens under `contiguous`."""
    gen = torch.Generator().manual_seed(0)
    topk_YTK = torch.rand(num_layers, tokens, num_experts, generator=gen).topk(top_k, dim=-1).indices
    placement = PLACEMENTS["contiguous"](num_experts, ep, num_experts // ep, None, num_layers)
    return simulate(topk_YTK, placement, cluster).load_ratio


def node_affinity_placement(
    num_experts: int, ep: int, gpus_per_node: int, stats: RoutingStats, num_layers: int
) -> Placement:
    """Not a PLACEMENTS policy, a composition for comparison: `affinity` with nodes in place of ranks
    (co-occurrence kept on one node, each node's token load within affinity's tolerance), then
    `pack_balanced` spreads each node's experts over its GPUs, layer by layer."""
    nodes = ep // gpus_per_node
    per_node = num_experts // nodes
    by_node = PLACEMENTS["affinity"](num_experts, nodes, per_node, stats, num_layers)
    rank_YE = torch.empty(num_layers, num_experts, dtype=torch.int64)
    for y in range(num_layers):
        for n in range(nodes):
            experts_L = by_node.experts_on_rank(y, n)
            local_L = pack_balanced(stats.load_YE[y, experts_L], gpus_per_node, per_node // gpus_per_node)
            rank_YE[y, experts_L] = n * gpus_per_node + local_L
    expert_YE = torch.arange(num_experts).repeat(num_layers, 1)
    return Placement.from_ranks(rank_YE, expert_YE, ep, num_experts, origin=f"node {by_node.origin}")


@dataclass
class Row:
    ep: int
    nodes: int
    policy: str  # a PLACEMENTS name, or "redundant/even": its map with replicas split evenly
    fit_load: float  # load max/mean of the map on the fitting half, as the policy planned it
    sim: SimResult
    fit_s: float
    origin: str


def load_correlation(a: RoutingStats, b: RoutingStats) -> float:
    """Mean over layers of the Pearson correlation of tokens per expert in `a` and `b`: how well one
    window's load predicts another's (1: the same hot experts)."""
    pairs_Y2E = torch.stack([a.load_YE.double(), b.load_YE.double()], 1)  # [Y, 2, E]
    return float(torch.stack([torch.corrcoef(p_2E)[0, 1] for p_2E in pairs_Y2E]).mean())


def run(args: argparse.Namespace, trace_path: Path) -> tuple[list[Row], dict]:
    """Every (EP, policy) of `args` on one trace; returns the rows and facts for the report."""
    trace = load_trace(trace_path)
    keep_N = trace["steps"] >= args.from_step
    topk_NYTK = trace["topk_idx_NYTK"][keep_N]
    steps = trace["steps"][keep_N].tolist()
    N, Y, T, K = topk_NYTK.shape
    if N < 2:
        raise SystemExit(f"{trace_path} has {N} samples from step {args.from_step}; need 2 (lower --from-step)")
    E = int(trace["num_experts"])
    n_fit = max(1, min(N - 1, round(N * args.fit_fraction)))
    fit_YTK, eval_YTK = pooled(topk_NYTK[:n_fit]), pooled(topk_NYTK[n_fit:])
    fits = {"": RoutingStats.from_topk(fit_YTK, E)}
    if args.oracle:
        fits[" (oracle)"] = RoutingStats.from_topk(eval_YTK, E)  # foresight: fitted on what it is scored on
    cluster = Cluster(
        args.gpus_per_node, args.nvlink_gbps, args.ib_gbps, args.nvlink_latency_us, args.ib_latency_us,
        args.hidden, args.bytes,
    )  # fmt: skip
    info = {
        "samples": N, "all_samples": len(trace["steps"]), "layers": Y, "tokens": T, "top_k": K, "experts": E,
        "fit_steps": steps[:n_fit], "eval_steps": steps[n_fit:], "eval_tokens": eval_YTK.shape[1],
        "cluster": cluster, "floors": {}, "load_corr": load_correlation(*fits.values()) if args.oracle else None,
    }  # fmt: skip
    rows = []
    for ep in args.ep:
        if ep > E or E % ep:
            print(f"skipping ep {ep}: it must divide num_experts ({E})")
            continue
        nodes = -(-ep // cluster.gpus_per_node)
        info["floors"][ep] = noise_floor(E, K, ep, Y, eval_YTK.shape[1], cluster)
        for suffix, stats in fits.items():
            for name in args.policies:
                if suffix and name in ("contiguous", "round_robin"):
                    continue  # they read no stats
                slots = E // ep + (args.spare_slots if name == "redundant" else 0)
                t0 = time.perf_counter()
                placement = PLACEMENTS[name](E, ep, slots, stats, Y)
                fit_s = time.perf_counter() - t0
                fit_load = placement.imbalance(stats.load_YE)
                variants = [(name, True)] + ([("redundant/even", False)] if name == "redundant" else [])
                for label, local in variants:
                    sim = simulate(eval_YTK, placement, cluster, args.tokens_per_rank, local_replicas=local)
                    rows.append(Row(ep, nodes, label + suffix, fit_load, sim, fit_s, placement.origin))
                    print(
                        f"ep {ep:>3} {label + suffix:<25} load {sim.load_ratio:.3f} (fit {fit_load:.3f}), {fit_s:.1f} s"
                    )
            if args.node_affinity and nodes > 1 and "affinity" in args.policies:
                t0 = time.perf_counter()
                placement = node_affinity_placement(E, ep, cluster.gpus_per_node, stats, Y)
                fit_s, fit_load = time.perf_counter() - t0, placement.imbalance(stats.load_YE)
                sim = simulate(eval_YTK, placement, cluster, args.tokens_per_rank)
                label = "affinity/node" + suffix
                rows.append(Row(ep, nodes, label, fit_load, sim, fit_s, placement.origin))
                print(f"ep {ep:>3} {label:<25} load {sim.load_ratio:.3f} (fit {fit_load:.3f}), {fit_s:.1f} s")
    return rows, info


def _cut(row: Row, base: Row | None, path: str) -> float:
    """Share of inter-node bytes `row` saves against `base` on `path` ("ret" or "fwd")."""
    if base is None or getattr(base.sim, path).inter_bytes == 0:
        return float("nan")
    return 1 - getattr(row.sim, path).inter_bytes / getattr(base.sim, path).inter_bytes


def table(rows: list[Row]) -> list[str]:
    """Markdown table; "cut" is the inter-node bytes saved against `contiguous` at the same EP."""
    base = {r.ep: r for r in rows if r.policy == "contiguous"}
    lines = [
        "| EP | nodes | policy | load max/mean | (fit half) | return: inter-node GB | cut | intra GB | a2a ms "
        "| forward: inter-node GB | cut | intra GB | a2a ms | rows kept on rank |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ret, fwd = r.sim.ret, r.sim.fwd
        cut_ret, cut_fwd = (_cut(r, base.get(r.ep), p) for p in ("ret", "fwd"))
        lines.append(
            f"| {r.ep} | {r.nodes} | {r.policy} | {r.sim.load_ratio:.3f} | {r.fit_load:.3f} "
            f"| {ret.inter_bytes / 1e9:.1f} | {_pct(cut_ret)} | {ret.intra_bytes / 1e9:.1f} | {ret.seconds * 1e3:.1f} "
            f"| {fwd.inter_bytes / 1e9:.1f} | {_pct(cut_fwd)} | {fwd.intra_bytes / 1e9:.1f} | {fwd.seconds * 1e3:.1f} "
            f"| {fwd.kept_local:.3f} |"
        )
    return lines


def _pct(x: float) -> str:
    return "-" if x != x else f"{x:+.0%}"  # x != x: nan, one node


def verdicts(rows: list[Row], floors: dict[int, float]) -> list[str]:
    """The issue's targets, EP by EP, as computed from the rows; oracle values in brackets. "No worse
    balance" allows the noise floor's excess (floors[ep] - 1): smaller differences are sampling noise."""
    by = {(r.ep, r.policy): r for r in rows}
    lines = []
    for ep in dict.fromkeys(r.ep for r in rows):
        c = by.get((ep, "contiguous"))
        if c is None:
            continue
        parts = []
        for name in ("balanced", "redundant", "redundant/even"):
            if (r := by.get((ep, name))) is not None:
                ok = r.sim.load_ratio <= TARGET_LOAD < c.sim.load_ratio
                o = by.get((ep, name + " (oracle)"))
                parts.append(
                    f"{name} {r.sim.load_ratio:.3f} ({'met' if ok else 'missed'}"
                    + (f"; oracle {o.sim.load_ratio:.3f})" if o else ")")
                )
        line = f"- EP {ep}: load max/mean contiguous {c.sim.load_ratio:.3f}" + (
            f"; {', '.join(parts)}" if parts else ""
        )
        for name in ("affinity", "affinity/node"):
            if (a := by.get((ep, name))) is None or c.nodes == 1:
                continue
            cut = _cut(a, c, "fwd")
            ok = cut >= TARGET_CUT and a.sim.load_ratio <= c.sim.load_ratio + floors.get(ep, 1.0) - 1
            o = by.get((ep, name + " (oracle)"))
            line += (
                f"; {name} cuts inter-node bytes by {_pct(cut)} on the forward path ({'met' if ok else 'missed'}"
                + (f"; oracle {_pct(_cut(o, c, 'fwd'))} at load {o.sim.load_ratio:.3f}" if o else "")
                + f"), {_pct(_cut(a, c, 'ret'))} on the return path, at load {a.sim.load_ratio:.3f}"
            )
        lines.append(line)
    return lines


NOTES_MARK = "<!-- notes below this line are kept when the script rewrites the file -->"


def report(args: argparse.Namespace, results: list[tuple[Path, list[Row], dict]]) -> str:
    """The markdown report: the setting once, then per trace its table, noise floor, targets and
    affinity's solver paths."""
    c = results[0][2]["cluster"]
    cmd = " ".join(["benchmarks/placement_sim.py", *args.argv])
    lines = [
        "# Placement simulator",
        "",
        f"`.venv/bin/python {cmd}`",
        "",
        "The model, every assumption and the traces' recipe: the docstring of `benchmarks/placement_sim.py`.",
        "",
        f"- Cluster: {c.gpus_per_node} GPUs per node, NVLink {c.nvlink_gbps:g} GB/s and IB {c.ib_gbps:g} GB/s per "
        f"GPU per direction, {c.nvlink_latency_us:g} / {c.ib_latency_us:g} us per message; rows of "
        f"{c.hidden} x {c.bytes_per_elem} bytes, {args.tokens_per_rank:g} tokens per rank per step (so a step "
        f"grows with EP); `redundant` with {args.spare_slots} spare slot(s) per rank.",
        "- Bytes and times are per training step (forward + backward), summed over ranks (bytes) or "
        "over the step's exchanges (time, each the slowest rank's). `return`: home -> expert -> home every layer "
        "(how epmoe runs); `forward`: MoETuner's path, the token goes from layer y's expert rank straight to "
        "layer y+1's. `cut`: inter-node bytes saved against `contiguous` at the same EP.",
        "- Extra rows: `(oracle)` fits the policy on the evaluation steps themselves (perfect statistics); "
        "`redundant/even` replays redundant's map with each replicated expert's tokens split evenly over all its "
        "replicas (no locality); `affinity/node` is `affinity` over nodes, then `balanced` within each node.",
        "",
        f"Targets: `balanced` / `redundant` load max/mean <= {TARGET_LOAD:.2f} where `contiguous` is worse; "
        f"`affinity` >= {TARGET_CUT:.0%} fewer inter-node bytes than `contiguous` at no worse balance (load "
        "max/mean at most contiguous's plus the noise floor's excess).",
    ]
    for trace_path, rows, info in results:
        fit, ev = info["fit_steps"], info["eval_steps"]
        origins = {r.ep: r.origin for r in rows if r.policy == "affinity"}
        corr = info["load_corr"]
        lines += [
            "",
            f"## Trace `{trace_path}`",
            "",
            f"{info['all_samples']} samples of {info['tokens']} tokens x {info['layers']} MoE layers, "
            f"{info['experts']} experts, top-{info['top_k']}; used the {info['samples']} from step {fit[0]} on. "
            f"Policies fitted on steps {fit[0]}-{fit[-1]}, evaluated on steps {ev[0]}-{ev[-1]} "
            f"({info['eval_tokens']} tokens pooled; token t at home rank t mod EP)."
            + (
                f" Tokens per expert of the two halves correlate at {corr:.2f} (mean over layers)."
                if corr is not None
                else ""
            ),
            "",
            *table(rows),
            "",
            "Noise floor (load max/mean of a uniform random router over the same tokens, `contiguous`): "
            + ", ".join(f"EP {ep} {f:.3f}" for ep, f in info["floors"].items())
            + ".",
            "",
            "Targets, EP by EP:",
            "",
            *verdicts(rows, info["floors"]),
            "",
            "Affinity's solver path (`Placement.origin`):",
            "",
            *[f"- EP {ep}: {o}" for ep, o in origins.items()],
        ]
    return "\n".join([*lines, "", NOTES_MARK]) + "\n"


def write_report(path: Path, text: str) -> None:
    """Write `text`, keeping whatever followed NOTES_MARK in the file it replaces."""
    notes = ""
    if path.exists() and NOTES_MARK in (old := path.read_text()):
        notes = old.split(NOTES_MARK, 1)[1].lstrip("\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + ("\n" + notes if notes else ""))


def plot(path: Path, results: list[tuple[Path, list[Row], dict]]) -> None:
    """Per trace, load max/mean and forward-path inter-node bytes against EP, one line per policy."""
    import matplotlib  # NOTE: here, not at the top: only --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4.2 * len(results)), squeeze=False)
    for (trace_path, rows, _), (ax_load, ax_bytes) in zip(results, axes, strict=True):
        base = {r.ep: r for r in rows if r.policy == "contiguous"}
        for policy in dict.fromkeys(r.policy for r in rows):
            if "oracle" in policy or policy == "redundant/even":
                continue
            mine = [r for r in rows if r.policy == policy]
            eps = [r.ep for r in mine]
            ax_load.plot(eps, [r.sim.load_ratio for r in mine], marker="o", label=policy)
            eps_cut = [r.ep for r in mine if r.nodes > 1]
            ax_bytes.plot(eps_cut, [1 - _cut(r, base.get(r.ep), "fwd") for r in mine if r.nodes > 1], marker="o")
        ax_load.axhline(TARGET_LOAD, color="grey", linestyle=":", label=f"target {TARGET_LOAD}")
        ax_load.set(
            xscale="log", yscale="log", xlabel="EP", ylabel="load max/mean (busiest rank)", title=trace_path.parent.name
        )
        ax_bytes.axhline(1 - TARGET_CUT, color="grey", linestyle=":")
        ax_bytes.set(xscale="log", xlabel="EP", ylabel="inter-node bytes / contiguous's (forward path)")
        for ax in (ax_load, ax_bytes):
            ticks = sorted({r.ep for r in rows})
            ax.set_xticks(ticks, [str(e) for e in ticks])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
        top = max(r.sim.load_ratio for r in rows)
        yticks = [t for t in (1, 1.1, 1.25, 1.5, 2, 3, 5, 10, 20, 30, 50) if t <= top * 1.05]
        ax_load.set_yticks(yticks, [f"{t:g}" for t in yticks])
        ax_load.minorticks_off()
        ax_load.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, nargs="+", required=True, help="routing_trace.pt of epmoe runs")
    parser.add_argument("--ep", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    parser.add_argument("--policies", nargs="+", default=list(PLACEMENTS), choices=list(PLACEMENTS))
    parser.add_argument(
        "--no-node-affinity", dest="node_affinity", action="store_false", help="skip the affinity/node rows"
    )
    parser.add_argument("--from-step", type=int, default=0, help="use only the trace's samples from this step on")
    parser.add_argument("--fit-fraction", type=float, default=0.5, help="leading share of samples to fit on")
    parser.add_argument(
        "--no-oracle", dest="oracle", action="store_false", help="skip the policies fitted on the evaluation half"
    )
    parser.add_argument("--spare-slots", type=int, default=1, help="extra slots per rank for 'redundant'")
    parser.add_argument("--tokens-per-rank", type=float, default=4096)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--bytes", type=int, default=2, help="bytes per element of a row (2: bf16)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nvlink-gbps", type=float, default=450.0)
    parser.add_argument("--ib-gbps", type=float, default=50.0)
    parser.add_argument("--nvlink-latency-us", type=float, default=1.0)
    parser.add_argument("--ib-latency-us", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of load and bytes against EP")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    results = []
    for trace_path in args.trace:
        print(f"trace {trace_path}")
        rows, info = run(args, trace_path)
        print("\n".join(["", *table(rows), "", *verdicts(rows, info["floors"])]))
        for ep, origin in {r.ep: r.origin for r in rows if r.policy == "affinity"}.items():
            print(f"affinity at EP {ep}: {origin}")
        results.append((trace_path, rows, info))
    if args.out is not None:
        write_report(args.out, report(args, results))
    if args.plot is not None:
        plot(args.plot, results)


if __name__ == "__main__":
    main()
