"""The placement simulator's cost model: what a placement costs on a modelled GPU cluster when a
routing trace is replayed on it. benchmarks/placement_sim.py feeds it traces and placements and
writes the report; its flags set the numbers below.

The cluster model (every assumption):

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epmoe.placement.placement import Placement


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
