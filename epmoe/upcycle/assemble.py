"""Dense model in, native MoE model out: read the source, collect calibration inputs, build every
MoE layer with methods.py, copy everything else, fit the scales of the layers that are not exact,
and measure how far the result is from the dense model.

Shape key: B sequences, S sequence length, T tokens (B * S), D model width, V vocabulary,
E experts, K top-k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from epmoe.config import Config
from epmoe.hf.convert import from_pretrained
from epmoe.model.init import load_assigned
from epmoe.model.moe import MoE
from epmoe.model.transformer import Transformer, is_moe_layer
from epmoe.train.checkpoint_model import load_model
from epmoe.train.data import TokenSplits, sample_batch
from epmoe.upcycle import methods
from epmoe.upcycle.options import UpcycleError, UpcycleOptions

CALIB_STREAM, EVAL_STREAM = -1, -2  # sample_batch streams apart from training's micro-steps and validation's


def load_dense(path: Path) -> tuple[Config, Transformer]:
    """The dense source: a Hugging Face folder (config.json) or an epmoe checkpoint / run directory.
    Raises UpcycleError for a missing path or a model that already has experts; the readers'
    own errors (HFError, CheckpointError) for a folder they cannot read."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UpcycleError(f"dense source {path} does not exist; give a Hugging Face folder (config.json + "
                           "safetensors) or an epmoe checkpoint or run directory")  # fmt: skip
    if (path / "config.json").is_file():
        cfg, model = from_pretrained(path)
        cfg.train.init_from = str(path)  # as `python -m epmoe.hf import`: its tokenizer stays the data's default
    else:
        loaded = load_model(path)
        cfg, model = loaded.cfg, loaded.model
    if cfg.model.num_experts > 0:
        raise UpcycleError(f"{path} is already an MoE model (model.num_experts={cfg.model.num_experts}); "
                           "upcycle a dense one (num_experts=0)")  # fmt: skip
    return cfg, model.eval()


def dense_ffn(mlp: torch.nn.Module) -> methods.DenseFFN:
    """A dense block's MLP (epmoe/model/experts.py MLP) as methods.DenseFFN."""
    up = mlp.w_up.weight.detach() if mlp.w_up is not None else None
    return methods.DenseFFN(mlp.w_gate.weight.detach(), up, mlp.w_down.weight.detach(), mlp.activation)


@torch.no_grad()
def ffn_inputs(model: Transformer, tokens_BS: torch.Tensor) -> list[torch.Tensor]:
    """x_TD of every block's FFN (the normed residual it reads) on tokens_BS, in block order."""
    out: list[torch.Tensor] = []
    hooks = [b.ffn.register_forward_hook(lambda _m, args, _y: out.append(args[0].reshape(-1, args[0].shape[-1])))
             for b in model.blocks]  # fmt: skip
    try:
        model(tokens_BS)
    finally:
        for h in hooks:
            h.remove()
    return out


def tokens(splits: TokenSplits, n: int, seq_len: int, seed: int, val: bool) -> torch.Tensor:
    """tokens_BS: ceil(n / seq_len) windows of the train (calibration) or val (deviation) split."""
    B = math.ceil(n / seq_len)
    split = splits.val if val else splits.train
    return sample_batch(split, B, seq_len, seed, EVAL_STREAM if val else CALIB_STREAM, 0)[0]


