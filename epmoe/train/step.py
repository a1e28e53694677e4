"""One training step and one evaluation, as the trainer drives them.

Shape key: B sequences per rank, S sequence length, V vocabulary, Y MoE layers, E experts.

One step (`train_step`):
1. for each of `grad_accum` micro-batches: forward under autocast (with data.document_mask, the
   batch's document ids from the data's boundary token: epmoe/model/documents.py), loss = cross-entropy +
   the routers' aux and z losses, backward (scaled by 1/grad_accum); the step's sums (losses,
   drops, per-layer expert load) accumulate on the device, no host sync per micro-batch;
2. one all-reduce of those sums (and of the stop flags, see stop.py) over all ranks;
3. the engine reduces and clips the gradients to one global norm, and updates (AdamW);
4. aux-loss-free balancing: each router's bias moves toward uniform by the step's global load;
5. the step's metrics: losses, lr, gradient norm, per-layer expert load, imbalance, drops, and
   per MoE layer (by block index i) the scalars `moe/L{i}/imbalance`, `drop_frac`, `aux_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from epmoe.comm.process import all_reduce_sum_
from epmoe.config import Config, ConfigError
from epmoe.model.documents import document_ids
from epmoe.model.moe import moe_layers
from epmoe.model.router import Routing
from epmoe.model.transformer import Transformer
from epmoe.parallel.parallelize import Parallel
from epmoe.train.data import TokenSplits, sample_batch
from epmoe.train.engine import Engine, autocast
from epmoe.train.routing_stats import topk_of_layers
from epmoe.train.stop import STOP_SIGNALS, StopRequest

VAL_STREAM = 1 << 20  # data stream ids >= this are validation batches
# the step's sums: the ce and z losses, one stop flag per STOP_SIGNALS entry, then per MoE layer the expert
# load (Y·E), the dropped assignments (Y) and the aux loss (Y)
_CE, _Z, _STOP = range(3)
_LOAD = _STOP + len(STOP_SIGNALS)


class NonFiniteStep(FloatingPointError):
    """A step whose loss or gradient norm is not finite (train.on_nonfinite=abort)."""


def batch_documents(x_BS: torch.Tensor, data: TokenSplits, cfg: Config) -> torch.Tensor | None:
    """doc_ids_BS of x_BS (documents ended by the data's boundary token) under data.document_mask;
    None without it. Per rank's own rows: expert parallelism changes nothing here."""
    if not cfg.data.document_mask:
        return None
    if data.boundary_id is None:  # validate() refuses bin early; this guards any source without one
        raise ConfigError(f"data.document_mask=true needs a boundary token, which data.kind={cfg.data.kind} "
                          "does not name; set data.document_mask=false")  # fmt: skip
    return document_ids(x_BS, data.boundary_id)


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())


