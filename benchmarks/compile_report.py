"""Graph breaks of one compiled MoE block, per dispatcher, before and after epmoe/parallel/compile.py.

What is counted: `torch._dynamo.explain` of the first transformer Block (a MoE block) on the inputs
a training forward gives it (captured by a pre-hook), on 2 gloo ranks: graphs, graph breaks and
each break's reason. Dynamo only (explain traces; no inductor), so this takes seconds.
- before: the block as it would compile without compile.py's care: the dispatch traced, and the
  router counting with torch.bincount (as it did before router.py's `count_ids`);
- after: the MoE layer's dispatch left eager (compile.py `eager_dispatch`), scatter-add counts,
  dynamo's nested graph breaks on (as compile.py `apply_compile` sets them).
Dispatchers: local (LocalDispatcher, each rank alone), alltoall and pipelined (EP 2), and alltoall
with FSDP2 (after only: fully_shard's hooks on the block).

    .venv/bin/python -m benchmarks.compile_report [overrides ...]
"""

from __future__ import annotations

import argparse
import os
import re
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import torch
import torch.multiprocessing as mp

from epmoe.launch.commands import free_port
from epmoe.train.cli import load_config

WORLD = 2
TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.num_experts=4", "model.expert_hidden=32",
        "model.shared_hidden=32", "model.first_dense_layers=0", "model.max_seq_len=32", "data.seq_len=32",
        "train.precision=fp32", "train.batch_size=4"]  # fmt: skip
CASES = {  # name -> (overrides, whether `before` is counted)
    "local": ([], True),
    "alltoall": (["parallel.ep=2"], True),
    "pipelined": (["parallel.ep=2", "comm.dispatcher=pipelined", "comm.chunks=2"], True),
    "alltoall+fsdp": (["parallel.ep=2", "parallel.fsdp=true"], False),
}


@contextmanager
def _bincount_router():
    """The router counting with torch.bincount, as before router.py's count_ids."""
    with mock.patch("epmoe.model.router.count_ids", lambda ids, n: torch.bincount(ids.reshape(-1), minlength=n)):
        yield


def _reason(text: str) -> str:
    """The first line of a break reason, without addresses and line numbers."""
    first = text.strip().splitlines()[0]
    return re.sub(r"0x[0-9a-f]+| line \d+", "", first)[:110]


def explain_block(overrides: list[str], before: bool) -> tuple[int, int, list[str]]:
    """(graphs, graph breaks, reasons) of block 0 of the model `overrides` build on this rank."""
    from epmoe.model.transformer import Transformer
    from epmoe.parallel.compile import eager_dispatch
    from epmoe.parallel.parallelize import parallelize

    cfg = load_config([*TINY, *overrides])
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.router)
    if cfg.parallel.ep > 1:  # else each rank alone, with the local dispatcher
        parallelize(model, cfg, torch.device("cpu"))
    if not before:
        eager_dispatch(model)
    block = model.blocks[0]
    captured = {}
    hook = block.register_forward_pre_hook(lambda _m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True)
    tokens_BS = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.data.seq_len))
    with torch.no_grad():
        model(tokens_BS)
    hook.remove()
    torch._dynamo.reset()
    # after: dynamo's nested graph breaks on, as apply_compile sets them
    with _bincount_router() if before else nullcontext(), torch._dynamo.config.patch(nested_graph_breaks=not before):
        out = torch._dynamo.explain(block)(*captured["args"], **captured["kwargs"])
    return out.graph_count, out.graph_break_count, sorted({_reason(r.reason) for r in out.break_reasons})


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    lines = []
    for name, (overrides, has_before) in CASES.items():
        for before in (True, False) if has_before else (False,):
            graphs, breaks, reasons = explain_block(overrides, before)
            lines.append(f"| {name} | {'before' if before else 'after'} | {graphs} | {breaks} | "
                         f"{'; '.join(reasons) or '-'} |")  # fmt: skip
    if rank == 0:
        Path(out).write_text("\n".join(lines) + "\n")
    torch.distributed.barrier()
    os._exit(0)  # NOTE: skips torch's C++ teardown, which aborts finished ranks now and then (comm/process.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args()
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"compile_report_{os.getpid()}.md"
    mp.spawn(_rank, args=(free_port(), str(out)), nprocs=WORLD)
    print("| dispatcher | | graphs | graph breaks | reasons |\n|---|---|---|---|---|")
    print(out.read_text(), end="")
    out.unlink()


if __name__ == "__main__":
    main()
