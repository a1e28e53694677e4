"""epmoe vs DeepSpeed-MoE vs the dense floor: forward + backward of one MoE layer.

What is measured, on the workloads of workloads.py (d=512, 8192 tokens per process; coarse: E=8,
k=2, expert hidden 1024; fine: E=64, k=8, expert hidden 256):

- `epmoe`: `epmoe.model.moe.MoE` as `build_moe` builds it (dropless, softmax top-k, batch aux loss).
  expert_impl=auto, the path training takes (see `auto_impl` in epmoe/model/experts.py). 1 process;
  2 ranks: EP=2 with the PipelinedDispatcher (`--chunks`, overlap on), and the same with a bf16
  payload.
- `deepspeed`: `deepspeed.moe.layer.MoE(hidden_size=512, expert=MLP, num_experts=E, ep_size, k,
  capacity_factor=1.25, eval_capacity_factor=1.25, min_capacity=4, drop_tokens=True,
  use_residual=False)`, its other options at their defaults. The expert is epmoe's `MLP`
  (SwiGLU, hidden = expert hidden): the same shape and activation as epmoe's experts. DeepSpeed
  pads every expert to its capacity (1.25 x k x T / E rows): it computes 1.25x the expert FLOPs
  on zero-padded slots and drops the overflow, while epmoe computes exactly the routed rows.
  k=8 (fine) takes DeepSpeed's general `topkgating`. ep_size=2: `deepspeed.init_distributed
  (dist_backend="gloo")` on the already initialised process group, then
  `MoE.set_deepspeed_parallelism()` builds its expert-parallel groups (deepspeed.utils.groups).
- `epmoe no-exchange` (2 ranks): an EP=2 rank's expert work with no exchange (rank_harness.py's
  `no_exchange_variant`): the floor of the EP rows, what EP would cost if the exchange were free;
- `dense`: the FLOP-equivalent floor, `epmoe.model.experts.MLP` (SwiGLU) with hidden = k x expert
  hidden; at 2 ranks it runs in both processes at once (the same core contention, no exchange).

1 process: torch's default thread count, as layer.py; 2 ranks: one gloo process per rank, one
thread each, on loopback (rank_harness.py, as overlap.py: a barrier before each step, outside the
timed region; step = the slower rank's time). All: time.perf_counter around fwd+bwd, backward
through the output with a fixed random grad_output and through the aux loss with grad 1, median
of `--steps` timed steps after `--warmup` untimed ones, the variants taking turns step by step.

Reading the table: `vs deepspeed` = DeepSpeed's step / this row's step (> 1: faster than
DeepSpeed); `vs dense` = this row's step / the dense floor's step (1.00: no overhead over a dense
layer of the same active size). At 2 ranks both are paired ratios (see overlap.py). Targets
(issue 6, 2 ranks): epmoe EP=2 with overlap >= 1.30x vs deepspeed and <= 1.10x vs dense.
Exchange columns as in overlap.py (2 ranks only).

NOTE: on a shared 2-core machine rows swing by 10% or more between runs; read the ratios.

    .venv/bin/python -m benchmarks.peers [--procs 1 2] [--workload coarse fine] [--steps 3] [--warmup 1]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from benchmarks.netns import Node
from benchmarks.rank_harness import (
    RESULTS,
    Context,
    Factory,
    barrier,
    check_args,
    dense_variant,
    epmoe_variant,
    forward_args,
    launch_ranks,
    markdown_table,
    no_exchange_variant,
    paired_ratio,
    rank_entry,
    rank_parser,
    step_metrics,
)
from benchmarks.workloads import WORKLOADS, B, D, S, Workload, build_moe, dense_step, median_ms, moe_step
from epmoe.model.experts import MLP

CAPACITY, MIN_CAPACITY = 1.25, 4
GOAL_VS_DEEPSPEED, GOAL_VS_DENSE = 1.30, 1.10


def deepspeed_moe(wl: Workload, ep_size: int) -> torch.nn.Module:
    """DeepSpeed's MoE layer with epmoe's SwiGLU MLP as the expert (same shape and activation)."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    torch.manual_seed(0)
    layer = DeepSpeedMoE(
        hidden_size=D,
        expert=MLP(D, wl.expert_hidden, "swiglu"),
        num_experts=wl.num_experts,
        ep_size=ep_size,
        k=wl.top_k,
        capacity_factor=CAPACITY,
        eval_capacity_factor=CAPACITY,
        min_capacity=MIN_CAPACITY,
        drop_tokens=True,
        use_residual=False,
    )
    if ep_size > 1:
        layer.set_deepspeed_parallelism()
    return layer.train()


def deepspeed_fwd_bwd(layer: torch.nn.Module, x_BSD: torch.Tensor, g_BSD: torch.Tensor) -> None:
    y_BSD, aux, _ = layer(x_BSD)
    torch.autograd.backward([y_BSD, aux], [g_BSD, torch.ones_like(aux)])


# --- 2 ranks ---


def deepspeed_variant(ctx: Context):
    layer = deepspeed_moe(ctx.wl, ep_size=2)

    def step() -> dict[str, float]:
        layer.zero_grad(set_to_none=True)
        ctx.x_BSD.grad = None
        barrier()
        t0 = time.perf_counter()
        deepspeed_fwd_bwd(layer, ctx.x_BSD, ctx.g_BSD)
        return step_metrics(time.perf_counter() - t0, [])  # its all-to-alls are not ours to time

    return step, None


def peer_variants(chunks: int) -> dict[str, Factory]:
    return {
        f"epmoe pipe-{chunks}": epmoe_variant(chunks),
        f"epmoe pipe-{chunks}-bf16": epmoe_variant(chunks, torch.bfloat16),
        "epmoe no-exchange": no_exchange_variant,
        "deepspeed": deepspeed_variant,
        "dense": dense_variant,
    }


