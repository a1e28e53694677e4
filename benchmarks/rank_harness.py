"""Two expert-parallel ranks on one machine: the harness overlap.py and peers.py share.

`launch_ranks` starts one process per rank (`python -m <script> --rank r ...`, on loopback or in
the network namespaces of netns.py); each joins a gloo group (`rank_entry`), builds the script's
variants on the same weights and tokens (`Context`, a `Factory` per variant) and times them
(`run_rank`): a barrier before every step, outside the timed region, the variants taking turns
step by step. A TimedCommunicator records every all-to-all of the epmoe variants; `step_metrics`
turns a step's records into step / exchange / exposed / compute (defined in overlap.py's
docstring). Rank 0 writes the summary, one row per variant: the median over steps of the
slower rank's step, and the per-round steps that `paired_ratio` pairs.

Shape key: B batch, S sequence, D d_model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.netns import Node
from benchmarks.workloads import (
    WORKLOADS,
    B,
    D,
    S,
    Workload,
    add_host_memory_option,
    apply_host_memory_option,
    build_moe,
    max_rel_diff,
)
from epmoe.comm.communicator import TorchCommunicator
from epmoe.comm.parallel_dims import ParallelDims
from epmoe.comm.pipelined import PipelinedDispatcher
from epmoe.comm.timing import Exchange, TimedCommunicator, union_seconds
from epmoe.launch.commands import free_port
from epmoe.model.experts import MLP
from epmoe.model.moe import MoE
from epmoe.parallel.expert_parallel import apply_expert_parallel

WORLD = 2
REPO = Path(__file__).resolve().parents[1]  # the rank processes run here, so `benchmarks` imports
RESULTS = Path(__file__).parent / "results"
METRICS = ("step", "exchange", "exposed", "compute", "mb_sent")


# --- timing the exchanges ---


def step_metrics(seconds: float, log: list[Exchange]) -> dict[str, float]:
    exposed = sum(ex.blocked for ex in log)
    return {
        "step": seconds,
        "exchange": union_seconds([(ex.issued, ex.done) for ex in log if ex.done < float("inf")]),
        "exposed": exposed,
        "compute": seconds - exposed,
        "mb_sent": sum(ex.wire_bytes for ex in log) / 1e6,
    }


# --- the variants a rank runs ---


@dataclass
class Context:
    """What every variant of one workload shares on this rank."""

    wl: Workload
    rank: int
    comm: TimedCommunicator
    x_BSD: torch.Tensor
    g_BSD: torch.Tensor


Step = Callable[[], dict[str, float]]  # one timed fwd+bwd -> metrics
Factory = Callable[[Context], tuple[Step, Callable[[], torch.Tensor]]]  # -> (step, no-grad forward)


def barrier() -> None:
    dist.barrier()


def _moe_steps(moe: MoE, ctx: Context) -> tuple[Step, Callable[[], torch.Tensor]]:
    def step() -> dict[str, float]:
        moe.zero_grad(set_to_none=True)
        ctx.x_BSD.grad = None
        barrier()
        ctx.comm.log.clear()
        t0 = time.perf_counter()
        y_BSD, routing = moe(ctx.x_BSD)
        torch.autograd.backward([y_BSD, routing.aux_loss], [ctx.g_BSD, torch.ones_like(routing.aux_loss)])
        return step_metrics(time.perf_counter() - t0, ctx.comm.log)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return moe(ctx.x_BSD)[0]

    return step, forward


def epmoe_variant(chunks: int | None, payload: torch.dtype | None = None) -> Factory:
    """epmoe EP=2: chunks None = AllToAllDispatcher, else PipelinedDispatcher(chunks)."""

    def make(ctx: Context):
        torch.manual_seed(0)  # the same full layer on every rank and in every variant
        moe = build_moe(ctx.wl, "auto")
        dims = ParallelDims(world=WORLD, dp=WORLD, ep=WORLD, num_experts=ctx.wl.num_experts)
        apply_expert_parallel(moe, dims, ctx.rank, comm=ctx.comm, chunks=chunks)
        if payload is not None:
            moe.dispatcher = PipelinedDispatcher(moe.dispatcher.slot_of_expert_E, ctx.comm, chunks, payload)
        return _moe_steps(moe, ctx)

    return make


def no_exchange_variant(ctx: Context):
    """An EP=2 rank's expert work without the exchange: a one-device MoE of E/2 experts (a rank's
    share), the same top-k, on this rank's tokens. It computes as many routed rows, through the
    same permute / expert GEMMs / combine, as an EP=2 rank does for both ranks' tokens (the router
    is E/2 wide instead of E: <= 1% of the FLOPs). Its step is the floor of the EP variants."""
    torch.manual_seed(0)
    moe = build_moe(replace(ctx.wl, num_experts=ctx.wl.num_experts // WORLD), "auto")
    return _moe_steps(moe, ctx)[0], None


def dense_variant(ctx: Context):
    """The dense floor: SwiGLU MLP of hidden top_k x expert_hidden on this rank's tokens."""
    torch.manual_seed(0)
    mlp = MLP(D, ctx.wl.top_k * ctx.wl.expert_hidden, "swiglu")

    def step() -> dict[str, float]:
        mlp.zero_grad(set_to_none=True)
        ctx.x_BSD.grad = None
        barrier()
        t0 = time.perf_counter()
        mlp(ctx.x_BSD).backward(ctx.g_BSD)
        return step_metrics(time.perf_counter() - t0, [])

    return step, None


