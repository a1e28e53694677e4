"""Placement simulator: replay a routing trace from an epmoe training run on a modelled GPU cluster
and report, for every policy in `epmoe.placement.policies.PLACEMENTS`, the load of the busiest rank,
the bytes that cross nodes and the modelled all-to-all time per training step, at EP 8 ... 256.

    .venv/bin/python -m benchmarks.placement_sim --trace outputs/trace_256e_400/routing_trace.pt \
        [outputs/trace_256e_400_noaux/routing_trace.pt] --from-step 200 [--ep 8 16 32 64 128 256] \
        [--out benchmarks/results/placement_sim.md] [--plot benchmarks/results/placement_sim.png]

The trace (recipe; 15-20 minutes on 2 shared CPU cores): a 6-layer byte-level LM on the Python
standard library, first layer dense, then 5 MoE layers of 256 experts (hidden 32) and one shared
expert, softmax top-8 with the batch aux loss 0.01 (the default `router=topk`), 400 steps of
32 sequences x 32 bytes; every 2nd step keeps the routers' choices of all 1024 tokens of the
micro-batch (200 samples, 16 MB):

    .venv/bin/python -m epmoe.train model.num_experts=256 router.top_k=8 model.expert_hidden=32 \
        model.d_model=128 model.n_heads=4 model.n_layers=6 model.first_dense_layers=1 \
        model.moe_every=1 model.expert_impl=grouped train.steps=400 train.batch_size=32 \
        data.seq_len=32 train.precision=fp32 train.eval_every=0 train.eval_batches=1 \
        train.sample_bytes=0 train.log_every=20 logger.plots=false logger.progress=false \
        logger.routing_trace_every=2 logger.routing_trace_tokens=1024 hydra.run.dir=outputs/trace_256e_400

A second trace, the same run with `router.aux_loss=none` (and hydra.run.dir=outputs/trace_256e_400_noaux):
without the balance loss the routers collapse onto ~15 of 256 experts per layer, 8 of them chosen by
nearly every token, a skew that persists from step to step (the opposite extreme).

Why this shape: a trace sample holds one micro-batch (1024 tokens here), far fewer than an EP-256
step sees, so samples are pooled (item 2 of the cluster model), and many short sequences per batch
make a sample less dominated by a few source files. Routing settles late: in the first ~100 steps the router
collapses onto few experts and the aux loss moves the hot spots around from step to step, which no
placement fitted on earlier steps can follow; `--from-step` drops that phase. Even later the hot
experts drift (with the aux loss, tokens per expert of steps 200-298 and 300-400 correlate at 0.38).

Fit and evaluation. The samples kept (training steps from `--from-step` on) split in time: the
load-following policies (`balanced`, `redundant`, `affinity`) are fitted on `RoutingStats.from_topk`
of the first half (`--fit-fraction`) and every policy is evaluated on the second half, pooled into
one stream of tokens, as a placement computed from recent statistics then serves the steps that
follow. `redundant` gets `--spare-slots` (1) extra slots per rank; `affinity` runs with its defaults
and its solver path (HiGHS or greedy) is printed from `Placement.origin`. Extra rows, not policies:
`(oracle)` fits a policy on the evaluation half itself (perfect statistics; the gap to the plain row
is drift between the halves); `redundant/even` replays redundant's map with replicas split evenly
(no locality, item 3); `affinity/node` runs `affinity` with nodes in place of ranks, then `balanced`
within each node (`node_affinity_placement`), the objective that inter-node bytes reward. The
"fit half" column is the load ratio on the statistics the policy was fitted on, as it planned it.

The cluster model, items 1-6 with every assumption (change the numbers with the flags): the
docstring of benchmarks/placement_cost.py.

Shape key:
  Y  MoE layers
  T  tokens of the pooled stream
  K  experts chosen per token (top-k)
  E  experts
  N  trace samples (training steps)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.placement_cost import Cluster, SimResult, simulate
from epmoe.placement.load_policies import pack_balanced
from epmoe.placement.placement import Placement, RoutingStats
from epmoe.placement.policies import PLACEMENTS
from epmoe.train.routing_stats import load_trace

TARGET_LOAD, TARGET_CUT = 1.10, 0.20


def pooled(topk_idx_NYTK: torch.Tensor) -> torch.Tensor:
    """[N, Y, T, K] samples -> [Y, N * T, K]: one stream of tokens, each keeping its path through the layers."""
    N, Y, T, K = topk_idx_NYTK.shape
    return topk_idx_NYTK.long().permute(1, 0, 2, 3).reshape(Y, N * T, K)


def noise_floor(num_experts: int, top_k: int, ep: int, num_layers: int, tokens: int, cluster: Cluster) -> float:
    """Load max/mean of a uniform random top-k router over `tokens` tokens under `contiguous`."""
    gen = torch.Generator().manual_seed(0)
    topk_YTK = torch.rand(num_layers, tokens, num_experts, generator=gen).topk(top_k, dim=-1).indices
    placement = PLACEMENTS["contiguous"](num_experts, ep, num_experts // ep, None, num_layers)
    return simulate(topk_YTK, placement, cluster).load_ratio


def node_affinity_placement(
    num_experts: int, ep: int, gpus_per_node: int, stats: RoutingStats, num_layers: int
) -> Placement:
    """Not a PLACEMENTS policy, a composition for comparison: `affinity` with nodes in place of ranks
    (co-occurrence kept on one node, each node's token load within affinity's tolerance), then
    `pack_balanced` spreads each node's experts over its GPUs, layer by layer."""
    nodes = ep // gpus_per_node
    per_node = num_experts // nodes
    by_node = PLACEMENTS["affinity"](num_experts, nodes, per_node, stats, num_layers)
    rank_YE = torch.empty(num_layers, num_experts, dtype=torch.int64)
    for y in range(num_layers):
        for n in range(nodes):
            experts_L = by_node.experts_on_rank(y, n)
            local_L = pack_balanced(stats.load_YE[y, experts_L], gpus_per_node, per_node // gpus_per_node)
            rank_YE[y, experts_L] = n * gpus_per_node + local_L
    expert_YE = torch.arange(num_experts).repeat(num_layers, 1)
    return Placement.from_ranks(rank_YE, expert_YE, ep, num_experts, origin=f"node {by_node.origin}")


@dataclass
class Row:
    ep: int
    nodes: int
    policy: str  # a PLACEMENTS name, or "redundant/even": its map with replicas split evenly
    fit_load: float  # load max/mean of the map on the fitting half, as the policy planned it
    sim: SimResult
    fit_s: float
    origin: str


def load_correlation(a: RoutingStats, b: RoutingStats) -> float:
    """Mean over layers of the Pearson correlation of tokens per expert in `a` and `b`: how well one
    window's load predicts another's (1: the same hot experts)."""
    pairs_Y2E = torch.stack([a.load_YE.double(), b.load_YE.double()], 1)  # [Y, 2, E]
    return float(torch.stack([torch.corrcoef(p_2E)[0, 1] for p_2E in pairs_Y2E]).mean())


def run(args: argparse.Namespace, trace_path: Path) -> tuple[list[Row], dict]:
    """Every (EP, policy) of `args` on one trace; returns the rows and facts for the report."""
    trace = load_trace(trace_path)
    keep_N = trace["steps"] >= args.from_step
    topk_NYTK = trace["topk_idx_NYTK"][keep_N]
    steps = trace["steps"][keep_N].tolist()
    N, Y, T, K = topk_NYTK.shape
    if N < 2:
        raise SystemExit(f"{trace_path} has {N} samples from step {args.from_step}; need 2 (lower --from-step)")
    E = int(trace["num_experts"])
    n_fit = max(1, min(N - 1, round(N * args.fit_fraction)))
    fit_YTK, eval_YTK = pooled(topk_NYTK[:n_fit]), pooled(topk_NYTK[n_fit:])
    fits = {"": RoutingStats.from_topk(fit_YTK, E)}
    if args.oracle:
        fits[" (oracle)"] = RoutingStats.from_topk(eval_YTK, E)  # foresight: fitted on what it is scored on
    cluster = Cluster(
        args.gpus_per_node, args.nvlink_gbps, args.ib_gbps, args.nvlink_latency_us, args.ib_latency_us,
        args.hidden, args.bytes,
    )  # fmt: skip
    info = {
        "samples": N, "all_samples": len(trace["steps"]), "layers": Y, "tokens": T, "top_k": K, "experts": E,
        "fit_steps": steps[:n_fit], "eval_steps": steps[n_fit:], "eval_tokens": eval_YTK.shape[1],
        "cluster": cluster, "floors": {}, "load_corr": load_correlation(*fits.values()) if args.oracle else None,
    }  # fmt: skip
    rows = []
    for ep in args.ep:
        if ep > E or E % ep:
            print(f"skipping ep {ep}: it must divide num_experts ({E})")
            continue
        nodes = -(-ep // cluster.gpus_per_node)
        info["floors"][ep] = noise_floor(E, K, ep, Y, eval_YTK.shape[1], cluster)
        for suffix, stats in fits.items():
            for name in args.policies:
                if suffix and name in ("contiguous", "round_robin"):
                    continue  # they read no stats
                slots = E // ep + (args.spare_slots if name == "redundant" else 0)
                t0 = time.perf_counter()
                placement = PLACEMENTS[name](E, ep, slots, stats, Y)
                fit_s = time.perf_counter() - t0
                fit_load = placement.imbalance(stats.load_YE)
                variants = [(name, True)] + ([("redundant/even", False)] if name == "redundant" else [])
                for label, local in variants:
                    sim = simulate(eval_YTK, placement, cluster, args.tokens_per_rank, local_replicas=local)
                    rows.append(Row(ep, nodes, label + suffix, fit_load, sim, fit_s, placement.origin))
                    print(
                        f"ep {ep:>3} {label + suffix:<25} load {sim.load_ratio:.3f} (fit {fit_load:.3f}), {fit_s:.1f} s"
                    )
            if args.node_affinity and nodes > 1 and "affinity" in args.policies:
                t0 = time.perf_counter()
                placement = node_affinity_placement(E, ep, cluster.gpus_per_node, stats, Y)
                fit_s, fit_load = time.perf_counter() - t0, placement.imbalance(stats.load_YE)
                sim = simulate(eval_YTK, placement, cluster, args.tokens_per_rank)
                label = "affinity/node" + suffix
                rows.append(Row(ep, nodes, label, fit_load, sim, fit_s, placement.origin))
                print(f"ep {ep:>3} {label:<25} load {sim.load_ratio:.3f} (fit {fit_load:.3f}), {fit_s:.1f} s")
    return rows, info


def _cut(row: Row, base: Row | None, path: str) -> float:
    """Share of inter-node bytes `row` saves against `base` on `path` ("ret" or "fwd")."""
    if base is None or getattr(base.sim, path).inter_bytes == 0:
        return float("nan")
    return 1 - getattr(row.sim, path).inter_bytes / getattr(base.sim, path).inter_bytes


def table(rows: list[Row]) -> list[str]:
    """Markdown table; "cut" is the inter-node bytes saved against `contiguous` at the same EP."""
    base = {r.ep: r for r in rows if r.policy == "contiguous"}
    lines = [
        "| EP | nodes | policy | load max/mean | (fit half) | return: inter-node GB | cut | intra GB | a2a ms "
        "| forward: inter-node GB | cut | intra GB | a2a ms | rows kept on rank |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ret, fwd = r.sim.ret, r.sim.fwd
        cut_ret, cut_fwd = (_cut(r, base.get(r.ep), p) for p in ("ret", "fwd"))
        lines.append(
            f"| {r.ep} | {r.nodes} | {r.policy} | {r.sim.load_ratio:.3f} | {r.fit_load:.3f} "
            f"| {ret.inter_bytes / 1e9:.1f} | {_pct(cut_ret)} | {ret.intra_bytes / 1e9:.1f} | {ret.seconds * 1e3:.1f} "
            f"| {fwd.inter_bytes / 1e9:.1f} | {_pct(cut_fwd)} | {fwd.intra_bytes / 1e9:.1f} | {fwd.seconds * 1e3:.1f} "
            f"| {fwd.kept_local:.3f} |"
        )
    return lines


def _pct(x: float) -> str:
    return "-" if x != x else f"{x:+.0%}"  # x != x: nan, one node


def verdicts(rows: list[Row], floors: dict[int, float]) -> list[str]:
    """The issue's targets, EP by EP, as computed from the rows; oracle values in brackets. "No worse
    balance" allows the noise floor's excess (floors[ep] - 1): smaller differences are sampling noise."""
    by = {(r.ep, r.policy): r for r in rows}
    lines = []
    for ep in dict.fromkeys(r.ep for r in rows):
        c = by.get((ep, "contiguous"))
        if c is None:
            continue
        parts = []
        for name in ("balanced", "redundant", "redundant/even"):
            if (r := by.get((ep, name))) is not None:
                ok = r.sim.load_ratio <= TARGET_LOAD < c.sim.load_ratio
                o = by.get((ep, name + " (oracle)"))
                parts.append(
                    f"{name} {r.sim.load_ratio:.3f} ({'met' if ok else 'missed'}"
                    + (f"; oracle {o.sim.load_ratio:.3f})" if o else ")")
                )
        line = f"- EP {ep}: load max/mean contiguous {c.sim.load_ratio:.3f}" + (
            f"; {', '.join(parts)}" if parts else ""
        )
        for name in ("affinity", "affinity/node"):
            if (a := by.get((ep, name))) is None or c.nodes == 1:
                continue
            cut = _cut(a, c, "fwd")
            ok = cut >= TARGET_CUT and a.sim.load_ratio <= c.sim.load_ratio + floors.get(ep, 1.0) - 1
            o = by.get((ep, name + " (oracle)"))
            line += (
                f"; {name} cuts inter-node bytes by {_pct(cut)} on the forward path ({'met' if ok else 'missed'}"
                + (f"; oracle {_pct(_cut(o, c, 'fwd'))} at load {o.sim.load_ratio:.3f}" if o else "")
                + f"), {_pct(_cut(a, c, 'ret'))} on the return path, at load {a.sim.load_ratio:.3f}"
            )
        lines.append(line)
    return lines


NOTES_MARK = "<!-- notes below this line are kept when the script rewrites the file -->"


def report(args: argparse.Namespace, results: list[tuple[Path, list[Row], dict]]) -> str:
    """The markdown report: the setting once, then per trace its table, noise floor, targets and
    affinity's solver paths."""
    c = results[0][2]["cluster"]
    cmd = " ".join(["-m benchmarks.placement_sim", *args.argv])
    lines = [
        "# Placement simulator",
        "",
        f"`.venv/bin/python {cmd}`",
        "",
        "The traces' recipe and the fit: the docstring of `benchmarks/placement_sim.py`; the cluster model and "
        "every assumption: that of `benchmarks/placement_cost.py`.",
        "",
        f"- Cluster: {c.gpus_per_node} GPUs per node, NVLink {c.nvlink_gbps:g} GB/s and IB {c.ib_gbps:g} GB/s per "
        f"GPU per direction, {c.nvlink_latency_us:g} / {c.ib_latency_us:g} us per message; rows of "
        f"{c.hidden} x {c.bytes_per_elem} bytes, {args.tokens_per_rank:g} tokens per rank per step (so a step "
        f"grows with EP); `redundant` with {args.spare_slots} spare slot(s) per rank.",
        "- Bytes and times are per training step (forward + backward), summed over ranks (bytes) or "
        "over the step's exchanges (time, each the slowest rank's). `return`: home -> expert -> home every layer "
        "(how epmoe runs); `forward`: MoETuner's path, the token goes from layer y's expert rank straight to "
        "layer y+1's. `cut`: inter-node bytes saved against `contiguous` at the same EP.",
        "- Extra rows: `(oracle)` fits the policy on the evaluation steps themselves (perfect statistics); "
        "`redundant/even` replays redundant's map with each replicated expert's tokens split evenly over all its "
        "replicas (no locality); `affinity/node` is `affinity` over nodes, then `balanced` within each node.",
        "",
        f"Targets: `balanced` / `redundant` load max/mean <= {TARGET_LOAD:.2f} where `contiguous` is worse; "
        f"`affinity` >= {TARGET_CUT:.0%} fewer inter-node bytes than `contiguous` at no worse balance (load "
        "max/mean at most contiguous's plus the noise floor's excess).",
    ]
    for trace_path, rows, info in results:
        fit, ev = info["fit_steps"], info["eval_steps"]
        origins = {r.ep: r.origin for r in rows if r.policy == "affinity"}
        corr = info["load_corr"]
        lines += [
            "",
            f"## Trace `{trace_path}`",
            "",
            f"{info['all_samples']} samples of {info['tokens']} tokens x {info['layers']} MoE layers, "
            f"{info['experts']} experts, top-{info['top_k']}; used the {info['samples']} from step {fit[0]} on. "
            f"Policies fitted on steps {fit[0]}-{fit[-1]}, evaluated on steps {ev[0]}-{ev[-1]} "
            f"({info['eval_tokens']} tokens pooled; token t at home rank t mod EP)."
            + (
                f" Tokens per expert of the two halves correlate at {corr:.2f} (mean over layers)."
                if corr is not None
                else ""
            ),
            "",
            *table(rows),
            "",
            "Noise floor (load max/mean of a uniform random router over the same tokens, `contiguous`): "
            + ", ".join(f"EP {ep} {f:.3f}" for ep, f in info["floors"].items())
            + ".",
            "",
            "Targets, EP by EP:",
            "",
            *verdicts(rows, info["floors"]),
            "",
            "Affinity's solver path (`Placement.origin`):",
            "",
            *[f"- EP {ep}: {o}" for ep, o in origins.items()],
        ]
    return "\n".join([*lines, "", NOTES_MARK]) + "\n"


def write_report(path: Path, text: str) -> None:
    """Write `text`, keeping whatever followed NOTES_MARK in the file it replaces."""
    notes = ""
    if path.exists() and NOTES_MARK in (old := path.read_text()):
        notes = old.split(NOTES_MARK, 1)[1].lstrip("\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + ("\n" + notes if notes else ""))


def plot(path: Path, results: list[tuple[Path, list[Row], dict]]) -> None:
    """Per trace, load max/mean and forward-path inter-node bytes against EP, one line per policy."""
    import matplotlib  # NOTE: here, not at the top: only --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4.2 * len(results)), squeeze=False)
    for (trace_path, rows, _), (ax_load, ax_bytes) in zip(results, axes, strict=True):
        base = {r.ep: r for r in rows if r.policy == "contiguous"}
        for policy in dict.fromkeys(r.policy for r in rows):
            if "oracle" in policy or policy == "redundant/even":
                continue
            mine = [r for r in rows if r.policy == policy]
            eps = [r.ep for r in mine]
            ax_load.plot(eps, [r.sim.load_ratio for r in mine], marker="o", label=policy)
            eps_cut = [r.ep for r in mine if r.nodes > 1]
            ax_bytes.plot(eps_cut, [1 - _cut(r, base.get(r.ep), "fwd") for r in mine if r.nodes > 1], marker="o")
        ax_load.axhline(TARGET_LOAD, color="grey", linestyle=":", label=f"target {TARGET_LOAD}")
        ax_load.set(
            xscale="log", yscale="log", xlabel="EP", ylabel="load max/mean (busiest rank)", title=trace_path.parent.name
        )
        ax_bytes.axhline(1 - TARGET_CUT, color="grey", linestyle=":")
        ax_bytes.set(xscale="log", xlabel="EP", ylabel="inter-node bytes / contiguous's (forward path)")
        for ax in (ax_load, ax_bytes):
            ticks = sorted({r.ep for r in rows})
            ax.set_xticks(ticks, [str(e) for e in ticks])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
        top = max(r.sim.load_ratio for r in rows)
        yticks = [t for t in (1, 1.1, 1.25, 1.5, 2, 3, 5, 10, 20, 30, 50) if t <= top * 1.05]
        ax_load.set_yticks(yticks, [f"{t:g}" for t in yticks])
        ax_load.minorticks_off()
        ax_load.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, nargs="+", required=True, help="routing_trace.pt of epmoe runs")
    parser.add_argument("--ep", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    parser.add_argument("--policies", nargs="+", default=list(PLACEMENTS), choices=list(PLACEMENTS))
    parser.add_argument(
        "--no-node-affinity", dest="node_affinity", action="store_false", help="skip the affinity/node rows"
    )
    parser.add_argument("--from-step", type=int, default=0, help="use only the trace's samples from this step on")
    parser.add_argument("--fit-fraction", type=float, default=0.5, help="leading share of samples to fit on")
    parser.add_argument(
        "--no-oracle", dest="oracle", action="store_false", help="skip the policies fitted on the evaluation half"
    )
    parser.add_argument("--spare-slots", type=int, default=1, help="extra slots per rank for 'redundant'")
    parser.add_argument("--tokens-per-rank", type=float, default=4096)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--bytes", type=int, default=2, help="bytes per element of a row (2: bf16)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nvlink-gbps", type=float, default=450.0)
    parser.add_argument("--ib-gbps", type=float, default=50.0)
    parser.add_argument("--nvlink-latency-us", type=float, default=1.0)
    parser.add_argument("--ib-latency-us", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of load and bytes against EP")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    results = []
    for trace_path in args.trace:
        print(f"trace {trace_path}")
        rows, info = run(args, trace_path)
        print("\n".join(["", *table(rows), "", *verdicts(rows, info["floors"])]))
        for ep, origin in {r.ep: r.origin for r in rows if r.policy == "affinity"}.items():
            print(f"affinity at EP {ep}: {origin}")
        results.append((trace_path, rows, info))
    if args.out is not None:
        write_report(args.out, report(args, results))
    if args.plot is not None:
        plot(args.plot, results)


if __name__ == "__main__":
    main()
