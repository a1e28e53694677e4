"""Importing a Hugging Face MoE bigger than one rank's share: peak memory per rank under EP=2
against `transformers`' own `from_pretrained`, and the import / export times.

What is measured, each in a fresh process (so that each peak is its own):
1. a random OLMoE-like model (~0.94B parameters by default) built by `transformers` from a
   config written here and saved with its `save_pretrained` (fp32 safetensors, 5 GB shards);
2. `transformers.AutoModelForCausalLM.from_pretrained` of that folder (fp32, one process);
3. `epmoe.hf.from_pretrained` of it (one process, every expert);
4. the import into 2 expert-parallel gloo ranks (EP=2, the path of `train.init_from`:
   `epmoe.hf.convert.load_parallel`), each rank reading the non-expert tensors and its own
   experts; its bytes read are checked against that sum from the files' headers;
5. `python -m epmoe.hf import <folder> <checkpoint>` and `... export <checkpoint> <folder>`,
   and the export compared tensor by tensor with the original folder (bit-identical).
Peak memory is the process's peak resident set (ru_maxrss), which includes the interpreter and
torch (the "added" column subtracts the resident set before the load). Times are wall seconds
of the load or conversion alone, on this machine's 2 cores, one run each (the loads are disk-
and memory-bound; the page cache is warm after phase 1 for every phase alike).

    .venv/bin/python -m benchmarks.hf_import [--layers 8] [--d-model 1024] [--experts 32] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
EXPERT_TENSOR = re.compile(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.")  # OLMoE's per-expert names


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _hf_config(args: argparse.Namespace):
    import transformers

    return transformers.OlmoeConfig(
        vocab_size=50304, hidden_size=args.d_model, intermediate_size=args.d_model, num_hidden_layers=args.layers,
        num_attention_heads=16, num_key_value_heads=16, num_experts=args.experts,
        num_experts_per_tok=min(8, args.experts), max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip


# --- phases, each run in its own process; each prints one JSON line ---


def phase_make(args: argparse.Namespace) -> dict:
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(args), dtype=torch.float32)
    t0 = time.perf_counter()
    model.save_pretrained(args.folder)
    return {"params": sum(p.numel() for p in model.parameters()), "save_s": time.perf_counter() - t0}


def _timed_load(load) -> dict:
    """Seconds and peak resident set of `load()` (a model), with the resident set before it."""
    before, t0 = _rss_bytes(), time.perf_counter()
    model = load()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak": _peak_bytes(), "before": before,
            "params": sum(p.numel() for p in model.parameters())}  # fmt: skip


def phase_transformers(args: argparse.Namespace) -> dict:
    import transformers

    return _timed_load(lambda: transformers.AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32))


def phase_epmoe(args: argparse.Namespace) -> dict:
    from epmoe.hf import from_pretrained

    return _timed_load(lambda: from_pretrained(args.folder)[1])


def _expected_bytes(folder: Path, own: dict[int, set[int]]) -> int:
    """The non-expert tensors' bytes plus those of the experts in own[layer], from the headers."""
    from safetensors import safe_open

    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                size = (
                    torch.Size(piece.get_shape()).numel()
                    * torch.empty(0, dtype=_dtype(piece.get_dtype())).element_size()
                )
                m = EXPERT_TENSOR.search(name)
                if m is None or int(m[2]) in own[int(m[1])]:
                    total += size
    return total


def _dtype(name: str) -> torch.dtype:
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[name]


def phase_rank(args: argparse.Namespace) -> dict:
    from dataclasses import replace

    from epmoe.hf.convert import config_from_hf, load_parallel
    from epmoe.model.moe import named_moe_layers

    torch.set_num_threads(1)  # two ranks on two cores
    cfg = config_from_hf(args.folder)
    cfg = replace(cfg, parallel=replace(cfg.parallel, ep=2))
    before, t0 = _rss_bytes(), time.perf_counter()
    model, par, folder = load_parallel(cfg, args.folder, torch.device("cpu"))
    seconds = time.perf_counter() - t0
    peak = _peak_bytes()
    own = {int(name.split(".")[1]): {int(e) for e in par.placement.experts_on_rank(y, par.ep_rank)}
           for y, (name, _) in enumerate(named_moe_layers(model))}  # fmt: skip
    return {"rank": par.info.rank, "seconds": seconds, "peak": peak, "before": before,
            "bytes_read": folder.bytes_read, "expected_bytes": _expected_bytes(args.folder, own),
            "params": sum(p.numel() for p in model.parameters())}  # fmt: skip


def phase_cli(args: argparse.Namespace) -> dict:
    from epmoe.hf.__main__ import main

    before, t0 = _rss_bytes(), time.perf_counter()
    code = main(args.argv)
    return {"seconds": time.perf_counter() - t0, "peak": _peak_bytes(), "before": before, "code": code}


