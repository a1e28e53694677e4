"""Per-rank memory of training a model whose non-expert weights dominate: replicated vs FSDP2, and
activation checkpointing (none / full / selective) at two sequence lengths.

Each configuration is a fresh group of spawned gloo ranks (a process's peak resident set only
grows), running `train.steps` steps of the real trainer (fp32, one thread per rank). Per rank:
- state: the bytes of the tensors this rank holds for training, measured after the run: its
  parameters (a DTensor's local shard) and their optimizer state (AdamW's two moments), plus one
  gradient per parameter (freed between steps, held during one); against the bytes expected from
  the parameter count: 16 B per fp32 parameter held (weight, gradient, exp_avg, exp_avg_sq), a
  non-expert parameter held whole (replicated) or 1/world of it (FSDP2), expert parameters 1/ep.
- peak: the fullest rank's peak resident set during training (metrics.jsonl's mem_gib at the last
  logged step, before the final evaluation and checkpoint), and `peak - base`, where base is the
  resident set of a rank with torch imported, before the model is built.
Then the memory-limit run: the same model under RLIMIT_DATA (a per-process limit on private
writable memory) set between what FSDP2 at world 4 needs and what a replicated rank needs: the
replicated run must fail to allocate and the FSDP2 run must train.

    python -m benchmarks.memory [--steps 3] [--out benchmarks/results]
writes memory.md and memory.png under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from epmoe.launch.commands import free_port

RESULTS = Path(__file__).parent / "results"
MIB = 2**20
# Non-expert weights dominate: wide attention and a wide shared expert beside 4 narrow experts.
MODEL = ["model.d_model=512", "model.n_layers=4", "model.n_heads=8", "model.num_experts=4", "model.expert_hidden=64",
         "model.shared_hidden=1024", "model.dense_hidden=1024", "model.first_dense_layers=1", "model.max_seq_len=512",
         "model.vocab_size=4096"]  # fmt: skip
# The memory-limit run's model: the same shape, wider, so that the state a rank holds (~0.8 GB
# replicated, ~0.2 GB under FSDP2 at world 4) outweighs its activations.
LIMIT_MODEL = [*MODEL, "model.d_model=1024", "model.n_heads=16", "model.shared_hidden=2048", "model.dense_hidden=2048",
               "model.expert_hidden=128", "model.vocab_size=8192"]  # fmt: skip
TRAIN = ["train.precision=fp32", "train.threads=1", "train.batch_size=4", "train.eval_every=0", "train.eval_batches=1",
         "train.sample_bytes=0", "train.log_every=1", "train.warmup_steps=1", "logger.progress=false",
         "logger.console=false", "logger.plots=false", "data=bin"]  # fmt: skip


@dataclass
class Case:
    name: str
    world: int
    ep: int
    fsdp: bool
    seq: int = 256
    ac: str = "none"
    model: tuple[str, ...] = tuple(MODEL)

    def overrides(self, data: Path, steps: int) -> list[str]:
        # a short collective timeout: under the memory limit a rank that fails ends its peers' wait
        return [*self.model, *TRAIN, f"data.path={data}", "train.collective_timeout_s=60", f"data.seq_len={self.seq}",
                f"train.steps={steps}",
                f"parallel.ep={self.ep}", f"parallel.fsdp={str(self.fsdp).lower()}",
                f"train.activation_checkpointing={self.ac}"]  # fmt: skip


LAYOUTS = [Case("world 1", 1, 1, False), Case("world 2 / EP 2, replicated", 2, 2, False),
           Case("world 2 / EP 2 + FSDP", 2, 2, True), Case("world 4 / EP 4 + FSDP", 4, 4, True)]  # fmt: skip
CHECKPOINTING = [Case(f"world 2 / EP 2 + FSDP, seq {s}, AC {ac}", 2, 2, True, s, ac)
                 for s in (128, 512) for ac in ("none", "full", "selective")]  # fmt: skip


def _local_bytes(t: torch.Tensor) -> int:
    from epmoe.parallel.materialize import is_sharded

    local = t.to_local() if is_sharded(t) else t  # a DTensor's shard, or the tensor
    return local.numel() * local.element_size()


def _expected_state_bytes(model: torch.nn.Module, world: int, ep: int, fsdp: bool) -> tuple[int, int]:
    """(expected, full) bytes of weight + gradient + two AdamW moments: of what one rank holds, and
    of the whole model (what one process holds)."""
    from epmoe.model.moe import expert_weight_names

    experts = expert_weight_names(model)
    full = expected = 0
    for name, p in model.named_parameters():
        n = p.numel()  # a DTensor's numel is the whole tensor's
        if name in experts:  # this rank's experts: 1/ep of them, whole or (FSDP, expert-DP > 1) sharded
            n_all = n * ep
            expected += 16 * (n // (world // ep) if fsdp and world > ep else n)
            full += 16 * n_all
        else:
            expected += 16 * (-(-n // world) if fsdp else n)
            full += 16 * n
    return expected, full


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _vm_data_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmData in /proc/self/status")


def _worker(rank: int, world: int, port: int, overrides: list[str], run_dir: str, out: str, limit: int) -> None:
    from epmoe.comm.process import end_process
    from epmoe.train.cli import load_config
    from epmoe.train.trainer import Trainer

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    cfg = load_config(overrides)
    base, data_start = _rss_bytes(), _vm_data_bytes()
    record: dict = {"rank": rank, "base": base}
    if limit:  # this much private writable memory beyond what the process holds now
        cap = _vm_data_bytes() + limit
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    try:
        trainer = Trainer(cfg, Path(run_dir))
        trainer.run()
        model, optimizer = trainer.model, trainer.engine.optimizer
        params = sum(_local_bytes(p) for p in model.parameters())
        moments = sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values() if v.dim() > 0)
        record.update(state=2 * params + moments, peak=_rss_bytes(), data=_vm_data_bytes() - data_start, ok=True)
        record["expected"], record["full"] = _expected_state_bytes(model, world, cfg.parallel.ep, cfg.parallel.fsdp)
        record["replicated"] = _expected_state_bytes(model, world, cfg.parallel.ep, False)[0]
    except (MemoryError, RuntimeError) as e:  # torch's "can't allocate memory" is a RuntimeError
        record.update(ok=False, error=str(e).strip().splitlines()[0][:160])
    Path(f"{out}.{rank}").write_text(json.dumps(record))
    end_process(0)


def run_case(case: Case, data: Path, steps: int, root: Path, limit: int = 0) -> list[dict]:
    run_dir = root / f"{case.name.replace(' ', '_').replace('/', '')}{'_limited' if limit else ''}"
    out = root / f"{time.monotonic_ns()}"
    args = (case.world, free_port(), case.overrides(data, steps), str(run_dir), str(out), limit)
    if case.world == 1:
        ctx = mp.get_context("spawn")
        proc = ctx.Process(target=_worker, args=(0, *args))
        proc.start()
        proc.join()
    else:
        mp.spawn(_worker, args=args, nprocs=case.world)
    records = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(case.world)]
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        last = [json.loads(line) for line in metrics.read_text().splitlines() if "mem_gib" in line][-1]
        for r in records:
            r["peak_logged"] = last["mem_gib"] * 2**30
    return records


def _corpus(folder: Path, vocab: int, tokens: int) -> Path:
    """A flat uint16 token file (data=bin): the model's vocabulary without a tokenizer."""
    path = folder / "tokens.bin"
    ids = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    path.write_bytes(ids.numpy().astype(np.uint16).tobytes())
    return path


