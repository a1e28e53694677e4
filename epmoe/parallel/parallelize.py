"""parallelize(model, cfg, device) -> Parallel: the one place a single-device model becomes this
rank's part of a parallel run.

1. join the launcher's process group (comm/process.py reads its environment);
2. build the EP and expert-DP groups (ParallelDims);
3. data parallelism's forward rule (the routers' batch statistics over every rank);
4. under expert parallelism: the EP communicator (torch or MPI), the dispatcher (plain all-to-all,
   or pipelined in chunks, `auto` tuned in the first steps), the wire dtype, the start placement
   with its replicas, per-layer exchange timers, and the rebalancer for online re-placement;
5. train.activation_checkpointing: every block recomputes its forward in backward
   (activation_checkpointing.py), at every world size, before FSDP wraps the blocks;
   then train.compile: every block compiled in place, its MoE dispatch left eager (compile.py);
6. parallel.fsdp=true: FSDP2 shards the non-expert weights over all ranks and the experts over
   their expert-DP group (fsdp.py), after expert parallelism cut the experts to this rank's.
The training loop only calls it and the `Parallel` it returns; it never parses comm or placement
options itself.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
from torch import nn

from epmoe.choices import WireDtype
from epmoe.comm.communicator import ep_communicator
from epmoe.comm.parallel_dims import ParallelDims
from epmoe.comm.process import RankInfo, all_reduce_sum_, init_from_env
from epmoe.config import CommConfig, Config, ConfigError
from epmoe.model.init import to_empty
from epmoe.model.moe import moe_layers, named_moe_layers
from epmoe.model.transformer import Transformer
from epmoe.parallel.activation_checkpointing import apply_activation_checkpointing
from epmoe.parallel.checkpoint_shards import NO_SHARDS, Shards
from epmoe.parallel.chunk_tuner import ChunkTuner
from epmoe.parallel.compile import apply_compile
from epmoe.parallel.data_parallel import apply_data_parallel
from epmoe.parallel.expert_parallel import apply_expert_parallel, apply_placement
from epmoe.parallel.fsdp import apply_fsdp, whole_experts_reason
from epmoe.parallel.fsdp import summary as fsdp_summary
from epmoe.parallel.gradients import UNSHARDED, GradientReducer, Sharding, clip_global_norm_, reduce_gradients
from epmoe.parallel.migration import Rebalancer
from epmoe.parallel.replicas import norm_weights, reduce_replica_grads, replica_rows
from epmoe.parallel.timing import LayerTimer, attach_timers
from epmoe.placement.placement import Placement, RoutingStats

# comm.dtype -> the rows' dtype on the wire (None: as computed)
WIRE_DTYPES: dict[WireDtype, torch.dtype | None] = {WireDtype.fp32: None, WireDtype.bf16: torch.bfloat16}
if set(WIRE_DTYPES) != set(WireDtype):
    raise ImportError(f"WIRE_DTYPES names {sorted(WIRE_DTYPES)}, epmoe.choices.WireDtype {sorted(WireDtype)}")


@dataclass
class Parallel:
    """This rank's place in the run and what parallelism attached to the model; world 1 (no
    process group) is the single-process case."""

    info: RankInfo
    dims: ParallelDims
    placement: Placement | None = None  # the one in force now (None: every expert local)
    rebalancer: Rebalancer | None = None  # online re-placement of experts (placement.rebalance_every)
    timers: list[LayerTimer] = field(default_factory=list)  # per MoE layer, under expert parallelism
    tuner: ChunkTuner | None = None  # comm.chunks=auto
    sharding: Sharding = UNSHARDED  # the gradients FSDP2 reduces itself (parallel.fsdp=true)
    shards: Shards = NO_SHARDS  # how checkpoints read and write FSDP2's sharded tensors
    fsdp_summary: str = ""  # what FSDP2 shards over which ranks, for the run's header ("" without FSDP)

    @classmethod
    def single(cls, num_experts: int, info: RankInfo | None = None) -> Parallel:
        return cls(info or RankInfo(0, 1), ParallelDims(world=1, dp=1, ep=1, num_experts=num_experts))

    @property
    def ep_rank(self) -> int:
        return self.dims.ep_rank(self.info.rank)

    def my_slice(self, x_BS: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch of world x batch_size sequences."""
        per_rank = x_BS.shape[0] // self.info.world
        return x_BS[self.info.rank * per_rank : (self.info.rank + 1) * per_rank]

    def mean(self, value: float) -> float:
        """Mean of a per-rank scalar over all ranks (equal batch sizes)."""
        return all_reduce_sum_(torch.tensor([value], dtype=torch.float64))[0].item() / self.info.world

    def local_expert_ids(self, model: nn.Module) -> dict[str, list[int]]:
        """{MoE layer name: the global expert id of each of this rank's expert rows} (replicas repeat one)."""
        every = list(range(self.dims.num_experts))
        return {name: self.placement.experts_on_rank(y, self.ep_rank).tolist() if self.placement is not None else every
                for y, (name, _) in enumerate(named_moe_layers(model))}  # fmt: skip

    def apply_placement(self, model: nn.Module, placement: Placement) -> None:
        """Route by `placement` from now on (its experts must be where it says: see apply_placement)."""
        apply_placement(model, placement, self.ep_rank)
        self.placement = placement

    def rebalance(self, model: nn.Module, stats: RoutingStats, optimizer: torch.optim.Optimizer) -> dict:
        """Collective: re-place the experts by the window's global routing stats; returns its metrics."""
        new, metrics = self.rebalancer.rebalance(model, self.placement, stats, optimizer)
        self.apply_placement(model, new)
        return metrics

    def gradient_reducer(self, model: nn.Module) -> GradientReducer | None:
        """What sums the replicated gradients during backward (None in one process)."""
        return GradientReducer(model, self.dims) if self.info.world > 1 and not self.sharding.replicated else None

    def gradient_sync(self, model: nn.Module, last: bool) -> None:
        """Before a micro-batch's backward: under FSDP2 only the step's last one reduce-scatters;
        the earlier ones accumulate their unsharded gradients locally (one reduction per step, as
        without FSDP). A no-op otherwise (the bucketed reducer is armed for the last backward)."""
        if self.sharding.replicated:
            model.set_requires_gradient_sync(last)  # the FSDP2 root's method (fsdp.py): every sharded module

    def reduce_and_clip(self, model: nn.Module, max_norm: float, reducer: GradientReducer | None = None) -> float:
        """After backward: the reduction rules (gradients.py, replicas.py), then one global norm
        clipped to max_norm (inf: only measured); returns the norm. reducer: the one armed for
        this step's last backward, if any."""
        replicas = []  # placement=redundant: the stacked expert weights that hold replicas
        if self.info.world > 1:
            reduce_gradients(model, self.dims, reducer, sharding=self.sharding)
            if self.placement is not None and self.placement.has_replicas:
                replicas = replica_rows(model, self.placement, self.ep_rank)
                reduce_replica_grads(replicas, self.dims.num_experts, self.dims)
        return clip_global_norm_(model, self.dims, max_norm, norm_weights(replicas), self.sharding)