def phase_compare(args: argparse.Namespace) -> dict:
    """Every tensor of folder `a` bit-equal to the one of the same name in folder `b`."""
    from epmoe.hf.convert import SafetensorsFolder

    a, b = SafetensorsFolder(Path(args.argv[0])), SafetensorsFolder(Path(args.argv[1]))
    names = sorted(a.file_of)
    differ = [n for n in names if not torch.equal(a.read(n), b.read(n))]
    return {"tensors": len(names), "same_names": names == sorted(b.file_of), "differ": differ[:5]}


PHASES = {f.__name__.removeprefix("phase_"): f for f in
          (phase_make, phase_transformers, phase_epmoe, phase_rank, phase_cli, phase_compare)}  # fmt: skip


# --- the driver ---


def _run(phase: str, args: argparse.Namespace, *extra: str, env: dict | None = None) -> subprocess.Popen:
    shape = ["--layers", str(args.layers), "--d-model", str(args.d_model), "--experts", str(args.experts)]
    cmd = [sys.executable, "-m", "benchmarks.hf_import", "--phase", phase, "--folder", str(args.folder), *shape,
           "--", *extra]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0", **(env or {})}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"a phase failed (exit {proc.returncode}): {proc.args}")
    return json.loads(out.strip().splitlines()[-1])


def _ranks(args: argparse.Namespace) -> list[dict]:
    from epmoe.launch.commands import free_port

    port = str(free_port())
    procs = [_run("rank", args, env={"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in range(2)]  # fmt: skip
    return sorted((_result(p) for p in procs), key=lambda r: r["rank"])


def _state_line(params_total: int, params_rank: int) -> str:
    """Training state per parameter in fp32 with AdamW: weight, gradient and two moments."""
    share = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2
    return (
        f"training state (fp32 weight + gradient + 2 AdamW moments = 16 B/param): the whole model "
        f"{16 * params_total / 2**30:.1f} GiB; one EP=2 rank's {16 * params_rank / 2**30:.1f} GiB; "
        f"one rank's share of this machine's memory (2 ranks) {share / 2**30:.1f} GiB"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=1024, help="also each expert's hidden size (OLMoE's shape)")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--workdir", type=Path, default=None, help="where the folders go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the folders")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    p.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return

    work = Path(tempfile.mkdtemp(prefix="hf_import_", dir=args.workdir))
    args.folder = work / "hf"
    try:
        made = _result(_run("make", args))
        size = sum(f.stat().st_size for f in args.folder.glob("*.safetensors"))
        print(
            f"random OLMoE-like model: {made['params'] / 1e9:.3f}B parameters, {size / 2**30:.2f} GiB of "
            f"safetensors, saved by transformers in {made['save_s']:.1f} s",
            flush=True,
        )
        rows = [("transformers from_pretrained (1 process)", _result(_run("transformers", args)))]
        rows.append(("epmoe.hf.from_pretrained (1 process)", _result(_run("epmoe", args))))
        ranks = _ranks(args)
        rows += [(f"epmoe EP=2 import, rank {r['rank']}", r) for r in ranks]
        ckpt, back = work / "checkpoint", work / "exported"
        rows.append(
            ("python -m epmoe.hf import (1 process)", _result(_run("cli", args, "import", str(args.folder), str(ckpt))))
        )
        rows.append(
            ("python -m epmoe.hf export (1 process)", _result(_run("cli", args, "export", str(ckpt), str(back))))
        )
        same = _result(_run("compare", args, str(args.folder), str(back)))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    lines = ["| what | seconds | peak RSS GiB | added GiB | parameters held |", "|---|---:|---:|---:|---:|"]
    for what, r in rows:
        held = f"{r['params'] / 1e9:.3f}B" if "params" in r else ""
        peak, added = r["peak"] / 2**30, (r["peak"] - r["before"]) / 2**30
        lines.append(f"| {what} | {r['seconds']:.1f} | {peak:.2f} | {added:.2f} | {held} |")
    lines.append("")
    for r in ranks:
        ok = "equal" if r["bytes_read"] == r["expected_bytes"] else "DIFFERENT"
        read, expected = r["bytes_read"] / 2**30, r["expected_bytes"] / 2**30
        lines.append(f"- rank {r['rank']} read {read:.3f} GiB of {size / 2**30:.3f} GiB: {ok} to the non-expert "
                     f"tensors plus its own experts ({expected:.3f} GiB, from the headers)")  # fmt: skip
    lines.append(f"- {_state_line(made['params'], ranks[0]['params'])}")
    lines.append(f"- export vs the original folder: {same['tensors']} tensors, same names: {same['same_names']}, "
                 f"differing: {same['differ'] or 'none'} (bit-identical when none)")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hf_import.md").write_text(f"# Hugging Face import at EP=2\n\n{table}\n")
    if any(r["bytes_read"] != r["expected_bytes"] for r in ranks) or same["differ"] or not same["same_names"]:
        raise SystemExit("a rank read other bytes than its own, or the export differs from the original")


if __name__ == "__main__":
    main()
