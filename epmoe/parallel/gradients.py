"""Gradient reduction rules under expert parallelism, and the one global gradient norm.

Each rank's loss is the mean over its own tokens; the global loss is their mean over the
`world` ranks. So after backward:
- non-expert (replicated) gradients: sum over all ranks / world;
- expert gradients already hold every EP-group rank's contribution (the all-to-all
  backward brought them home): sum over the expert-data-parallel group (the replicas) / world.
The global norm counts every parameter once: the replicated part once, each expert once
(summed over the EP group, not over replicas).

Under FSDP2 (parallel.fsdp=true, fsdp.py) the same rules hold, but FSDP reduce-scatters the
sharded gradients itself during backward (`Sharding` says which): those gradients are this rank's
shards, summed into the norm once each over the ranks that hold them.

The sums travel in flat buckets of about BUCKET_BYTES (DDP's default size), issued
asynchronously (the replicated ones during backward: `GradientReducer`) instead of one blocking
call per parameter; a bucket sums exactly what its parameters' own all-reduces would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from epmoe.comm.communicator import Handle, TorchCommunicator
from epmoe.comm.parallel_dims import ParallelDims
from epmoe.comm.process import all_reduce_sum_
from epmoe.model.moe import moe_layers

BUCKET_BYTES = 25 << 20


@dataclass(frozen=True)
class Sharding:
    """Which gradients FSDP2 already reduced during backward; they are then this rank's shards
    (DTensors): replicated: the non-expert ones, over all ranks; experts: the stacked expert
    weights, over the expert-DP group (all ranks when ep is 1)."""

    replicated: bool = False
    experts: bool = False

    def local(self, params: list[nn.Parameter], sharded: bool) -> list[torch.Tensor | None]:
        """The gradients of `params` as this rank holds them (its shards where `sharded`)."""
        return [None if p.grad is None else p.grad.to_local() if sharded else p.grad for p in params]


UNSHARDED = Sharding()


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(replicated, expert) parameters in model order; expert ones are the experts' stacked weights."""
    expert_ids = {id(p) for moe in moe_layers(model) for p in moe.experts.stacked_weights().values()}
    params = list(model.parameters())
    return [p for p in params if id(p) not in expert_ids], [p for p in params if id(p) in expert_ids]


def buckets(params: list[nn.Parameter], bucket_bytes: int = BUCKET_BYTES) -> list[list[nn.Parameter]]:
    """Consecutive runs of `params` of one dtype and device, each closed once it reaches
    bucket_bytes (a parameter larger than that is a bucket of its own). Gradients take their
    parameter's dtype and device."""
    out: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        if out and size < bucket_bytes and (p.dtype, p.device) == (out[-1][0].dtype, out[-1][0].device):
            out[-1].append(p)
            size += p.numel() * p.element_size()
        else:
            out.append([p])
            size = p.numel() * p.element_size()
    return out


class _Bucket:
    """One flat buffer of several parameters' gradients, summed over a group in flight."""

    def __init__(self, params: list[nn.Parameter], group) -> None:
        self.params = params
        for p in params:
            if p.grad is None:  # not used this step: it still owes the sum a (zero) gradient
                p.grad = torch.zeros_like(p)
        self.flat = torch.cat([p.grad.reshape(-1) for p in params])
        self.handle: Handle = TorchCommunicator(group).all_reduce_sum_(self.flat)

    def finish(self, world: int) -> None:
        """Wait for the sum, then every gradient = its sum / world."""
        self.handle.wait()
        self.flat.div_(world)
        for p, piece in zip(self.params, self.flat.split([p.numel() for p in self.params])):
            p.grad.copy_(piece.view_as(p.grad))