def dispatcher_chunks(comm: CommConfig) -> int | None:
    """None: the plain all-to-all dispatcher; n: pipelined in n chunks (auto starts at 1 and is tuned)."""
    if comm.dispatcher != "pipelined":
        return None
    return 1 if comm.chunks == "auto" else int(comm.chunks)


def parallelize(model: nn.Module, cfg: Config, device: torch.device) -> Parallel:
    """Join the launcher's process group (if any) and apply data and expert parallelism to `model`
    from outside; see the module docstring. Collective when world > 1."""
    info = init_from_env(device, cfg.train.collective_timeout_s)
    if info.world == 1 and cfg.parallel.ep == 1:
        apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
        apply_compile(model, cfg.train.compile)
        return Parallel.single(cfg.model.num_experts, info)
    dims = ParallelDims(world=info.world, dp=cfg.parallel.dp or info.world, ep=cfg.parallel.ep,
                        num_experts=cfg.model.num_experts)  # fmt: skip
    dims.build_groups(info.rank, datetime.timedelta(seconds=cfg.train.collective_timeout_s))
    apply_data_parallel(model, dims)
    if not dims.ep_enabled:
        return _with_fsdp(Parallel(info, dims), model, cfg, device)
    if cfg.comm.backend == "mpi" and device.type != "cpu":
        raise ConfigError(f"comm.backend=mpi exchanges CPU tensors, but this run is on {device}; use comm=torch")
    comm = ep_communicator(cfg.comm.backend, dims, info.rank)
    chunks = dispatcher_chunks(cfg.comm)
    placement = apply_expert_parallel(model, dims, info.rank, cfg.placement.policy, comm, chunks,
                                      WIRE_DTYPES[cfg.comm.dtype], cfg.placement.slots_per_rank)  # fmt: skip
    par = Parallel(info, dims, placement, timers=attach_timers(model))
    if cfg.comm.chunks == "auto" and chunks is not None:
        par.tuner = ChunkTuner([moe.dispatcher for moe in moe_layers(model)])
    if cfg.placement.rebalance_every > 0:
        par.rebalancer = Rebalancer(cfg.placement.policy, cfg.placement.rebalance_every, par.ep_rank,
                                    info.is_main, comm)  # fmt: skip
    return _with_fsdp(par, model, cfg, device)


def _with_fsdp(par: Parallel, model: nn.Module, cfg: Config, device: torch.device) -> Parallel:
    """Activation checkpointing, compile, then parallel.fsdp=true: shard `model` with FSDP2 (fsdp.py), as the
    last steps of parallelize."""
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing, par.timers)  # before FSDP
    apply_compile(model, cfg.train.compile)  # after checkpointing, before FSDP (torchtitan's order)
    if cfg.parallel.fsdp:
        param_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None
        reason = whole_experts_reason(cfg, par.dims)
        par.sharding = apply_fsdp(model, par.dims, device, param_dtype, whole_experts=reason is not None)
        par.fsdp_summary = fsdp_summary(par.dims, reason)
        par.shards = Shards()
    return par


def allocate_parallel(cfg: Config, device: torch.device) -> tuple[Transformer, Parallel]:
    """The configured model built on `meta`, parallelised (a collective when world > 1) and this
    rank's part allocated on `device` with its values NOT set: for a caller that then loads every
    tensor (a Hugging Face folder, an epmoe checkpoint)."""
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.router)
    par = parallelize(model, cfg, device)
    to_empty(model, device)
    return model, par