# --- one rank ---


def probe_link(rank: int, mbytes: int = 16, reps: int = 3) -> dict[str, float]:
    """Seconds (median of `reps` after one more) to move `mbytes` MiB to the peer: `a2a`, a plain
    all-to-all (both directions at once), and `one_way`, rank 0 sending while rank 1 only receives."""
    rows = mbytes * (1 << 20) // (4 * D)
    x = torch.randn(WORLD * rows, D)
    y = torch.empty_like(x)
    times: dict[str, list[float]] = {"a2a": [], "one_way": []}
    for kind, ts in times.items():
        for _ in range(reps + 1):
            barrier()
            t0 = time.perf_counter()
            if kind == "a2a":
                dist.all_to_all_single(y, x)
            elif rank == 0:
                dist.send(x[:rows], 1)
            else:
                dist.recv(y[:rows], 0)
            ts.append(time.perf_counter() - t0)
    return {kind: statistics.median(ts[1:]) for kind, ts in times.items()}


def run_rank(args: argparse.Namespace, variants: dict[str, Factory]) -> dict:
    """Time every variant on every workload; rank 0 returns the summary, others {}."""
    torch.set_num_threads(1)
    comm = TimedCommunicator(TorchCommunicator(None), stamp_completion=True)  # exact completion times
    rank = comm.rank
    summary: dict = {"probe_s": probe_link(rank) if args.probe else None, "workloads": {}}
    for wl_name in args.workload:
        wl = WORKLOADS[wl_name]
        gen = torch.Generator().manual_seed(100 + rank)
        ctx = Context(wl, rank, comm, torch.randn(B, S, D, generator=gen, requires_grad=True),
                      torch.randn(B, S, D, generator=gen))  # fmt: skip
        built = {name: make(ctx) for name, make in variants.items()}

        # sanity: every epmoe variant computes the layer the first one computes (bf16 payload: to its rounding)
        forwards = {name: fwd for name, (_, fwd) in built.items() if fwd is not None}
        first = next(iter(forwards))
        reference = forwards.pop(first)()
        diffs = {name: max_rel_diff(fwd(), reference) for name, fwd in forwards.items()}
        if rank == 0:
            print(
                f"{wl_name}: max rel diff vs {first} " + ", ".join(f"{n} {d:.1e}" for n, d in diffs.items()), flush=True
            )
        summary["reference"] = first
        del reference

        times: dict[str, list[dict[str, float]]] = {name: [] for name in built}
        for i in range(args.warmup + args.steps):
            for name, (step, _) in built.items():
                metrics = step()
                if i >= args.warmup:
                    times[name].append(metrics)
        # gather: [rank, variant, step, metric]
        table = torch.zeros(WORLD, len(built), args.steps, len(METRICS), dtype=torch.float64)
        for v, name in enumerate(built):
            table[rank, v] = torch.tensor([[m[k] for k in METRICS] for m in times[name]], dtype=torch.float64)
        dist.all_reduce(table)
        rows = {}
        for v, name in enumerate(built):
            per_step = table[:, v]  # [rank, step, metric]
            row = {k: statistics.median(per_step[:, :, j].mean(0).tolist()) for j, k in enumerate(METRICS)}
            slower_S = per_step[:, :, 0].max(0).values.tolist()  # the slower rank's step, per round
            row["step"] = statistics.median(slower_S)
            rows[name] = {k: 1e3 * val if k != "mb_sent" else val for k, val in row.items()}  # ms
            rows[name]["steps"] = [1e3 * t for t in slower_S]
        summary["workloads"][wl_name] = {"rows": rows, "diffs": diffs}
        del built, ctx
    return summary if rank == 0 else {}


