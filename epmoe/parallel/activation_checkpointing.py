"""Activation checkpointing (train.activation_checkpointing), applied to a built model from outside.

- `full`: every transformer Block keeps only its inputs; backward runs its forward again
  (torch.utils.checkpoint, non-reentrant) and differentiates that.
- `selective`: the same recomputation, op by op: the outputs of matmuls (mm, addmm, bmm, the
  experts' grouped GEMM) and of attention kernels are kept from the forward, the cheap
  element-wise work between them (norms, activations, softmax, RoPE, permutation gathers) is
  recomputed (`create_selective_checkpoint_contexts`, the policy torchtitan's `_save_list` has).
  Op-level rather than every other block, because it composes with our MoE layer as it is: the
  policy is a pure function of the op, so forward and recomputation decide alike; the MoE's
  data-dependent shapes (splits, segments) come out the same on recomputation, so the kept outputs
  are consumed in the order they were stored; inside a custom autograd Function (the fused
  experts, grad off) nothing is kept, as that Function saves what it needs itself. What it cannot
  keep are the exchanges: they are in-place collectives into receive buffers, which torch's op
  cache cannot replay, so the recomputed forward exchanges again, as under `full` (every other
  block would spare half of those exchanges, but keep every activation of the other half).

How: each Block gets a per-instance `forward` that calls torch.utils.checkpoint on the class's
forward. No wrapper module: parameter names (`blocks.0.ffn.experts.w_gate_EDF`), which checkpoints,
expert-weight lookups and FSDP key everything by, stay as they are; the model stays single-device.
It is applied before FSDP2 shards the blocks: FSDP's pre-forward hook gathers a block's weights
around the whole checkpointed call, its pre-backward hook gathers them again before the block's
backward unpacks its first saved tensor, which is what starts the recomputation.

What a recomputed MoE forward repeats, and why it changes no loss and no reported metric:
1. routing: recomputed from the same input and weights (the bias moves only after the step), so
   the same experts and weights; non-reentrant checkpoint checks each recomputed saved tensor's
   shape and dtype against the forward's. Under data parallelism the batch aux loss's `rank_mean`
   all-reduce runs again on every rank, in the same order, over the same values.
2. the exchanges (AllToAllDispatcher, PipelinedDispatcher): the counts all-to-all (a host sync)
   and the row all-to-alls run again, on every rank in the same block order (every rank
   recomputes the same blocks in the same backward). They have no side effect but their time.
3. the router's aux-loss-free bias update, the routing statistics (hooks.py callbacks,
   routing_stats.py, the rebalancer's window), the drop counters and the aux / z losses in the
   step's metrics are all read from the `Routing` objects the *first* forward returned
   (train/step.py); a recomputed forward's routings are discarded by torch, never returned.
4. exchange timers (timing.py LayerTimer): the recomputed forward runs `paused()`: a step reports
   one forward's exchanges and expert calls per layer, as without checkpointing; the recomputation's
   cost shows in the step time (tokens/s, MFU).
5. the chunk tuner changes `chunks` only between steps, so forward and recomputation cut alike.
6. the pipelined dispatcher differentiates its expert graphs with nested autograd.grad calls;
   torch would recompute the block once per such call, so those graphs save their own tensors
   (comm/pipelined.py, `_kept_saved_tensors`): under PipelinedDispatcher the routed experts'
   activations are kept, the rest of the block is recomputed once.
Nothing is checkpointed under no_grad (evaluation, generation): the plain forward runs.
train.engine=deepspeed works unchanged (ZeRO 1/2 reduce through parameter gradient hooks, which a
recomputation does not touch; tests/test_activation_checkpointing.py runs ZeRO 2 at EP 2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from epmoe.choices import ActivationCheckpointing
from epmoe.parallel.timing import LayerTimer

aten = torch.ops.aten
# selective: the ops whose outputs are kept (expensive to recompute, one output each to store)
KEPT_OPS = {
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten._grouped_mm.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}


def _keep_matmuls(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    # NOTE: only where autograd records the op: inside a custom Function's forward (the fused
    # experts, grad off) an output kept here would be held for nothing, the Function saves its own
    if func in KEPT_OPS and torch.is_grad_enabled():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_keep_matmuls)


class Recomputed:
    """A Block's forward that backward recomputes (see the module docstring); callable as the forward."""

    def __init__(self, forward: Callable[..., Any], mode: ActivationCheckpointing, timers: Sequence[LayerTimer]):
        """forward: the block's own (bound) forward; timers: paused while it is recomputed."""
        self.forward, self.mode, self.timers = forward, mode, list(timers)
        self.context_fn = _selective_contexts if mode == ActivationCheckpointing.selective else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # nothing is saved for backward: nothing to recompute
            return self.forward(*args, **kwargs)
        calls = 0

        def run(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:  # the step's forward
                return self.forward(*args, **kwargs)
            with contextlib.ExitStack() as paused:  # a recomputation, in backward
                for timer in self.timers:
                    paused.enter_context(timer.paused())
                return self.forward(*args, **kwargs)

        extra = {"context_fn": self.context_fn} if self.context_fn is not None else {}
        return checkpoint(run, *args, use_reentrant=False, **extra, **kwargs)


def apply_activation_checkpointing(
    model: nn.Module, mode: ActivationCheckpointing, timers: Sequence[LayerTimer] = ()
) -> None:
    """Make every Block of `model.blocks` recompute its forward in backward (`mode` full or
    selective; none leaves the model as it is). timers: the model's exchange timers, paused during
    recomputation. Before FSDP2 (see the module docstring); applying it twice is an error."""
    if mode == ActivationCheckpointing.none:
        return
    for i, block in enumerate(model.blocks):
        if isinstance(block.forward, Recomputed):  # our own type: a second apply would nest checkpoints
            raise ValueError(f"activation checkpointing is already applied to block {i}")
        block.forward = Recomputed(block.forward, mode, timers)