def two_rank_rows(wl_name: str, rows: dict[str, dict[str, float]]) -> list[list[str]]:
    ds, dense = rows["deepspeed"], rows["dense"]
    return [
        ["2 ranks, EP=2", wl_name, name, f"{r['step']:.0f}", f"{paired_ratio(ds, r):.2f}x",
         f"{paired_ratio(r, dense):.2f}",
         f"{r['exchange']:.0f}" if r["exchange"] else "-", f"{r['exposed']:.0f}" if r["exchange"] else "-"]
        for name, r in rows.items()
    ]  # fmt: skip


# --- 1 process ---


def one_process_rows(wl_name: str, warmup: int, timed: int) -> list[list[str]]:
    wl = WORKLOADS[wl_name]
    torch.manual_seed(0)
    x_BSD = torch.randn(B, S, D, requires_grad=True)
    g_BSD = torch.randn(B, S, D)
    moe = build_moe(wl, "auto")
    ds = deepspeed_moe(wl, ep_size=1)
    dense = MLP(D, wl.top_k * wl.expert_hidden, "swiglu")

    def ds_step() -> float:
        ds.zero_grad(set_to_none=True)
        x_BSD.grad = None
        t0 = time.perf_counter()
        deepspeed_fwd_bwd(ds, x_BSD, g_BSD)
        return time.perf_counter() - t0

    steps = {"epmoe (auto)": moe_step(moe, x_BSD, g_BSD, None), "deepspeed": ds_step}
    steps["dense"] = dense_step(dense, x_BSD, g_BSD, None)
    ms = median_ms(steps, warmup, timed)
    return [
        ["1 process", wl_name, name, f"{t:.0f}", f"{ms['deepspeed'] / t:.2f}x", f"{t / ms['dense']:.2f}", "-", "-"]
        for name, t in ms.items()
    ]


HEADER = ["setting", "workload", "variant", "step ms", "vs deepspeed", "vs dense", "exchange ms", "exposed ms"]


def main() -> None:
    parser = rank_parser(__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", choices=[1, 2], default=[1, 2])
    parser.add_argument("--chunks", type=int, default=2, help="chunks of the pipelined epmoe variant at 2 ranks")
    args = parser.parse_args()
    check_args(parser, args)
    variants = peer_variants(args.chunks)
    if args.rank is not None:
        import deepspeed

        def entry() -> None:
            deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # wraps the group rank_entry made

        rank_entry(args, variants, after_init=entry)
        return

    print(f"torch {torch.__version__}; tokens/process {B}x{S}, d_model {D}; median of {args.steps} steps after "
          f"{args.warmup} warm-up", flush=True)  # fmt: skip
    rows, verdicts = [], []
    if 1 in args.procs:
        for wl_name in args.workload:
            rows += one_process_rows(wl_name, args.warmup, args.steps)
            print(rows[-3:], flush=True)
    if 2 in args.procs:
        summary = launch_ranks(__spec__.name, [Node(), Node()], forward_args(args, ["--chunks", str(args.chunks)]),
                               args.timeout)  # fmt: skip
        for wl_name, s in summary["workloads"].items():
            r = s["rows"]
            rows += two_rank_rows(wl_name, r)
            for name in r:
                if name.startswith("epmoe pipe"):
                    vs_ds, vs_dense = paired_ratio(r["deepspeed"], r[name]), paired_ratio(r[name], r["dense"])
                    verdicts.append(
                        f"2 ranks/{wl_name}/{name}: {vs_ds:.2f}x vs deepspeed (target >= {GOAL_VS_DEEPSPEED:.2f}x: "
                        f"{'met' if vs_ds >= GOAL_VS_DEEPSPEED else 'MISSED'}), {vs_dense:.2f} vs the dense floor "
                        f"(target <= {GOAL_VS_DENSE:.2f}: {'met' if vs_dense <= GOAL_VS_DENSE else 'MISSED'})"
                    )
    table = markdown_table(HEADER, rows)
    print("\n" + table + "\n\n" + "\n".join(verdicts), flush=True)
    RESULTS.mkdir(exist_ok=True)
    command = "python -m benchmarks.peers " + " ".join(sys.argv[1:])
    (RESULTS / "peers.md").write_text(
        f"# epmoe vs DeepSpeed-MoE vs the dense floor (one MoE layer, fwd+bwd)\n\n`{command.strip()}`; torch "
        f"{torch.__version__}; median of {args.steps} steps after {args.warmup} warm-up; times in ms. See the "
        f"docstring of benchmarks/peers.py for what each column measures.\n\n{table}\n\n"
        + "\n".join(f"- {line}" for line in verdicts)
        + "\n"
    )
    plot(rows, RESULTS / "peers.png")
    print(f"wrote {RESULTS / 'peers.md'} and {RESULTS / 'peers.png'}")


def plot(rows: list[list[str]], path: Path) -> None:
    """One panel per (setting, workload): step ms per variant, the dense floor as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, str], dict[str, float]] = {}
    for setting, wl, name, step, *_ in rows:
        panels.setdefault((setting, wl), {})[name] = float(step)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, ((setting, wl), steps) in zip(axes[0], panels.items()):
        names = [n for n in steps if n != "dense"]
        ax.bar(names, [steps[n] for n in names], color=["C0" if n.startswith("epmoe") else "C1" for n in names])
        ax.axhline(steps["dense"], color="k", linestyle="--", label="dense floor")
        ax.set_title(f"{setting} / {wl}")
        ax.set_ylabel("ms per fwd+bwd (median)")
        ax.tick_params(axis="x", rotation=30)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
