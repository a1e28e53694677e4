"""Generation with the key/value cache against without it (the slow reference), on the `make train` model.

What is measured: the model of experiment=ep2_cpu composed with the defaults (moe_small: 4
layers, d_model 256, 8 experts top-2 + 1 shared, max_seq_len 256), its seeded random weights
(speed does not depend on training), in one process with the threads of one `make train` rank
(train.threads), fp32 (so that the two paths' tokens can be compared exactly; the trainer's
sample runs under its autocast). It continues the first `--prompt` held-out tokens of the
stdlib corpus by `--new` tokens, greedy, with `Transformer.generate(use_cache=True)` and with
`use_cache=False`, `--runs` times each (alternating), and reports the median wall time of each,
tokens/s and the speed-up, measured in this one run; the two paths' tokens must be equal.
NOTE: 64 + 200 tokens outgrow max_seq_len 256: the last 7 steps slide the window, and the
cached path runs the whole window for those (as slow as no cache there; see generate).

    .venv/bin/python -m benchmarks.generate [--prompt 64] [--new 200] [--runs 3] [overrides ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from epmoe.model.transformer import Transformer
from epmoe.train.cli import load_config
from epmoe.train.data import load_splits

RESULTS = Path(__file__).parent / "results"


def timed(model: Transformer, prompt_S: torch.Tensor, n_new: int, use_cache: bool) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    tokens_S = model.generate(prompt_S, n_new, temperature=0, use_cache=use_cache)
    return time.perf_counter() - t0, tokens_S.tolist()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens (held-out stdlib bytes)")
    p.add_argument("--new", type=int, default=200, help="tokens to generate")
    p.add_argument("--runs", type=int, default=3, help="timed runs of each path (the median is reported)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides on top of experiment=ep2_cpu")
    args = p.parse_args(argv)
    cfg = load_config(["experiment=ep2_cpu", *args.overrides])
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model, cfg.router).eval()
    prompt_S = load_splits(cfg.data, cfg.model.vocab_size).val[: args.prompt].long()
    timed(model, prompt_S[:8], 4, True)  # warm-up: first-call allocations of both paths
    timed(model, prompt_S[:8], 4, False)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    tokens: dict[bool, list[list[int]]] = {True: [], False: []}
    for _ in range(args.runs):
        for use_cache in (True, False):
            s, t = timed(model, prompt_S, args.new, use_cache)
            seconds[use_cache].append(s)
            tokens[use_cache].append(t)
    equal = all(t == tokens[False][0] for t in tokens[True] + tokens[False])
    med = {c: statistics.median(seconds[c]) for c in seconds}
    past = max(0, len(prompt_S) + args.new - 1 - cfg.model.max_seq_len)
    lines = [
        f"{args.new} new tokens after a {len(prompt_S)}-token prompt, greedy, fp32, {torch.get_num_threads()} "
        f"thread(s); model: {cfg.model.n_layers} layers, d_model {cfg.model.d_model}, {cfg.model.num_experts} "
        f"experts top-{cfg.router.top_k}, max_seq_len {cfg.model.max_seq_len} ({past} steps past it)",
        "",
        "| path | median s | runs s | tokens/s |",
        "|---|---:|---:|---:|",
    ]
    for use_cache, name in ((True, "KV cache"), (False, "no cache (reference)")):
        runs = ", ".join(f"{s:.2f}" for s in seconds[use_cache])
        lines.append(f"| {name} | {med[use_cache]:.2f} | {runs} | {args.new / med[use_cache]:.1f} |")
    lines += ["", f"- speed-up of the cache: {med[False] / med[True]:.1f}x (median no cache / median cache)",
              f"- tokens equal, cache vs no cache, every run: {equal}"]  # fmt: skip
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generate.md").write_text(f"# Generation: KV cache vs no cache\n\n{table}\n")
    if not equal:
        raise SystemExit("the cached path generated other tokens than the reference")


if __name__ == "__main__":
    main()