class GradientReducer:
    """The replicated (non-expert) gradients' sum over all ranks, issued while backward runs.

    Buckets hold the parameters in reverse model order, about the order backward finishes their
    gradients. During the backward of a step's last micro-batch (`arm()` first), a hook counts each
    finished gradient; a bucket whose gradients are all there is issued at once, asynchronously,
    while backward goes on with the layers below. NOTE: buckets are issued strictly in order (a
    ready bucket waits for the ones before it): every rank must issue the same collectives in the
    same order. `finish()` issues what is left (gradients never produced: zeros) and waits.
    """

    def __init__(self, model: nn.Module, dims: ParallelDims, bucket_bytes: int = BUCKET_BYTES):
        replicated, _ = split_params(model)
        self.world = dims.world
        self.buckets = buckets(list(reversed(replicated)), bucket_bytes)
        self._bucket_of = {id(p): b for b, params in enumerate(self.buckets) for p in params}
        self._ready = [0] * len(self.buckets)
        self._in_flight: list[_Bucket] = []
        self._armed = False
        for p in replicated:
            p.register_post_accumulate_grad_hook(self._on_gradient)

    def arm(self) -> None:
        """The next backward completes this step's gradients: issue buckets as they fill."""
        self._armed, self._ready, self._in_flight = True, [0] * len(self.buckets), []

    def _on_gradient(self, p: nn.Parameter) -> None:
        if not self._armed:
            return
        self._ready[self._bucket_of[id(p)]] += 1
        while len(self._in_flight) < len(self.buckets):
            b = len(self._in_flight)
            if self._ready[b] < len(self.buckets[b]):
                break
            self._in_flight.append(_Bucket(self.buckets[b], None))

    def finish(self) -> None:
        """Issue the buckets not issued yet, wait for all; every gradient is then sum / world."""
        self._armed = False
        self._in_flight += [_Bucket(self.buckets[b], None) for b in range(len(self._in_flight), len(self.buckets))]
        for bucket in self._in_flight:
            bucket.finish(self.world)
        self._in_flight = []


def reduce_gradients(
    model: nn.Module,
    dims: ParallelDims,
    reducer: GradientReducer | None = None,
    bucket_bytes: int = BUCKET_BYTES,
    sharding: Sharding = UNSHARDED,
) -> None:
    """Apply the reduction rules above to every gradient of `model` (a parameter without one gets
    zeros). reducer: the replicated gradients' sums it issued during backward (None: issued here).
    sharding: the gradients FSDP2 reduced already (left as they are)."""
    replicated, expert = split_params(model)
    in_flight: list[_Bucket] = []
    if reducer is None and not sharding.replicated:
        in_flight += [_Bucket(bucket, None) for bucket in buckets(replicated, bucket_bytes)]
    if sharding.experts:
        pass  # FSDP2 reduce-scattered them over the expert-DP group, divided by world (fsdp.py)
    elif dims.world // dims.ep > 1:  # expert-DP replicas of the same experts
        in_flight += [_Bucket(bucket, dims.expert_dp_group) for bucket in buckets(expert, bucket_bytes)]
    else:  # nothing to sum: each expert lives on this rank alone
        for p in expert:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad.div_(dims.world)
    if reducer is not None:
        reducer.finish()
    for bucket in in_flight:
        bucket.finish(dims.world)


def clip_global_norm_(
    model: nn.Module,
    dims: ParallelDims,
    max_norm: float,
    row_weights: dict[nn.Parameter, torch.Tensor] | None = None,
    sharding: Sharding = UNSHARDED,
) -> float:
    """Clip all gradients to one global norm (inf = only measure); returns the norm.
    row_weights: per-row weights of stacked expert weights holding replicas (replicas.py).
    sharding: the gradients that are FSDP2 shards (clipped where they are: the local shards)."""
    replicated, expert = split_params(model)
    row_weights = row_weights or {}
    local = {"replicated": sharding.local(replicated, sharding.replicated),
             "expert": sharding.local(expert, sharding.experts)}  # fmt: skip
    grads = [g for g in local["replicated"] + local["expert"] if g is not None]
    # squares summed where the gradients are, in parameter order (no per-parameter host copy)
    sq = torch.zeros(2, dtype=torch.float64, device=grads[0].device if grads else None)
    for i, (params, grads_of) in enumerate(zip((replicated, expert), local.values())):
        for p, g in zip(params, grads_of):
            if g is None:
                continue
            sq_rows = g.detach().double().square()
            if p in row_weights:  # [L, ...] rows of replicated experts count 1 / replicas each
                sq_rows = sq_rows.flatten(1).sum(1) * row_weights[p].to(sq_rows.device)
            sq[i] += sq_rows.sum().to(sq.device)
    # every element once: shards are summed over all ranks (an expert's shards lie in its expert-DP
    # group, its EP-group peers hold the other experts); unsharded experts over the EP group only
    if sharding.replicated and sharding.experts:
        all_reduce_sum_(sq)
    elif sharding.replicated:
        all_reduce_sum_(sq[:1])
    if dims.ep > 1 and not sharding.experts:
        all_reduce_sum_(sq[1:], dims.ep_group)
    total = sq.sum().sqrt().item()  # NOTE: host sync: the step's finite check and the metrics read it
    if total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in grads:
            g.mul_(scale)
    return total
