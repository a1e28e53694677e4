"""torch.compile (train.compile=true), applied to a built model from outside: each transformer Block
is compiled with inductor, in place, the way torchtitan compiles per block.

How: `block.compile()` per Block (nn.Module.compile: the module's own call is compiled, no
wrapper), so parameter names (`blocks.0.ffn.experts.w_gate_EDF`), which checkpoints, expert-weight
lookups and FSDP key everything by, stay as they are (no `_orig_mod.` prefix). Order in
parallelize (torchtitan's): expert parallelism, activation checkpointing, then compile, then FSDP2.

The MoE layer's dispatch runs eager: every MoE layer's `dispatch` (moe.py, the dispatcher's call on
its experts) is shadowed per instance by a `torch.compiler.disable`d one. The dispatch is where the
data decides the shapes (rows per expert, split sizes) and where the host syncs are; inside a
compiled region each would break the graph at an arbitrary point (or need unbacked symbolic sizes
for every segment). Kept out, and with dynamo's nested graph breaks (a break two frames down cuts
only its own frame), a MoE block compiles as exactly two graphs: attention + norms + router (top-k,
weights, aux and z losses, the batch aux loss's all-reduce), then the tail (ascend, + shared
experts' output, the residual add).

Graph breaks of one MoE block (forward; torch 2.13; `torch._dynamo.explain` of block 0 of the tiny
test model on 2 gloo ranks: `python -m benchmarks.compile_report`), before -> after this module:

| dispatcher                 | graphs  | breaks  | before: why                                         |
|----------------------------|---------|---------|-----------------------------------------------------|
| LocalDispatcher (1 process)| 12 -> 2 | 11 -> 1 | bincount (router, permutation), `.tolist()` sizes    |
| AllToAllDispatcher (EP 2)  | 27 -> 2 | 26 -> 1 | + the counts' host sync, collectives (async_op), timing hooks |
| PipelinedDispatcher (EP 2) | 35 -> 2 | 34 -> 1 | + its plan's host arithmetic, handles, its autograd Function |
| AllToAll + FSDP2 (EP 2)    |  -> 2   |  -> 1   | (fully_shard's hooks add none)                      |

Before, each break also split the enclosing frames (Block, MoE), hence the many graphs. What was
removed: the router's counts are a scatter-add (router.py `count_ids`; torch.bincount's output
length depends on the data), and everything of the dispatch is out of the graphs. The one break
left, the eager dispatch, cannot go: an exchange needs its split sizes on the host before it can
start (a host sync by nature), and every size after it depends on the data (the local experts'
loop path splits by `.tolist()` sizes too). Dense blocks compile whole, with no break. The batch
aux loss's rank_mean (data_parallel.py, an in-place all_reduce) adds no break: dynamo traces it
as a functional collective.

Interactions:
- activation checkpointing (train.activation_checkpointing != none) is refused with compile
  (epmoe/validate.py): dynamo traces torch.utils.checkpoint as one higher-order op that may have no
  side effects and no graph break inside, and a checkpointed block has both (the recomputation
  counter that pauses the exchange timers, activation_checkpointing.py; the eager dispatch). torch
  2.13 then runs the whole block eager ("HOP: Unsafe side effect"): nothing would be compiled.
- FSDP2: fully_shard's hooks run outside the compiled block (dynamo skips FSDP hooks), compile
  goes before fully_shard as in torchtitan.
- evaluation and generation run the compiled blocks too, with graphs of their own (no grad, other
  shapes; generation's growing KV cache recompiles until dynamo marks the length dynamic). Not
  exercised by tests/test_compile.py, which trains without them to keep compile time down.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from epmoe.model.moe import MoE, moe_layers


def apply_compile(model: nn.Module, enabled: bool) -> None:
    """Compile every Block of `model.blocks` in place with inductor (enabled=False: nothing), each
    MoE layer's dispatch left eager; see the module docstring. After activation checkpointing, before FSDP2."""
    if not enabled:
        return
    # NOTE: process-wide dynamo setting (torchtitan sets dynamo's config in its apply_compile too):
    # the eager dispatch, two frames down (Block -> MoE), breaks only the graph of the frame it is in,
    # so a MoE block is 2 graphs instead of 4 (Block and MoE each cut in two)
    torch._dynamo.config.nested_graph_breaks = True
    eager_dispatch(model)
    for block in model.blocks:
        block.compile()


def eager_dispatch(model: nn.Module) -> None:
    """Keep every MoE layer's dispatch (the dispatcher's call on its experts) out of compiled graphs."""
    for moe in moe_layers(model):
        # NOTE: an instance attribute shadows MoE.dispatch, bound to one function for every layer:
        # dynamo guards on the function's identity, and a function per layer would compile every
        # block anew (and past torch's recompile limit, 8, leave the rest eager)
        moe.dispatch = types.MethodType(_eager_dispatch(), moe)


@functools.cache
def _eager_dispatch() -> Callable[..., Any]:
    """MoE.dispatch, never traced (recursive: neither the dispatcher nor the experts it calls, their
    timing hooks included). Made on first use: torch.compiler imports dynamo, 1.5 s a process."""
    return torch.compiler.disable(MoE.dispatch, recursive=True)
