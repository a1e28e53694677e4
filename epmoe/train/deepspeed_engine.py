"""train.engine=deepspeed: the same model and step, updated through `deepspeed.initialize`.

Setting up (`DeepSpeedEngine.__init__`):
1. DeepSpeed's expert-parallel and expert-data-parallel groups are built by its own helper
   (named `ep_size_<ep>`) and checked against ParallelDims' layout: the same ranks or an error.
2. Expert weights are marked as MoE parameters (allreduce=False, group_name) and the optimizer's
   groups split into MoE groups, so ZeRO partitions them over, and reduces their gradients in,
   the expert-data-parallel group only (sum / world: the rule of parallel/gradients.py).
3. Our MoE layers are marked as DeepSpeed MoE layers. NOTE: the engine decides that a model has
   MoE layers by isinstance(module, deepspeed.moe.layer.MoE) and otherwise reduces expert
   gradients over every rank; the mark is a subclass of both, with DeepSpeed's group set-up
   made a no-op (step 1 did it).
4. The DeepSpeed config is derived from ours (`deepspeed_config`): micro-batch, accumulation,
   ZeRO stage, clipping, and bf16 as torch autocast over fp32 weights (our precision=bf16).
   Clipping at stage 0 is ours: DeepSpeed's stage-0 clip under MoE averages per-rank norms,
   which is not the global norm; ZeRO 1/2 count every expert once, as we do.
Checkpoints stay ours: `portable()` gathers DeepSpeed's partitioned AdamW state into a native
AdamW layout, `load_portable()` scatters it back.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from epmoe.comm.process import ensure_process_group
from epmoe.config import ConfigError, TrainConfig
from epmoe.model.moe import MoE, moe_layers
from epmoe.model.transformer import LMOutput, Transformer
from epmoe.parallel.gradients import clip_global_norm_, split_params
from epmoe.parallel.parallelize import Parallel
from epmoe.train.engine import build_optimizer, build_schedule, max_grad_norm

ADAM_STATE = ("exp_avg", "exp_avg_sq")


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """DeepSpeed's JSON config for our train config."""
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip if cfg.zero_stage > 0 else 0.0,  # stage 0: ours (see above)
        "zero_optimization": {"stage": cfg.zero_stage},
        # fp32 weights, bf16 compute, gradients reduced in fp32: what precision=bf16 does natively
        "torch_autocast": {"enabled": cfg.precision == "bf16", "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "steps_per_print": 2**31 - 1,  # our loggers report; DeepSpeed's would interleave
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """An engine (engine.py) over DeepSpeed's: ZeRO 0/1/2, MoE parameter groups."""

    def __init__(self, model: Transformer, cfg: TrainConfig, par: Parallel, device: torch.device) -> None:
        try:
            import deepspeed
            from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
        except ImportError:
            raise ConfigError("train.engine=deepspeed needs DeepSpeed: pip install 'epmoe[deepspeed]'") from None
        deepspeed.utils.logger.setLevel(logging.WARNING)  # our loggers report the run; its INFO lines would interleave
        if par.info.world == 1:
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asks a launcher for it; one process is rank 0
            ensure_process_group()
        deepspeed.init_distributed(dist_init_required=False)  # DeepSpeed's comm layer over our process group
        self.model, self.cfg, self.par = model, cfg, par
        if par.dims.ep_enabled:
            group_name = _expert_groups(par)
            _mark_expert_params(model, group_name)
            _mark_moe_layers(model, par.dims.num_experts)
        groups = [{**g, "name": f"group{i}"} for i, g in enumerate(build_optimizer(model, cfg).param_groups)]
        groups = [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]
        client = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self.scheduler = build_schedule(client, cfg)  # stepped by us, not by DeepSpeed
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=client, config=deepspeed_config(cfg), dist_init_required=False
        )
        self.client = client
        self._norm = math.nan

    @property
    def lr(self) -> float:
        return self.client.param_groups[0]["lr"]

    @property
    def zero(self) -> bool:
        return self.cfg.zero_stage > 0

    def forward(self, x_BS: torch.Tensor, doc_ids_BS: torch.Tensor | None = None) -> LMOutput:
        return self.ds(x_BS, doc_ids_BS=doc_ids_BS)  # torch_autocast in the config: DeepSpeed autocasts the forward

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)  # loss is already / grad_accum
        if not last:
            self.ds.step()  # not a boundary: DeepSpeed only counts the micro-step

    def prepare(self) -> float | None:
        if self.zero:
            return None  # ZeRO clips inside its step, with the norm it computes there
        # DeepSpeed reduced the gradients in backward
        self._norm = clip_global_norm_(self.model, self.par.dims, max_grad_norm(self.cfg))
        return self._norm

    def update(self) -> tuple[bool, float]:
        self.ds.step()
        if self.zero:  # NOTE: ZeRO discards a step whose gradient norm is not finite ("overflow")
            # NOTE: host sync: the step's metrics and the finite check read the norm
            return not self.optimizer.overflow, float(self.ds.get_global_grad_norm())
        return True, self._norm

    def skip(self) -> float | None:
        # a non-finite loss has non-finite gradients, which ZeRO's step discards itself
        if not self.zero:
            for p in self.model.parameters():
                p.grad = None  # AdamW leaves parameters without gradients alone
        self.ds.step()  # also keeps DeepSpeed's micro-step count with ours
        return float(self.ds.get_global_grad_norm()) if self.zero else self._norm

    def schedule_step(self) -> None:
        self.scheduler.step()

    def portable(self) -> tuple[torch.optim.Optimizer, LRScheduler]:
        """A native AdamW and schedule holding this engine's state (collective under ZeRO)."""
        view = build_optimizer(self.model, self.cfg)
        step = self._adam_step()
        if step > 0:  # before the first update AdamW has no state
            if self.zero:
                self._link_zero_state()
            for p in self.model.parameters():
                view.state[p] = {"step": torch.tensor(float(step)), **{k: self._full_state(p, k) for k in ADAM_STATE}}
        schedule = build_schedule(view, self.cfg)
        state, n = self.scheduler.state_dict(), len(view.param_groups)
        # NOTE: every group has the same base lr, so the native layout keeps the first n entries
        schedule.load_state_dict({**state, "base_lrs": state["base_lrs"][:n], "_last_lr": state["_last_lr"][:n]})
        for g in view.param_groups:
            g["lr"] = self.lr
        return view, schedule

    def load_portable(self, optimizer: torch.optim.Optimizer, scheduler: LRScheduler) -> None:
        """Take the state that checkpoint_state.restore loaded into `portable()`'s optimizer and schedule."""
        if self.zero:  # the model's weights were loaded; ZeRO's fp32 master partitions are copies
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

            for p in self.model.parameters():
                safe_set_full_fp32_param(p, p.detach().float())
        states = [optimizer.state[p] for p in self.model.parameters() if p in optimizer.state]
        if states:
            step = float(states[0]["step"])
            if self.zero:
                self._create_zero_state(step)
                for p in self.model.parameters():
                    for k in ADAM_STATE:
                        safe_set_full_optimizer_state(p, optimizer.state[p][k], k)
            else:
                for p in self.model.parameters():
                    self.client.state[p] = {k: v.clone() for k, v in optimizer.state[p].items()}
        self.scheduler.last_epoch = scheduler.last_epoch
        self.scheduler._step_count = scheduler._step_count
        for g in self.client.param_groups:
            g["lr"] = optimizer.param_groups[0]["lr"]

    def _adam_step(self) -> int:
        """AdamW's step count (updates applied); the same in every group."""
        states = self.client.state.values()
        return int(next(iter(states))["step"]) if states else 0

    def _full_state(self, p: torch.nn.Parameter, key: str) -> torch.Tensor:
        if self.zero:  # NOTE: a collective over p's (expert-)data-parallel group
            from deepspeed.utils import safe_get_full_optimizer_state

            return safe_get_full_optimizer_state(p, key).clone()
        return self.client.state[p][key].clone()

    def _create_zero_state(self, step: float) -> None:
        """AdamW's state over ZeRO's flat fp32 partitions, zeroed, linked to the parameters'
        fragments. NOTE: AdamW creates it at its first step; a resumed run needs it before."""
        for flat in self.optimizer.single_partition_of_fp32_groups:
            self.client.state[flat] = {"step": torch.tensor(step), **{k: torch.zeros_like(flat) for k in ADAM_STATE}}
        self._link_zero_state()

    def _link_zero_state(self) -> None:
        """Point every parameter's fragment at its slice of AdamW's flat state.
        NOTE: DeepSpeed links once, right after its first group's first update, when the other
        groups (our MoE groups among them) have no state yet; linking again fixes that."""
        self.optimizer._hp_optimizer_states_linked = False
        self.optimizer._lazy_init_hp_params_optimizer_state()