@dataclass
class Report:
    """What the upcycled model is, next to the dense one it came from."""

    method: str
    exact_layers: list[int]  # blocks whose MoE layer computes its dense FFN exactly (closed form)
    scales: dict[int, float] = field(default_factory=dict)  # fitted down-projection scale per other MoE block
    hit_rate: dict[int, float] = field(default_factory=dict)  # clusters: per block, see `router_hit_rate`
    chance: float = 0.0  # the hit rate of a router that picks k of E experts at random: k / E
    rel_logits_error: float = 0.0  # ||logits - dense logits|| / ||dense logits|| on val tokens
    dense_loss: float = 0.0  # cross-entropy (nats per token) of the dense model on the same tokens
    moe_loss: float = 0.0
    kl: float = 0.0  # mean KL(dense || MoE) of the next-token distributions, nats per token

    def lines(self) -> list[str]:
        out = [f"deviation from the dense model on held-out tokens: relative logits error {self.rel_logits_error:.2e}, "
               f"KL(dense || MoE) {self.kl:.2e} nats/token, loss {self.moe_loss:.4f} vs dense "
               f"{self.dense_loss:.4f} nats/token "
               f"({self.moe_loss - self.dense_loss:+.4f})"]  # fmt: skip
        if self.exact_layers:
            out.append(f"exact by construction: MoE blocks {self.exact_layers}")
        if self.scales:
            out.append(
                "fitted down-projection scales: " + ", ".join(f"block {i}: {s:.3f}" for i, s in self.scales.items())
            )
        if self.hit_rate:
            rates = ", ".join(f"block {i}: {r:.2f}" for i, r in self.hit_rate.items())
            out.append(
                f"calibration tokens routed to the expert that fires most for them: {rates} (chance {self.chance:.2f})"
            )
        return out


def router_hit_rate(moe: MoE, x_TD: torch.Tensor, fire_TE: torch.Tensor) -> float:
    """The fraction of calibration tokens whose top-k experts include the one whose units fire most
    for the token (the highest mean unit magnitude, fire_TE's argmax)."""
    topk_idx_TK = moe.router(x_TD).topk_idx_TK
    return (topk_idx_TK == fire_TE.argmax(dim=1, keepdim=True)).any(dim=1).float().mean().item()


def fit_scale(moe: MoE, ffn: methods.DenseFFN, x_TD: torch.Tensor) -> float:
    """Scale the routed experts' down projections by the least-squares c that brings the layer's
    routed output nearest the dense FFN's on x_TD (the shared experts always match theirs);
    returns c. The nearest a non-exact layer gets with one scalar: the router's weights stay."""
    routed_TD, _ = moe.dispatcher(x_TD, moe.router(x_TD), moe.experts)
    shared_TD = moe.shared(x_TD) if moe.shared is not None else torch.zeros_like(routed_TD)
    target_TD = ffn(x_TD) - shared_TD
    c = ((routed_TD * target_TD).sum() / (routed_TD * routed_TD).sum().clamp_min(1e-30)).item()
    moe.experts.w_down_EFD.mul_(c)
    return c


