"""FSDP2 beside expert parallelism (parallel.fsdp=true, native engine): `apply_fsdp` shards a model
that expert parallelism has already cut down to this rank's experts.

1. meshes: a 1-D mesh over all ranks for the non-expert weights; the experts' own mesh is their
   expert-DP group (the world / ep ranks holding the same experts), a dimension of the 2-D
   (expert-DP, EP) mesh laid out as ParallelDims lays out ranks (rank = dp_index * ep + ep_index);
2. under expert parallelism with expert-DP > 1: `fully_shard` each MoE layer's experts over the
   expert-DP mesh first, gradients divided by world (not FSDP's default, the mesh size) so that
   expert grad = sum over expert-DP / world, the rule of gradients.py;
   with expert-DP 1 the experts stay plain tensors (ignored by FSDP): nothing to shard them over;
   with ep 1 they are ordinary weights of their block (expert-DP is the world);
3. `fully_shard` every Block, then the root (embeddings, final norm, head: tied stay tied) over
   the world mesh: non-expert grad = sum over world / world, FSDP's mean. Each block is gathered
   before its forward (so before its router and shared experts run) and its gradients
   reduce-scattered as soon as its backward is done, while backward goes on below: the bucketed
   GradientReducer does not run for them.
NOTE: reductions are forced to SUM then divide (gloo has no AVG / PREMUL_SUM reduce-scatter).
train.precision=bf16: FSDP2's MixedPrecisionPolicy gathers the parameters in bf16 for forward and
backward (the activations follow: bf16 end to end, under autocast as without FSDP), reduces the
gradients in fp32 and the optimizer steps the fp32 shards; each router's gate is its own FSDP
group gathered in fp32, so routing stays fp32 as router.py computes it.

Experts that need to stay whole: the pipelined dispatcher differentiates the experts inside its
own autograd Function, once per chunk (FSDP2's hooks cannot follow that), and replicas and online
re-placement move experts between ranks as whole rows with their AdamW state (migration.py,
replicas.py). Where one of them is on and expert-DP > 1, each rank's experts are not cut (step 2
is skipped): they stay whole, replicated over expert-DP with their gradients all-reduced over it,
as without FSDP, while FSDP2 still shards every non-expert weight. `whole_experts_reason` says
why, and the run's header says so (`summary`): nothing falls back silently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from epmoe.comm.parallel_dims import ParallelDims
from epmoe.config import Config
from epmoe.model.moe import moe_layers
from epmoe.parallel.gradients import Sharding

if TYPE_CHECKING:  # NOTE: imported where FSDP2 runs: a run without it skips their ~0.8 s import (DTensor's)
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy


def _shard(
    module: nn.Module,
    mesh: DeviceMesh,
    ignored: set[nn.Parameter],
    policy: MixedPrecisionPolicy,
    divide_by: int | None = None,
) -> None:
    # NOTE: the root too frees its gathered weights after forward (FSDP2 keeps the root's by
    # default): between steps every parameter is then its shard, as the optimizer and checkpoints
    # (which name parameters) see them
    from torch.distributed.fsdp import fully_shard

    fully_shard(module, mesh=mesh, reshard_after_forward=True, ignored_params=ignored or None, mp_policy=policy)
    module.set_force_sum_reduction_for_comms(True)
    # NOTE: a rank whose tokens skipped a weight still owes the reduce-scatter its (zero) share
    module.set_reduce_scatter_unused_params(True, recurse=False)
    if divide_by is not None:
        module.set_gradient_divide_factor(float(divide_by))


def mixed_precision(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """FSDP2's policy: parameters gathered in `param_dtype` for forward and backward (None: as
    stored, fp32), gradients reduced in fp32 into the fp32 shards the optimizer steps."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def whole_experts_reason(cfg: Config, dims: ParallelDims) -> str | None:
    """Why this run keeps each rank's experts whole where FSDP2 could cut them over expert-DP (> 1
    rank), or None: it cuts them, or there is nothing to cut them over (see the module docstring)."""
    if not (dims.ep > 1 and dims.world // dims.ep > 1):
        return None
    if cfg.comm.dispatcher == "pipelined":
        return "the pipelined dispatcher (comm.dispatcher=pipelined) differentiates them chunk by chunk itself"
    pc = cfg.placement
    if pc.rebalance_every > 0:
        what = "replicas (placement=redundant)" if pc.policy == "redundant" else f"re-placement (placement={pc.policy})"
        return f"{what} moves whole experts with their optimizer state"
    return None


def summary(dims: ParallelDims, reason: str | None) -> str:
    """One line for the run's header: what parallel.fsdp=true shards over which ranks."""
    expert_dp = dims.world // dims.ep
    if dims.ep == 1:
        return f"fsdp: every weight sharded over {dims.world} ranks"
    head = f"fsdp: non-expert weights sharded over {dims.world} ranks"
    if expert_dp == 1:
        return f"{head}; each rank's experts whole (parallel.ep = world size)"
    if reason is None:
        return f"{head}, each rank's experts over their expert-DP group ({expert_dp} ranks)"
    return (f"{head}; each rank's experts kept whole and their gradients all-reduced over expert-DP "
            f"({expert_dp} ranks), as without FSDP: {reason}")  # fmt: skip


def apply_fsdp(
    model: nn.Module,
    dims: ParallelDims,
    device: torch.device,
    param_dtype: torch.dtype | None = None,
    whole_experts: bool = False,
) -> Sharding:
    """Shard `model` (its Blocks in `model.blocks`, after expert parallelism) as the module docstring
    says; returns which gradients FSDP now reduces. Collective: every rank calls it.
    param_dtype: bf16 for train.precision=bf16 (fp32 master weights and reductions); the routers'
    gates stay fp32 (routing math in fp32, as without FSDP: router.py). whole_experts: do not cut
    the experts over expert-DP (`whole_experts_reason`)."""
    if dims.world == 1:
        return Sharding()
    expert_dp = dims.world // dims.ep
    shard_experts = dims.ep > 1 and expert_dp > 1 and not whole_experts
    from torch.distributed.device_mesh import init_device_mesh

    world_mesh = init_device_mesh(device.type, (dims.world,), mesh_dim_names=("dp",))
    experts = [p for moe in moe_layers(model) for p in moe.experts.stacked_weights().values()]
    ignored: set[nn.Parameter] = set(experts) if dims.ep > 1 and not shard_experts else set()
    policy, fp32 = mixed_precision(param_dtype), mixed_precision(None)
    if shard_experts:
        edp_ep = init_device_mesh(device.type, (expert_dp, dims.ep), mesh_dim_names=("edp", "ep"))
        for moe in moe_layers(model):
            _shard(moe.experts, edp_ep["edp"], set(), policy, divide_by=dims.world)
    if param_dtype is not None:  # each gate its own FSDP group, gathered in fp32
        for moe in moe_layers(model):
            _shard(moe.router, world_mesh, set(), fp32)
    for block in model.blocks:
        _shard(block, world_mesh, {p for p in ignored if any(p is q for q in block.parameters())}, policy)
    _shard(model, world_mesh, ignored, policy)
    return Sharding(replicated=True, experts=dims.ep == 1 or shard_experts)
