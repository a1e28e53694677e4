"""How one dense FFN becomes one MoE layer: which hidden units each expert gets, the router's
initial rows, and the scale on the experts' down projections. Plain tensors in, plain tensors out.

Shape key: D model width, H dense hidden units, E experts, F expert hidden units, G shards per
copy of the FFN (granularity), R copies (E = R * G), N shared units, T calibration tokens,
U units split among the routed experts (H - N), K clusters (= E).

A SwiGLU FFN is a sum over its hidden units: y = sum_h w_down[:, h] * silu(x . w_gate[h]) *
(x . w_up[h]). Any partition of the units into experts therefore gives experts whose outputs add
up to the dense output exactly; what changes between methods is how many of them a token uses.
- copy: every expert holds all H units (sparse upcycling, Komatsuzaki et al.). With top-k
  weights renormalised to sum to 1 every routing gives sum_k w_k * ffn(x) = ffn(x): exact.
- granular (Megatron's granular upcycling, He et al. 2024): the units in G contiguous shards,
  R copies of each; expert r*G + g is copy r of shard g. The router's row of expert r*G + g is
  row r of a random R x D matrix (Megatron's "virtual groups"), so all G shards of copy r score
  alike and top_k = k' * G picks k' whole copies; the renormalised weight of each shard is then
  s_r / (G * sum s), and a scale of G on the down projections gives exactly ffn(x). Another
  top_k (not a multiple of G) is not exact: the scale is then fitted (see `fit_scale`).
- clusters (Read-ME-style refactorisation): units grouped by co-activation on calibration
  tokens (balanced k-means on each unit's normalised activation pattern), one group per expert;
  the router regresses the groups' centroids (their mean activation per token) on the FFN input,
  so a token starts routed to the experts that fire for it. Not exact: the experts a token does
  not use are missing from its output; the scale is fitted.
Shared experts (DeepSeekMoE) are the N units most frequently active on the calibration tokens,
taken out before the others are split (granular, clusters); they are always on, so exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from epmoe.model.experts import activation_fn


@dataclass
class DenseFFN:
    """One dense FFN's weights in epmoe's MLP layout (nn.Linear: out x in)."""

    w_gate_HD: torch.Tensor
    w_up_HD: torch.Tensor | None  # None with GELU (no up projection)
    w_down_DH: torch.Tensor
    activation: str

    @property
    def hidden(self) -> int:
        return self.w_gate_HD.shape[0]

    def activations(self, x_TD: torch.Tensor) -> torch.Tensor:
        """h_TH: each hidden unit's value before the down projection (what `w_down` weights)."""
        up_TH = x_TD @ self.w_up_HD.T if self.w_up_HD is not None else None
        return activation_fn(self.activation, x_TD @ self.w_gate_HD.T, up_TH)

    def __call__(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.activations(x_TD) @ self.w_down_DH.T

    def experts(self, idx_EF: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
        """The stacked expert weights (GroupedExperts' names) whose expert e holds units idx_EF[e],
        its down projection times `scale`."""
        out = {"w_gate_EDF": self.w_gate_HD[idx_EF].transpose(1, 2).contiguous()}  # (E, F, D) -> (E, D, F)
        if self.w_up_HD is not None:
            out["w_up_EDF"] = self.w_up_HD[idx_EF].transpose(1, 2).contiguous()
        out["w_down_EFD"] = (self.w_down_DH.T[idx_EF] * scale).contiguous()  # (E, F, D)
        return out

    def shared(self, idx_N: torch.Tensor) -> dict[str, torch.Tensor]:
        """The MLP weights (epmoe's MLP names) of one shared expert holding units idx_N."""
        out = {"w_gate.weight": self.w_gate_HD[idx_N].clone()}
        if self.w_up_HD is not None:
            out["w_up.weight"] = self.w_up_HD[idx_N].clone()
        out["w_down.weight"] = self.w_down_DH[:, idx_N].clone()
        return out


@dataclass
class LayerInit:
    """What one MoE layer starts from: the stacked expert weights, the router's rows, the shared
    expert's MLP weights (None without one), and whether it computes the dense FFN exactly."""

    experts: dict[str, torch.Tensor]
    gate_ED: torch.Tensor
    shared: dict[str, torch.Tensor] | None
    exact: bool


def frequent_units(h_TH: torch.Tensor, n: int) -> torch.Tensor:
    """The n units active on the most calibration tokens (ascending ids). A unit is active on a
    token where its magnitude exceeds that token's mean magnitude over the units."""
    a_TH = h_TH.abs()
    freq_H = (a_TH > a_TH.mean(dim=1, keepdim=True)).float().mean(dim=0)
    # stable ordering on ties: the lower unit id first
    order_H = torch.sort(-freq_H, stable=True).indices
    return order_H[:n].sort().values


def _rest(hidden: int, shared_N: torch.Tensor) -> torch.Tensor:
    """The unit ids not in shared_N, ascending (the routed experts' units, U of them)."""
    keep_H = torch.ones(hidden, dtype=torch.bool)
    keep_H[shared_N] = False
    return keep_H.nonzero().squeeze(1)


def copy_layer(
    ffn: DenseFFN, num_experts: int, gate_ED: torch.Tensor, routed_scaling: float, exact_routing: bool
) -> LayerInit:
    """Every expert the whole FFN; the router as given (random: identical experts make any
    routing exact, and different tokens reaching different experts is what lets them diverge).
    exact_routing: the router renormalises and drops nothing, so the scale 1 / routed_scaling is exact."""
    idx_EF = torch.arange(ffn.hidden).expand(num_experts, -1)
    return LayerInit(ffn.experts(idx_EF, 1.0 / routed_scaling), gate_ED, None, exact=exact_routing)


def granular_layer(
    ffn: DenseFFN, num_experts: int, granularity: int, gate_RD: torch.Tensor, shared_N: torch.Tensor,
    routed_scaling: float, exact_routing: bool,
) -> LayerInit:  # fmt: skip
    """Expert r*G + g = copy r of shard g of the routed units; the router's rows repeat each row
    of gate_RD G times (virtual groups, see the module docstring). exact_routing: the router
    renormalises, drops nothing and top_k is a multiple of G, so the scale G / routed_scaling is exact."""
    units_U = _rest(ffn.hidden, shared_N)
    G = granularity
    shards_GF = units_U.view(G, -1)
    idx_EF = shards_GF.repeat(num_experts // G, 1)  # expert e holds shard e % G
    gate_ED = gate_RD.repeat_interleave(G, dim=0)  # (R, D) -> (R*G, D): row e is gate_RD[e // G]
    shared = ffn.shared(shared_N) if len(shared_N) else None
    return LayerInit(ffn.experts(idx_EF, G / routed_scaling), gate_ED, shared, exact=exact_routing)


def balanced_assign(dist_UK: torch.Tensor, size: int) -> torch.Tensor:
    """assign_U: each unit's cluster, every cluster holding exactly `size` units (U = K * size).

    Greedy over (unit, cluster) pairs from the nearest: a pair is taken while the unit is free and
    the cluster has room. NOTE: a host loop over up to U * K pairs; it stops once every unit is placed.
    """
    U, K = dist_UK.shape
    assign = [-1] * U
    fill = [0] * K
    left = U
    for flat in dist_UK.flatten().argsort().tolist():
        u, k = divmod(flat, K)
        if assign[u] < 0 and fill[k] < size:
            assign[u], fill[k], left = k, fill[k] + 1, left - 1
            if left == 0:
                break
    return torch.tensor(assign)


def balanced_kmeans(p_UT: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """assign_U: k-means of the rows of p_UT into k clusters of equal size (Lloyd's iterations with
    `balanced_assign` as the assignment step), started from k distinct rows drawn with `seed`."""
    U = p_UT.shape[0]
    size = U // k
    g = torch.Generator().manual_seed(seed)
    cent_KT = p_UT[torch.randperm(U, generator=g)[:k]].clone()
    assign_U = torch.full((U,), -1)
    for _ in range(iters):
        new_U = balanced_assign(torch.cdist(p_UT, cent_KT), size)
        if torch.equal(new_U, assign_U):
            break
        assign_U = new_U
        cent_KT = torch.stack([p_UT[assign_U == c].mean(dim=0) for c in range(k)])
    return assign_U


def router_from_centroids(x_TD: torch.Tensor, fire_TE: torch.Tensor, logit_std: float = 1.0) -> torch.Tensor:
    """gate_ED: the ridge regression of each cluster's centroid (fire_TE[:, e], its units' mean
    magnitude on each calibration token) on the FFN input, scaled so that the logits' spread over
    the experts of a token is `logit_std` on average: softmax weights neither one-hot nor uniform."""
    D = x_TD.shape[1]
    xx_DD = x_TD.T @ x_TD
    ridge = 1e-3 * xx_DD.diagonal().mean().clamp_min(1e-12)  # relative, so any input scale works
    w_DE = torch.linalg.solve(xx_DD + ridge * torch.eye(D, dtype=x_TD.dtype), x_TD.T @ fire_TE)
    spread = (x_TD @ w_DE).std(dim=1).mean().clamp_min(1e-12)
    return (w_DE * (logit_std / spread)).T.contiguous()


def cluster_layer(
    ffn: DenseFFN, x_TD: torch.Tensor, num_experts: int, shared_N: torch.Tensor, iters: int, seed: int
) -> tuple[LayerInit, torch.Tensor]:
    """Read-ME-style experts from calibration inputs x_TD of this FFN: balanced k-means of the
    routed units' activation patterns, one cluster per expert, the router regressed on the
    clusters' centroids (see the module docstring). Returns the layer (its scale 1: the caller
    fits it) and fire_TE, each expert's mean unit magnitude on each calibration token."""
    units_U = _rest(ffn.hidden, shared_N)
    a_TU = ffn.activations(x_TD)[:, units_U].abs()
    # co-activation, not magnitude: a unit's pattern over the tokens, normalised
    p_UT = F.normalize(a_TU.T, dim=1)
    assign_U = balanced_kmeans(p_UT, num_experts, iters, seed)
    idx_EF = torch.stack([units_U[assign_U == e] for e in range(num_experts)])
    members_EF = torch.stack([(assign_U == e).nonzero().squeeze(1) for e in range(num_experts)])
    fire_TE = a_TU[:, members_EF].mean(dim=2)  # (T, E, F) -> (T, E)
    gate_ED = router_from_centroids(x_TD, fire_TE)
    shared = ffn.shared(shared_N) if len(shared_N) else None
    return LayerInit(ffn.experts(idx_EF, 1.0), gate_ED, shared, exact=False), fire_TE