def rank_entry(
    args: argparse.Namespace, variants: dict[str, Factory], after_init: Callable[[], None] | None = None
) -> None:
    """A rank process: join the group (then call after_init), time the variants, rank 0 writes the summary."""
    if args.iface:
        os.environ["GLOO_SOCKET_IFNAME"] = args.iface
    apply_host_memory_option(args)
    dist.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=WORLD)
    try:
        if after_init is not None:
            after_init()
        summary = run_rank(args, variants)
        if args.rank == 0:
            Path(args.out).write_text(json.dumps(summary))
    finally:
        dist.destroy_process_group()


# --- the links and the ranks' processes ---


def launch_ranks(module: str, nodes: list[Node], rank_args: list[str], timeout: float) -> dict:
    """Run `python -m module --rank r` on each node (rank 0's address hosts the rendezvous); rank 0's summary."""
    with tempfile.TemporaryDirectory(prefix="epmoe_bench_") as tmp:
        out = Path(tmp) / "summary.json"
        init = f"tcp://{nodes[0].addr}:{free_port()}"
        procs = []
        for rank, node in enumerate(nodes):
            cmd = [*node.prefix, sys.executable, "-m", module, "--rank", str(rank), "--init", init, "--out", str(out)]
            if node.iface:
                cmd += ["--iface", node.iface]
            procs.append(subprocess.Popen([*cmd, *rank_args], cwd=REPO))
        try:
            codes = [p.wait(timeout=timeout) for p in procs]
        finally:
            for p in procs:  # only the processes started here
                if p.poll() is None:
                    p.kill()
        if any(codes):
            raise RuntimeError(f"rank processes exited with {codes}")
        return json.loads(out.read_text())


# --- reading the rows ---


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def paired_ratio(num: dict, den: dict) -> float:
    """Median over rounds of num's step / den's step in the same round (rows from run_rank)."""
    return statistics.median(a / b for a, b in zip(num["steps"], den["steps"]))


# --- the command line ---


def rank_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workload", nargs="+", choices=[*WORKLOADS, "all"], default=["all"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (median taken)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--timeout", type=float, default=900, help="seconds the ranks of one link may take")
    add_host_memory_option(parser)
    # set by the launching process for the rank processes
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--init", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--iface", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps ({args.steps}) must be >= 1 and --warmup ({args.warmup}) >= 0")
    if "all" in args.workload:
        args.workload = list(WORKLOADS)


def forward_args(args: argparse.Namespace, extra: list[str]) -> list[str]:
    return ["--workload", *args.workload, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--host-memory", args.host_memory, *extra]  # fmt: skip