def _layer(ffn: methods.DenseFFN, cfg: Config, opts: UpcycleOptions, x_TD: torch.Tensor | None,
           g: torch.Generator) -> tuple[methods.LayerInit, torch.Tensor | None]:  # fmt: skip
    """One MoE layer's start by `opts.method` (and its fire_TE with clusters)."""
    m, r = cfg.model, cfg.router
    E, D = m.num_experts, m.d_model
    shared_N = methods.frequent_units(ffn.activations(x_TD), opts.shared_units) if opts.shared_units \
        else torch.zeros(0, dtype=torch.long)  # fmt: skip
    if opts.method == "copy":
        gate_ED = torch.randn(E, D, generator=g) / math.sqrt(D)
        return methods.copy_layer(ffn, E, gate_ED, r.routed_scaling, exactly_dense(cfg, opts)), None
    if opts.method == "granular":
        G = opts.granularity
        gate_RD = torch.randn(E // G, D, generator=g) / math.sqrt(D)
        return methods.granular_layer(ffn, E, G, gate_RD, shared_N, r.routed_scaling, exactly_dense(cfg, opts)), None
    return methods.cluster_layer(ffn, x_TD, E, shared_N, opts.kmeans_iters, opts.seed)


@torch.no_grad()
def upcycle(dense: Transformer, cfg: Config, opts: UpcycleOptions, splits: TokenSplits) -> tuple[Transformer, Report]:
    """The MoE model of `cfg` (target_config's) from `dense`: attention, norms, embeddings, the
    head and the FFNs of layers that stay dense copied; every MoE layer built by `opts.method`
    from its block's dense FFN. Calibration inputs (clusters, shared_units, fitted scales) are the
    dense model's own on `opts.calib_tokens` train tokens. Returns the model (fp32, CPU, training
    mode) and its Report against the dense model on `opts.eval_tokens` val tokens."""
    seq = cfg.data.seq_len
    dense.eval()
    needs_calib = opts.method == "clusters" or opts.shared_units > 0 or not exactly_dense(cfg, opts)
    calib = ffn_inputs(dense, tokens(splits, opts.calib_tokens, seq, opts.seed, val=False)) if needs_calib else None
    g = torch.Generator().manual_seed(opts.seed)
    state = dict(dense.state_dict())
    inits: dict[int, tuple[methods.LayerInit, torch.Tensor | None]] = {}
    for i, block in enumerate(dense.blocks):
        if not is_moe_layer(cfg.model, i):
            continue
        init, fire_TE = inits[i] = _layer(dense_ffn(block.ffn), cfg, opts, calib[i] if calib else None, g)
        prefix = f"blocks.{i}.ffn."
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        state[prefix + "router.gate.weight"] = init.gate_ED
        state[prefix + "router.expert_bias_E"] = torch.zeros(cfg.model.num_experts)
        state.update({prefix + "experts." + k: v for k, v in init.experts.items()})
        if init.shared is not None:
            shared = dict(init.shared)
            if cfg.model.shared_gate:  # sigmoid(0) = 1/2 on every token, undone by twice the down projection
                shared["w_down.weight"] = shared["w_down.weight"] * 2
                shared["output_gate.weight"] = torch.zeros(1, cfg.model.d_model)
            state.update({prefix + "shared." + k: v for k, v in shared.items()})
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.router)
    load_assigned(model, {k: v.clone() for k, v in state.items()})
    model.eval()
    report = Report(opts.method, [i for i, (init, _) in inits.items() if init.exact])
    for i, (init, fire_TE) in inits.items():
        moe, ffn = model.blocks[i].ffn, dense_ffn(dense.blocks[i].ffn)
        if not init.exact:
            report.scales[i] = fit_scale(moe, ffn, calib[i])
        if fire_TE is not None:
            report.hit_rate[i] = router_hit_rate(moe, calib[i], fire_TE)
    report.chance = cfg.router.top_k / cfg.model.num_experts
    _measure(report, dense, model, tokens(splits, opts.eval_tokens, seq, opts.seed, val=True))
    return model.train(), report


def exactly_dense(cfg: Config, opts: UpcycleOptions) -> bool:
    """Whether `opts.method` computes the dense function exactly under cfg's router: weights that
    sum to 1, no capacity drops (a dropped pair loses its share), and for granular whole copies."""
    r = cfg.router
    if not r.renormalize or r.capacity_factor is not None:
        return False
    return opts.method == "copy" or (opts.method == "granular" and r.top_k % opts.granularity == 0)


def _measure(report: Report, dense: Transformer, moe: Transformer, tokens_BS: torch.Tensor) -> None:
    """Fill report's deviation fields from both models' logits on tokens_BS."""
    dense_BSV = dense(tokens_BS).logits_BSV
    moe_BSV = moe(tokens_BS).logits_BSV
    report.rel_logits_error = ((moe_BSV - dense_BSV).norm() / dense_BSV.norm()).item()
    targets = tokens_BS[:, 1:].reshape(-1)
    V = dense_BSV.shape[-1]
    report.dense_loss = F.cross_entropy(dense_BSV[:, :-1].reshape(-1, V), targets).item()
    report.moe_loss = F.cross_entropy(moe_BSV[:, :-1].reshape(-1, V), targets).item()
    dense_log_NV, moe_log_NV = (x.reshape(-1, V).log_softmax(-1) for x in (dense_BSV, moe_BSV))
    report.kl = F.kl_div(moe_log_NV, dense_log_NV, log_target=True, reduction="batchmean").item()
