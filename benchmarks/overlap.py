"""Overlap of the all-to-all with expert compute: one MoE layer, 2 expert-parallel ranks.

What is measured: forward + backward of one `epmoe.model.moe.MoE` layer (built as in layer.py:
dropless, softmax top-k, batch aux loss, expert_impl=auto: the path training takes),
8192 tokens per rank (B=8, S=1024, D=512, a different random batch per rank), sharded over 2
ranks by `apply_expert_parallel` (EP=2, one gloo process per rank, torch.set_num_threads(1)).
Variants, all on the same weights and tokens (hence the same routing):

- `a2a`: AllToAllDispatcher, one blocking all-to-all per direction (no overlap at all);
- `pipe-C`: PipelinedDispatcher with C chunks: the rank's own rows compute while chunk 0 travels,
  chunk i+1 travels while chunk i computes, returns travel while later chunks compute;
  C=1 overlaps only the local rows with the exchange;
- `pipe-C-bf16`: the same with payload_dtype=bf16 (half the bytes on the wire);
- `no-exchange`: an EP=2 rank's expert work with no exchange at all (see `no_exchange_variant`):
  what expert parallelism would cost if the exchange were free;
- `dense`: the FLOP-equivalent dense floor (MLP, SwiGLU, hidden = top_k x expert_hidden) on the
  same per-rank tokens, run in both processes at once: the same core contention, no exchange.

Workloads as in layer.py: coarse (E=8, k=2, expert hidden 1024) and fine (E=64, k=8, expert
hidden 256); half of a rank's (token, choice) rows go to the other rank: 16 MB (coarse) or
64 MB (fine) of fp32 rows per exchange, four exchanges per step (rows out, outputs back, and
the same two for the gradients).

Links: `loopback` (both ranks on 127.0.0.1) and `shaped`: each rank in its own network
namespace, joined by a veth pair whose two ends carry `tc qdisc ... tbf rate 1gbit`, standing for
an inter-node link (netem is not available here; tbf is). The script sets the namespaces up
(root + iproute2), first measures the achieved throughput of a plain 16 MB all-to-all, and tears
everything down afterwards; it skips the setting with the reason where it cannot.

How, per rank: time.perf_counter around fwd+bwd; a barrier before every step (outside the timed
region); the variants take turns step by step so that drift in machine load hits them alike.
A timing communicator (a TorchCommunicator that keeps the gloo work objects) records, for every
all-to-all: its issue time, the time the rank sat blocked in wait(), and its completion time (a
done-callback on the work's future stamps it; where the callback runs late, the return of wait()
bounds it). Per step:
- step: fwd+bwd wall time; the table shows the median over steps of the slower rank's time;
- exchange: the union of the exchanges' in-flight intervals [issue, completion] (the time some
  all-to-all of the step was in flight, as this rank saw it; it includes waiting for the peer
  to issue its side);
- exposed: the time blocked in wait() (the exchange the rank could not hide);
- compute: step - exposed (everything the rank did while not blocked: router, permute, casts,
  experts, combine);
- hidden = 1 - exposed / exchange.
exchange, exposed and compute are the mean of the two ranks, then the median over steps.

Reading the table: `vs a2a` and `vs pipe-1` are step-time ratios within one run (> 1: faster
than that baseline); `vs dense` is step / the dense floor's step. Every ratio is paired: the
median over rounds of the ratio of the two variants' steps in that round (the variants take
turns, so both steps of a pair saw the same machine load), not a ratio of the two medians.
Targets (issue 6): on the shaped link exposed <= 40% of exchange (hidden >= 60%) and step >=
1.25x faster than chunks=1. On loopback the exchange is a few percent of the step, so the
overlap cannot show much there.

NOTE: on a shared 2-core machine (two ranks, each with its gloo threads, plus whatever else runs)
rows swing by 10% or more between runs; the ratios within one run are the numbers to read.

    .venv/bin/python benchmarks/overlap.py [--link loopback|shaped|all] [--workload coarse|fine|all]
        [--steps 3] [--warmup 1] [--chunks 1 2 4] [--bf16-chunks 2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
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
from layer import WORKLOADS, Workload, add_host_memory_option, apply_host_memory_option, build_moe
from netns import Node, SkipLink, veth_nodes

from epmoe.comm.communicator import TorchCommunicator
from epmoe.comm.parallel_dims import ParallelDims
from epmoe.comm.pipelined import PipelinedDispatcher
from epmoe.comm.timing import Exchange, TimedCommunicator, union_seconds
from epmoe.model.experts import MLP
from epmoe.model.moe import MoE
from epmoe.parallel.expert_parallel import apply_expert_parallel

B, S, D = 8, 1024, 512  # 8192 tokens per rank
WORLD = 2
RESULTS = Path(__file__).parent / "results"
METRICS = ("step", "exchange", "exposed", "compute", "mb_sent")
TARGET_HIDDEN, TARGET_SPEEDUP = 0.60, 1.25  # shaped link: exposed <= 40% of exchange; >= 1.25x vs chunks=1
SHAPE = {"rate": "1gbit", "burst": "256kb", "latency": "50ms"}  # tbf on both veth ends (netns.py)


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


def overlap_variants(chunks: list[int], bf16_chunks: list[int]) -> dict[str, Factory]:
    variants: dict[str, Factory] = {"a2a": epmoe_variant(None)}
    variants |= {f"pipe-{c}": epmoe_variant(c) for c in chunks}
    variants |= {f"pipe-{c}-bf16": epmoe_variant(c, torch.bfloat16) for c in bf16_chunks}
    variants["no-exchange"] = no_exchange_variant
    variants["dense"] = dense_variant
    return variants


# --- one rank ---


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(script: str, nodes: list[Node], rank_args: list[str], timeout: float) -> dict:
    """Run `script --rank r` on each node (rank 0's address hosts the rendezvous); rank 0's summary."""
    with tempfile.TemporaryDirectory(prefix="epmoe_bench_") as tmp:
        out = Path(tmp) / "summary.json"
        init = f"tcp://{nodes[0].addr}:{free_port()}"
        procs = []
        for rank, node in enumerate(nodes):
            cmd = [*node.prefix, sys.executable, script, "--rank", str(rank), "--init", init, "--out", str(out)]
            if node.iface:
                cmd += ["--iface", node.iface]
            procs.append(subprocess.Popen([*cmd, *rank_args], cwd=Path(script).parent.parent))
        try:
            codes = [p.wait(timeout=timeout) for p in procs]
        finally:
            for p in procs:  # only the processes started here
                if p.poll() is None:
                    p.kill()
        if any(codes):
            raise RuntimeError(f"rank processes exited with {codes}")
        return json.loads(out.read_text())


# --- tables and plots ---


def probe_note(probe: dict[str, float]) -> str:
    def rate(seconds: float) -> str:
        return f"{1e3 * seconds:.0f} ms ({16 * 8 * 1.048576 / seconds / 1e3:.2f} Gbit/s)"

    return (
        f"16 MiB to the peer: {rate(probe['a2a'])} per direction in a plain all-to-all (both directions at once), "
        f"{rate(probe['one_way'])} one way"
    )


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def paired_ratio(num: dict, den: dict) -> float:
    """Median over rounds of num's step / den's step in the same round (rows from run_rank)."""
    return statistics.median(a / b for a, b in zip(num["steps"], den["steps"]))


def overlap_rows(link: str, wl_name: str, rows: dict[str, dict]) -> list[list[str]]:
    a2a, pipe1, dense = (rows.get(n) for n in ("a2a", "pipe-1", "dense"))
    out = []
    for name, r in rows.items():
        hidden = 1 - r["exposed"] / r["exchange"] if r["exchange"] > 0 else float("nan")
        ratio = [f"{paired_ratio(base, r):.2f}x" if base else "-" for base in (a2a, pipe1)]
        out.append([link, wl_name, name, f"{r['step']:.0f}", f"{r['exchange']:.0f}", f"{r['exposed']:.0f}",
                    f"{r['compute']:.0f}", f"{100 * hidden:.0f}%" if r["exchange"] > 0 else "-",
                    f"{r['mb_sent']:.0f}", *ratio, f"{paired_ratio(r, dense):.2f}" if dense else "-"])  # fmt: skip
    return out


HEADER = ["link", "workload", "variant", "step ms", "exchange ms", "exposed ms", "compute ms", "hidden",
          "MB sent", "vs a2a", "vs pipe-1", "vs dense"]  # fmt: skip


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    """Stacked bars per (link, workload): compute + exposed exchange per variant; a tick at the exchange time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(link, wl, rows) for link, per_wl in results.items() for wl, rows in per_wl.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (link, wl, rows) in zip(axes[0], panels):
        names = list(rows)
        compute = [rows[n]["compute"] for n in names]
        exposed = [rows[n]["exposed"] for n in names]
        ax.bar(names, compute, label="compute (step - exposed)")
        ax.bar(names, exposed, bottom=compute, label="exposed exchange")
        ax.scatter(
            names, [rows[n]["exchange"] for n in names], marker="_", s=300, color="k", label="exchange in flight"
        )
        ax.set_title(f"{link} / {wl}")
        ax.set_ylabel("ms per fwd+bwd (median)")
        ax.tick_params(axis="x", rotation=45)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- main ---


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


def main() -> None:
    parser = rank_parser(__doc__.splitlines()[0])
    parser.add_argument("--link", choices=["loopback", "shaped", "all"], default="all")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4], help="pipelined chunk counts")
    parser.add_argument("--bf16-chunks", type=int, nargs="*", default=[2, 4], help="chunk counts with bf16 payload")
    args = parser.parse_args()
    check_args(parser, args)
    if 1 not in args.chunks:
        parser.error(f"--chunks ({args.chunks}) must include 1: the no-pipelining baseline the targets compare to")
    variants = overlap_variants(args.chunks, args.bf16_chunks)
    if args.rank is not None:
        rank_entry(args, variants)
        return

    extra = ["--chunks", *map(str, args.chunks), "--bf16-chunks", *map(str, args.bf16_chunks)]
    links = ["loopback", "shaped"] if args.link == "all" else [args.link]
    print(f"torch {torch.__version__}; 2 ranks x 1 thread, gloo; tokens/rank {B}x{S}, d_model {D}; "
          f"median of {args.steps} steps after {args.warmup} warm-up", flush=True)  # fmt: skip
    results: dict[str, dict] = {}
    notes: list[str] = []
    for link in links:
        try:
            if link == "loopback":
                summary = launch_ranks(__file__, [Node(), Node()], forward_args(args, extra), args.timeout)
            else:
                with veth_nodes("ov", SHAPE) as nodes:
                    summary = launch_ranks(__file__, nodes, forward_args(args, [*extra, "--probe"]), args.timeout)
                note = f"shaped link (tbf rate {SHAPE['rate']} burst {SHAPE['burst']} latency {SHAPE['latency']} " + (
                    "on both veth ends): " + probe_note(summary["probe_s"])
                )
                print(note, flush=True)
                notes.append(note)
        except SkipLink as why:
            notes.append(f"{link}: skipped, {why}")
            print(notes[-1], flush=True)
            continue
        results[link] = {wl: s["rows"] for wl, s in summary["workloads"].items()}
        for wl, s in summary["workloads"].items():
            notes.append(f"{link}/{wl} sanity, max rel diff of the output vs {summary['reference']}: "
                         + ", ".join(f"{n} {d:.1e}" for n, d in s["diffs"].items()))  # fmt: skip

    rows = [row for link, per_wl in results.items() for wl, r in per_wl.items() for row in overlap_rows(link, wl, r)]
    table = markdown_table(HEADER, rows)
    verdicts = []
    for wl, r in results.get("shaped", {}).items():
        best = min((n for n in r if n.startswith("pipe-") and n != "pipe-1"), key=lambda n: r[n]["step"], default=None)
        if best is None:
            continue
        hidden = 1 - r[best]["exposed"] / r[best]["exchange"]
        speedup = paired_ratio(r["pipe-1"], r[best])
        speedup_a2a = paired_ratio(r["a2a"], r[best])
        verdicts.append(
            f"shaped/{wl}: fastest pipelined variant {best}: hidden {100 * hidden:.0f}% of the exchange "
            f"(target >= {100 * TARGET_HIDDEN:.0f}%: {'met' if hidden >= TARGET_HIDDEN else 'MISSED'}), "
            f"{speedup:.2f}x vs pipe-1 and {speedup_a2a:.2f}x vs a2a "
            f"(target >= {TARGET_SPEEDUP:.2f}x vs chunks=1: {'met' if speedup >= TARGET_SPEEDUP else 'MISSED'})"
        )
    print("\n" + table + "\n\n" + "\n".join(notes + verdicts), flush=True)
    if not results:
        return
    RESULTS.mkdir(exist_ok=True)
    command = "python benchmarks/overlap.py " + " ".join(sys.argv[1:])
    (RESULTS / "overlap.md").write_text(
        f"# Overlap benchmark (2 ranks, EP=2, gloo, 1 thread per rank)\n\n`{command.strip()}`; torch "
        f"{torch.__version__}; median of {args.steps} steps after {args.warmup} warm-up; times in ms per fwd+bwd. "
        f"See the docstring of benchmarks/overlap.py for what each column measures.\n\n{table}\n\n"
        + "\n".join(f"- {line}" for line in notes + verdicts)
        + "\n"
    )
    plot(results, RESULTS / "overlap.png", "one MoE layer fwd+bwd, EP=2: compute + exposed exchange")
    print(f"wrote {RESULTS / 'overlap.md'} and {RESULTS / 'overlap.png'}")


if __name__ == "__main__":
    main()