def _row(case: Case, records: list[dict]) -> list[str]:
    fullest = max(records, key=lambda r: r.get("state", 0))
    peak = max(r.get("peak_logged", r["peak"]) for r in records)
    base = max(r["base"] for r in records)
    ratio = fullest["state"] / fullest["expected"]
    return [case.name, case.ac, str(case.seq), f"{fullest['state'] / MIB:,.1f}", f"{fullest['expected'] / MIB:,.1f}",
            f"{ratio:.3f}", f"{fullest['state'] / fullest['full']:.3f}", f"{peak / MIB:,.0f}",
            f"{(peak - base) / MIB:,.0f}"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--limit-mib",
        type=int,
        default=0,
        help="RLIMIT_DATA headroom per rank for the memory-limit run (0: midway, measured)",
    )
    args = parser.parse_args(argv)
    vocab = int(next(o for o in MODEL if o.startswith("model.vocab_size=")).split("=")[1])
    header = ["layout", "AC", "seq", "state MiB/rank", "expected MiB", "measured/expected", "of world 1",
              "peak RSS MiB", "peak - base MiB"]  # fmt: skip
    rows, measured = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = _corpus(root, vocab, 400_000)
        for case in [*LAYOUTS, *CHECKPOINTING]:
            records = run_case(case, data, args.steps, root)
            if not all(r["ok"] for r in records):
                raise SystemExit(f"{case.name}: {[r.get('error') for r in records]}")
            measured[case.name] = records
            rows.append(_row(case, records))
            print(" | ".join(rows[-1]), flush=True)
        # the memory-limit run, on the wider model: FSDP2 at world 4 first without a limit (how much
        # private writable memory it takes), then both layouts under a limit halfway to what a
        # replicated rank would take (the difference between the two is the state they hold)
        big_data = _corpus(root, 8192, 200_000)
        rep = Case("world 4 / EP 4, replicated", 4, 4, False, model=tuple(LIMIT_MODEL))
        fsdp = Case("world 4 / EP 4 + FSDP", 4, 4, True, model=tuple(LIMIT_MODEL))
        calib = run_case(Case("calibration", 4, 4, True, model=tuple(LIMIT_MODEL)), big_data, 2, root)
        grows, state = max(r["data"] for r in calib), max(r["state"] for r in calib)
        replicated_state = max(r["replicated"] for r in calib)  # what a rank holds without FSDP2
        limit = args.limit_mib * MIB or grows + (replicated_state - state) // 2
        limited = {c.name: run_case(c, big_data, 2, root, limit) for c in (rep, fsdp)}
    lines = ["# Per-rank memory: replicated vs FSDP2, activation checkpointing", "",
             f"Model: {' '.join(MODEL)}; fp32, batch 4 per rank, {args.steps} steps, 1 thread per rank (CPU, gloo).",
             "state = weights + one gradient each + AdamW moments of what the rank holds; expected = 16 B per "
             "parameter held (non-expert 1/world under FSDP2, experts 1/ep); peak = fullest rank's resident set.",
             "At this size the peak is mostly activations, communication buffers and the memory the allocator",
             "keeps (train's host-memory setting retains freed pages): the state's halving shows in the state",
             "column and under the limit below, where the state outweighs the rest.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]  # fmt: skip
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", f"## Under RLIMIT_DATA: {limit / MIB:,.0f} MiB of private writable memory per rank beyond start-up",
              "", f"Model: {' '.join(LIMIT_MODEL[len(MODEL):])} (else as above), 2 steps. Without a limit, FSDP2 at "
              f"world 4 took {grows / MIB:,.0f} MiB (state {state / MIB:,.0f} MiB per rank; replicated state "
              f"{replicated_state / MIB:,.0f} MiB): the limit is halfway to the replicated need.", ""]  # fmt: skip
    for name, records in limited.items():
        ok = all(r["ok"] for r in records)
        what = "trained" if ok else f"failed: {next(r['error'] for r in records if not r['ok'])}"
        lines.append(f"- {name}: {what}")
        print(f"limit {limit / MIB:,.0f} MiB: {name}: {what}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.md").write_text("\n".join(lines) + "\n")
    _plot(rows, args.out / "memory.png")
    print(f"wrote {args.out / 'memory.md'} and memory.png")
    return 0


def _plot(rows: list[list[str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    labels = [r[0].replace("world 2 / EP 2 + FSDP, ", "FSDP w2, ") for r in rows]
    state = [float(r[3].replace(",", "")) for r in rows]
    rest = [max(float(r[8].replace(",", "")) - s, 0.0) for r, s in zip(rows, state)]
    x = range(len(rows))
    ax.bar(x, state, label="training state (weights, grads, AdamW)")
    ax.bar(x, rest, bottom=state, label="rest of peak - base (activations, buffers)")
    ax.set_xticks(list(x), labels, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("MiB per rank (fullest rank)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