@torch.no_grad()
def evaluate(model: Transformer, data: TokenSplits, cfg: Config, device: torch.device, par: Parallel) -> float:
    """Mean held-out cross-entropy (nats/token) over the same `eval_batches` batches every time."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    global_batch = cfg.train.batch_size * par.info.world
    for i in range(cfg.train.eval_batches):
        x_BS, y_BS = sample_batch(data.val, global_batch, cfg.data.seq_len, cfg.train.seed, VAL_STREAM + i, 0)
        x_BS = par.my_slice(x_BS).to(device)
        with autocast(device, cfg.train.precision):
            logits_BSV = model(x_BS, doc_ids_BS=batch_documents(x_BS, data, cfg)).logits_BSV
            total += lm_loss(logits_BSV, par.my_slice(y_BS).to(device)).double()
    model.train()
    return par.mean(total.item() / cfg.train.eval_batches)  # NOTE: host sync, once per evaluation


def routing_metrics(load_YE: torch.Tensor, dropped_Y: torch.Tensor, aux_Y: torch.Tensor, z: float,
                    blocks: list[int]) -> dict[str, Any]:  # fmt: skip
    """Summaries of one step's routing: load_YE = tokens per (MoE layer, expert), dropped_Y and
    aux_Y per MoE layer; `blocks` names each MoE layer by its block index."""
    if load_YE.numel() == 0:
        return {}
    load_YE = load_YE.double()
    tokens_Y = load_YE.sum(dim=1).clamp_min(1e-9)
    imbalance_Y = load_YE.max(dim=1).values / load_YE.mean(dim=1).clamp_min(1e-9)
    drop_frac_Y = dropped_Y.double() / tokens_Y
    record: dict[str, Any] = {
        "aux_loss": aux_Y.sum().item(),
        "z_loss": z,
        "imbalance": imbalance_Y.max().item(),  # worst layer's max/mean tokens per expert
        "drop_frac": dropped_Y.sum().item() / tokens_Y.sum().item(),
        "expert_load": load_YE.long().tolist(),
    }
    for y, block in enumerate(blocks):
        layer = f"moe/L{block}"
        record.update({f"{layer}/imbalance": imbalance_Y[y].item(), f"{layer}/drop_frac": drop_frac_Y[y].item(),
                       f"{layer}/aux_loss": aux_Y[y].item()})  # fmt: skip
    return record


def _routing_losses(routings: list[Routing], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    zero = like.new_zeros(())
    return sum((r.aux_loss for r in routings), zero), sum((r.z_loss for r in routings), zero)


def train_step(
    engine: Engine,
    data: TokenSplits,
    cfg: Config,
    device: torch.device,
    step: int,
    par: Parallel | None = None,
    on_routing: Callable[[int, torch.Tensor], None] | None = None,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    """One optimizer step over grad_accum micro-batches; returns the step's metrics (all ranks).
    on_routing(micro, topk_idx_YTK) sees every micro-batch's expert choices (Y MoE layers).
    stop: this rank's stop flag, agreed with the other ranks' in the step's one reduction."""
    t_cfg = cfg.train
    par = par or Parallel.single(cfg.model.num_experts)
    global_batch = t_cfg.batch_size * par.info.world
    layers = moe_layers(engine.model)
    Y, E = len(layers), cfg.model.num_experts
    # per-rank sums [ce, z, stop flags..., load_YE, dropped_Y, aux_Y] in float64: counts stay exact below 2**53
    sums = torch.zeros(_LOAD + Y * (E + 2), dtype=torch.float64, device=device)
    load_YE = sums[_LOAD : _LOAD + Y * E].view(Y, E)
    dropped_Y, aux_Y = sums[_LOAD + Y * E :].view(2, Y)
    for micro in range(t_cfg.grad_accum):
        # the global batch depends only on (seed, micro, step): any world size sees the same data
        x_BS, y_BS = sample_batch(data.train, global_batch, cfg.data.seq_len, t_cfg.seed, micro, step)
        x_BS, y_BS = par.my_slice(x_BS).to(device), par.my_slice(y_BS)
        out = engine.forward(x_BS, batch_documents(x_BS, data, cfg))
        ce = lm_loss(out.logits_BSV, y_BS.to(device))
        if t_cfg.fault.nan_at_step == step + 1 and par.info.rank == 0:
            ce = ce * float("nan")  # the injected fault of train.fault.nan_at_step
        aux, z = _routing_losses(out.routings, ce)
        engine.backward((ce + aux + z) / t_cfg.grad_accum, last=micro == t_cfg.grad_accum - 1)
        sums[_CE] += ce.detach().double()
        sums[_Z] += z.detach().double()
        for y, routing in enumerate(out.routings):
            load_YE[y] += routing.counts_E
            dropped_Y[y] += routing.dropped()
            aux_Y[y] += routing.aux_loss.detach().double()
        if on_routing is not None and out.routings:
            on_routing(micro, topk_of_layers(out.routings))
    if stop is not None:
        sums[_STOP:_LOAD] = stop.flags(sums)
    if par.info.world > 1:  # the routers' bias must see the global load; the losses are means over ranks
        all_reduce_sum_(sums)
    # NOTE: the step's one host sync for its metrics (the gradient norm's is in the engine)
    sums_host = sums.cpu()
    ce_mean, z_mean = (sums_host[i].item() / par.info.world for i in (_CE, _Z))
    load_host_YE = sums_host[_LOAD : _LOAD + Y * E].view(Y, E).long()
    dropped_host_Y, aux_host_Y = sums_host[_LOAD + Y * E :].view(2, Y)

    n = t_cfg.grad_accum
    record: dict[str, Any] = {"step": step + 1, "loss": ce_mean / n, "lr": engine.lr}
    if stop is not None:
        stop.agree(sums_host[_STOP:_LOAD].tolist())
    grad_norm = engine.prepare()  # None: the engine knows it only once it updates (ZeRO)
    # NOTE: the loss is a mean over ranks and the norm global, so every rank decides alike
    if math.isfinite(ce_mean) and (grad_norm is None or math.isfinite(grad_norm)):
        applied, grad_norm = engine.update()  # applied False: the engine discarded a non-finite step
    else:
        applied, grad_norm = False, engine.skip()
    record["grad_norm"] = grad_norm
    if not applied:
        if t_cfg.on_nonfinite == "abort":
            raise NonFiniteStep(f"non-finite training step {step + 1} (loss {ce_mean / n}, gradient norm {grad_norm})")
        return {**record, "skipped_nonfinite": 1}  # skip: no update, no balancing step; counted
    global_load_YE = load_YE.long()  # reduced in place with `sums`; on the routers' device
    for y, moe in enumerate(layers):
        moe.router.update_bias(global_load_YE[y])
    aux_host_Y /= par.info.world * n
    record.update(routing_metrics(load_host_YE, dropped_host_Y, aux_host_Y, z_mean / n, engine.model.moe_blocks()))
    return record