def _expert_groups(par: Parallel) -> str:
    """Build DeepSpeed's expert and expert-data-parallel groups; check them against ours."""
    from deepspeed.utils import groups

    name = f"ep_size_{par.dims.ep}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(par.dims.ep)  # NOTE: a collective (new_group on every rank)
    rank = par.info.rank
    theirs = (
        list(groups._get_expert_parallel_group_ranks(name)),
        list(groups._get_expert_data_parallel_group_ranks(name)),
    )
    ours = (par.dims.ep_ranks(rank), par.dims.expert_dp_ranks(rank))
    if theirs != ours:
        raise RuntimeError(f"DeepSpeed's (EP, expert-DP) groups of rank {rank} are {theirs}, ours {ours}")
    return name


def _mark_expert_params(model: Transformer, group_name: str) -> None:
    _, expert = split_params(model)
    for p in expert:
        p.allreduce = False  # deepspeed.moe.utils.is_moe_param
        p.group_name = group_name


@functools.cache
def _marked(cls: type[MoE]) -> type[MoE]:
    """`cls`, and a DeepSpeed MoE layer to the engine's isinstance checks (one class per cls)."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
        pass  # the groups exist already (_expert_groups)

    methods = {"set_deepspeed_parallelism": set_deepspeed_parallelism}
    return type(f"DeepSpeedMarked{cls.__name__}", (cls, DeepSpeedMoE), methods)


def _mark_moe_layers(model: Transformer, num_experts: int) -> None:
    for moe in moe_layers(model):
        moe.__class__ = _marked(type(moe))  # our forward and state first in the method order
        moe.num_experts = num_experts  # what the engine reads of a DeepSpeed MoE layer
