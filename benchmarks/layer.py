"""MoE layer vs dense floor: forward + backward of one MoE layer against a FLOP-equivalent dense MLP.

What is measured, in one process on the same tokens x_BSD (B=8, S=1024, D=512, requires_grad):

- MoE: `epmoe.model.moe.MoE` built from ModelConfig / RouterConfig as in training (dropless,
  softmax top-k, batch aux loss on, module in training mode). Backward runs through the output
  with a fixed random grad_output g_BSD and through the aux loss with grad 1, as `loss + aux`
  would. All expert paths run on identical weights (hence identical routing): `fused`
  (per-expert gather -> FFN -> weighted scatter, no sorted rows), `grouped` (sorted rows,
  torch._grouped_mm) and `loop` (sorted rows, the for-loop reference).
- dense floor: `epmoe.model.experts.MLP` (SwiGLU) with hidden = top_k x expert_hidden. Each token
  then does the same matmul FLOPs as in the MoE's experts (T*k rows of D -> F -> D vs T rows of
  D -> k*F -> D); the MoE adds only the router's D x E gate (<= 1% here), so any gap is overhead.

Workloads: coarse (E=8, k=2, expert hidden 1024) and fine-grained (E=64, k=8, expert hidden 256),
8192 tokens each; both have a dense floor of hidden 2048. Rows in fp32, and in bf16 autocast
(torch.autocast("cpu", dtype=torch.bfloat16)) against the bf16-autocast dense floor.

Timing: time.perf_counter around fwd+bwd (CPU, so synchronous), grads set to None between steps
(outside the timed region), median of `--steps` timed steps after `--warmup` untimed ones. The
paths of one (workload, dtype) take turns step by step so that drift in machine load hits them
alike. torch's default thread count.

Reading the table: ratio = MoE median / dense-floor median. 1.00 means routing, permutation and
the grouped GEMM cost nothing beyond the matmuls a dense layer of the same active size does.
Goal: ratio <= 1.10 for the path `expert_impl=auto` takes for that row (marked *: on CPU
`fused` when the sorted rows would reach 32 MB, else `loop`); it must stay <= 1.25. The other
paths are shown for comparison.

NOTE: the sorted-rows paths materialise (T*k, D) rows (permuted inputs, expert outputs and their
grads), k times the dense layer's (T, D). glibc serves tensors over 32 MB with fresh mmaps that are
page-faulted in on every step, so on CPU much of their overhead is allocation, not arithmetic: the
reason for the fused path. Measured as it is, with the default allocator. On a shared VM, rows can
swing by 10% or more between runs.

    .venv/bin/python -m benchmarks.layer [--steps 5] [--warmup 2] [--workload all] [--dtype all]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.workloads import (
    WORKLOADS,
    B,
    D,
    S,
    Workload,
    add_host_memory_option,
    apply_host_memory_option,
    autocast,
    build_moe,
    dense_step,
    max_rel_diff,
    median_ms,
    moe_step,
)
from epmoe.model.experts import MLP, auto_impl

GOAL, LIMIT = 1.10, 1.25
DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # None: no autocast
PATHS = ("fused", "grouped", "loop")


def bench(wl: Workload, dtype_name: str, warmup: int, timed: int) -> list[tuple[str, float, float]]:
    """(path, MoE median ms, dense median ms) for one workload and dtype."""
    autocast_dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    x_BSD = torch.randn(B, S, D, requires_grad=True)
    g_BSD = torch.randn(B, S, D)
    moes = {path: build_moe(wl, path) for path in PATHS}
    for path in PATHS[1:]:  # same weights -> same routing and work
        moes[path].load_state_dict(moes[PATHS[0]].state_dict())
    dense = MLP(D, wl.top_k * wl.expert_hidden, "swiglu")

    # sanity: all paths compute the same layer (a benchmark of a wrong result is worthless)
    with torch.no_grad(), autocast(autocast_dtype):
        y_loop, routing = moes["loop"](x_BSD)
        diffs = {path: max_rel_diff(moes[path](x_BSD)[0], y_loop) for path in PATHS if path != "loop"}
    counts_E = routing.counts_E.float()
    print(
        f"{wl.name}/{dtype_name}: max rel diff vs loop "
        + ", ".join(f"{path} {d:.1e}" for path, d in diffs.items())
        + f"; expert load max/mean {(counts_E.max() / counts_E.mean()).item():.2f}",
        flush=True,
    )
    del y_loop, routing

    steps = {path: moe_step(moes[path], x_BSD, g_BSD, autocast_dtype) for path in PATHS}
    steps["dense"] = dense_step(dense, x_BSD, g_BSD, autocast_dtype)
    ms = median_ms(steps, warmup, timed)
    return [(path, ms[path], ms["dense"]) for path in PATHS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path (median taken)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per path first")
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--dtype", choices=[*DTYPES, "all"], default="all")
    add_host_memory_option(parser)
    args = parser.parse_args()
    apply_host_memory_option(args)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps ({args.steps}) must be >= 1 and --warmup ({args.warmup}) >= 0")

    workloads = list(WORKLOADS) if args.workload == "all" else [args.workload]
    dtypes = list(DTYPES) if args.dtype == "all" else [args.dtype]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; tokens {B}x{S}, d_model {D}; "
        f"median of {args.steps} steps after {args.warmup} warm-up",
        flush=True,
    )
    rows = []
    for wl_name in workloads:
        for dtype_name in dtypes:
            for path, moe_ms, dense_ms in bench(WORKLOADS[wl_name], dtype_name, args.warmup, args.steps):
                rows.append((wl_name, dtype_name, path, moe_ms, dense_ms, moe_ms / dense_ms))

    header = f"{'workload':<9} {'dtype':<5} {'path':<9} {'median ms':>10} {'dense ms':>9} {'MoE/dense':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for wl_name, dtype_name, path, moe_ms, dense_ms, ratio in rows:
        wl, row_bytes = WORKLOADS[wl_name], D * (4 if DTYPES[dtype_name] is None else 2)
        default_path = auto_impl(torch.device("cpu"), B * S * wl.top_k * row_bytes)  # what training runs
        mark = ""
        if path == default_path:
            mark = "  ok" if ratio <= GOAL else ("  above goal" if ratio <= LIMIT else "  OVER LIMIT")
        label = path + ("*" if path == default_path else "")
        print(f"{wl_name:<9} {dtype_name:<5} {label:<9} {moe_ms:>10.1f} {dense_ms:>9.1f} {ratio:>9.2f}{mark}")
    print(f"\n* the path expert_impl=auto takes here; goal MoE/dense <= {GOAL:.2f}, limit <= {LIMIT:.2f}")


if __name__ == "__main__":
    main()
