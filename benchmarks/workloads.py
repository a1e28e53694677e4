"""The MoE layer the benchmarks time, its workloads, and timing of fwd+bwd steps in one process.

Every benchmark of one MoE layer (layer.py, overlap.py, peers.py) runs it on B x S = 8192 tokens
of d_model D = 512 per process, built from ModelConfig / RouterConfig as in training (dropless,
softmax top-k, batch aux loss on, module in training mode), on one of two workloads: coarse
(E=8, k=2, expert hidden 1024) and fine-grained (E=64, k=8, expert hidden 256). A step is
forward + backward: through the output with a fixed grad_output g_BSD and through the aux loss
with grad 1, as `loss + aux` would; time.perf_counter around it (CPU, so synchronous), grads set
to None before it (outside the timed region).

Shape key: B batch, S sequence, D d_model
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from epmoe.config import ModelConfig, RouterConfig
from epmoe.host_memory import retain_freed_host_memory
from epmoe.model.experts import MLP
from epmoe.model.moe import MoE

B, S, D = 8, 1024, 512  # 8192 tokens per process (per rank at EP=2)


@dataclass(frozen=True)
class Workload:
    name: str
    num_experts: int
    top_k: int
    expert_hidden: int


WORKLOADS = {
    "coarse": Workload("coarse", num_experts=8, top_k=2, expert_hidden=1024),
    "fine": Workload("fine", num_experts=64, top_k=8, expert_hidden=256),
}

Step = Callable[[], float]  # one timed fwd+bwd -> seconds


def autocast(dtype: torch.dtype | None) -> torch.autocast:
    """CPU autocast to `dtype`, or a disabled one for None (plain fp32)."""
    return torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def build_moe(wl: Workload, impl: str) -> MoE:
    """The MoE layer of `wl` with expert_impl `impl`, as training builds it, in training mode."""
    model_cfg = ModelConfig(
        d_model=D,
        num_experts=wl.num_experts,
        expert_hidden=wl.expert_hidden,
        activation="swiglu",
        n_shared_experts=0,
        expert_impl=impl,
    )
    router_cfg = RouterConfig(
        top_k=wl.top_k,
        score_func="softmax",
        aux_loss="batch",
        aux_loss_coef=0.01,
        z_loss_coef=0.0,
        capacity_factor=None,
    )
    return MoE(model_cfg, router_cfg).train()


def moe_step(moe: MoE, x_BSD: torch.Tensor, g_BSD: torch.Tensor, autocast_dtype: torch.dtype | None) -> Step:
    """One timed fwd+bwd of the MoE layer: output with grad g_BSD, aux loss with grad 1."""

    def step() -> float:
        moe.zero_grad(set_to_none=True)
        x_BSD.grad = None
        t0 = time.perf_counter()
        with autocast(autocast_dtype):
            y_BSD, routing = moe(x_BSD)
        torch.autograd.backward([y_BSD, routing.aux_loss], [g_BSD.to(y_BSD.dtype), torch.ones_like(routing.aux_loss)])
        return time.perf_counter() - t0

    return step


def dense_step(mlp: MLP, x_BSD: torch.Tensor, g_BSD: torch.Tensor, autocast_dtype: torch.dtype | None) -> Step:
    """One timed fwd+bwd of the dense floor with the same grad_output."""

    def step() -> float:
        mlp.zero_grad(set_to_none=True)
        x_BSD.grad = None
        t0 = time.perf_counter()
        with autocast(autocast_dtype):
            y_BSD = mlp(x_BSD)
        y_BSD.backward(g_BSD.to(y_BSD.dtype))
        return time.perf_counter() - t0

    return step


def median_ms(steps: dict[str, Step], warmup: int, timed: int) -> dict[str, float]:
    """Median ms per step of each entry; the entries take turns every step."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + timed):
        for name, step in steps.items():
            dt = step()
            if i >= warmup:
                times[name].append(dt)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: how far a variant's output is from the reference's."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def add_host_memory_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host-memory", choices=["retain", "release"], default="retain",
                        help="retain: freed host memory stays for reuse, as in training (epmoe/host_memory.py); "
                             "release: glibc's default (big blocks unmapped on free)")  # fmt: skip


def apply_host_memory_option(args: argparse.Namespace) -> None:
    if args.host_memory == "retain":
        retain_freed_host_memory()
