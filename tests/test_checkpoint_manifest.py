"""The manifest's schema, the fingerprints a resume checks, and a save that runs out of disk.

Single-process checkpoints of the tiny model, written by `checkpoint_state.save` directly after
one optimizer step (no training run). The disk-full saves run in child processes whose
RLIMIT_FSIZE makes writes fail with EFBIG (SIGXFSZ ignored), and on a full tmpfs where a user
namespace allows mounting one (ENOSPC).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from epmoe.comm.parallel_dims import ParallelDims
from epmoe.config import Config, DataConfig, ModelConfig, RouterConfig
from epmoe.model.transformer import Transformer
from epmoe.placement.placement import Placement
from epmoe.train import checkpoint_files, checkpoint_state, manifest
from epmoe.train.checkpoint_files import CheckpointError, CheckpointWarning
from epmoe.train.cli import load_config
from epmoe.train.data import fingerprint, stdlib_root
from epmoe.train.engine import build_optimizer, build_schedule

from .conftest import REPO, TINY, free_port

# a smaller model still, whose checkpoint files are smaller than a manifest listing the stdlib corpus
SMALLER = ["model.d_model=16", "model.expert_hidden=8", "model.shared_hidden=8", "model.dense_hidden=16"]


def _cfg(data: str | Path | None, *extra: str) -> Config:
    source = ["data=text", f"data.path={data}"] if data is not None else []  # None: the stdlib corpus
    return load_config([*TINY, *source, *extra])


def _trained(cfg: Config) -> tuple[Transformer, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The tiny model after one optimizer step (so that AdamW has state to save)."""
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.router)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_schedule(optimizer, cfg.train)
    model(torch.randint(0, 256, (2, 16))).logits_BSV.float().square().mean().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def _save(run_dir: Path, step: int, cfg: Config, model, optimizer, scheduler) -> Path:
    dims = ParallelDims(1, 1, 1, cfg.model.num_experts)
    return checkpoint_state.save(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler, cfg=cfg,
                                 rank=0, dims=dims, placement=None)  # fmt: skip


def _restore(ckpt: Path, cfg: Config) -> tuple[checkpoint_state.Resumed, Transformer]:
    model = Transformer(cfg.model, cfg.router)
    optimizer = build_optimizer(model, cfg.train)
    dims = ParallelDims(1, 1, 1, cfg.model.num_experts)
    resumed = checkpoint_state.restore(ckpt, model, optimizer, build_schedule(optimizer, cfg.train), cfg, 0, dims, None)
    return resumed, model


def _corpus(folder: Path, n: int = 5) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"doc_{i:02d}.txt").write_text("".join(f"def f_{i}_{j}(x):\n    return x * {j}\n" for j in range(30)))
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Config, dict]:
    """A run directory with complete checkpoints at steps 2 and 3, its config and the saved model state."""
    root = tmp_path_factory.mktemp("saved")
    cfg = _cfg(_corpus(root / "corpus"))
    model, optimizer, scheduler = _trained(cfg)
    for step in (2, 3):
        _save(root / "run", step, cfg, model, optimizer, scheduler)
    return root / "run", cfg, {k: v.clone() for k, v in model.state_dict().items()}


def _edited_run(saved_run: Path, tmp_path: Path, edit) -> Path:
    """A copy of the saved run whose step-3 manifest went through `edit` (an edit that returns a
    list replaces the manifest by it)."""
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    path = checkpoint_files.checkpoint_dir(run) / "step_00000003" / checkpoint_files.MANIFEST
    m = json.loads(path.read_text())
    path.write_text(json.dumps(new if isinstance(new := edit(m), list) else m))
    return run


def _rows(m: dict) -> list[list[int]]:
    return m["placement"]["expert_of_slot_YS"]


EDITS = {  # an edit of the manifest, and the first problem read_manifest must name
    "removed key": (lambda m: m.pop("files"), "key 'files' is missing"),
    "removed nested key": (lambda m: m["data"].pop("next_step"), "key 'data.next_step' is missing"),
    "wrong type": (lambda m: m.update(step="3"), "'step' must be an int, not \"3\""),
    "bool for an int": (lambda m: m.update(ep=True), "'ep' must be an int, not true"),
    "placement row short": (lambda m: _rows(m)[0].pop(), r"row 0 must list 4 expert ids .*, not \[0, 1, 2\]"),
    "placement row missing": (
        lambda m: m["placement"].update(expert_of_slot_YS=_rows(m)[:1]),
        "has 1 rows for 2 MoE layers",
    ),
    "expert id out of range": (lambda m: _rows(m)[1].__setitem__(0, 4), r"row 1 holds ids outside \[0, 4\)"),
    "expert missing": (lambda m: _rows(m)[0].__setitem__(0, 1), r"row 0 places no slot for experts \[0\]"),
    "expert_files short": (lambda m: m["expert_files"].pop(), r"'expert_files' must be \['experts_rank0.pt'\]"),
    "files incomplete": (lambda m: m["files"].pop("experts_rank0.pt"), "'files' lacks experts_rank0.pt"),
    "sha256 not hex": (lambda m: m["files"]["common.pt"].update(sha256="abc"), "sha256' is not 64 hex digits"),
    "negative size": (lambda m: m["files"]["common.pt"].update(bytes=-1), "'files.common.pt.bytes' must be >= 0"),
    "next_step edited": (lambda m: m["data"].update(next_step=5), r"'data.next_step' \(5\) differs from 'step' \(3\)"),
    "step edited with it": (
        lambda m: (m.update(step=5), m["data"].update(next_step=5)),
        r"'step' \(5\) differs from the directory's step \(3\)",
    ),
    "architecture edited": (
        lambda m: m["architecture"].update({"model.n_heads": 4}),
        r"'architecture.model.n_heads' \(4\) differs from 'config.model.n_heads'",
    ),
    "not an object": (lambda m: [m], "manifest.json is not an epmoe checkpoint manifest of format version 3"),
    "old format": (lambda m: m.update(format_version=2), "is not an epmoe checkpoint manifest of format version 3"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_manifest_is_a_one_line_error_and_resolve_falls_back(
    edit: str, saved: tuple[Path, Config, dict], tmp_path: Path
) -> None:
    change, problem = EDITS[edit]
    run = _edited_run(saved[0], tmp_path, change)
    ckpt = checkpoint_files.checkpoint_dir(run) / "step_00000003"
    with pytest.raises(CheckpointError) as caught:
        checkpoint_files.read_manifest(ckpt)
    message = str(caught.value)
    assert message.startswith(f"{ckpt / checkpoint_files.MANIFEST}") and "\n" not in message
    assert re.search(problem, message), message
    with pytest.warns(CheckpointWarning, match=r"skipping checkpoint .*step_00000003: .*manifest.json"):
        assert checkpoint_files.resolve(run).name == "step_00000002"
    # train.resume=<run dir> alone takes its config from the newest checkpoint whose manifest reads
    assert checkpoint_files.readable(run)[0].name == "step_00000002"
    assert load_config([f"train.resume={run}"]).model == saved[1].model


def _mutations(m: dict) -> list[tuple[str, dict]]:
    """(what, manifest) for every key or item deleted and every value replaced by one of another
    type. Left out: the config's fields beyond the architecture (not the schema's), all but one
    entry of the data source's files, and two deletions that are no schema error: a data file's
    entry (a file removed from the corpus: a warning at resume) and an expert weight's name."""
    other = {int: "x", float: "x", str: 7, bool: "x", list: {}, dict: [], type(None): 7}
    first_file = next(iter(m["data"]["source"]["files"]))
    out = []

    def walk(node: dict | list, path: tuple) -> None:
        for k in range(len(node)) if isinstance(node, list) else list(node):
            where = (*path, k)
            if where[0] == "config" and len(where) > 2:
                if len(where) > 3 or f"{where[1]}.{where[2]}" not in manifest.ARCHITECTURE:
                    continue
            in_files = where[:3] == ("data", "source", "files") and len(where) > 3
            if in_files and where[3] != first_file:
                continue
            deletable = not ((in_files and len(where) == 4) or where[0] == "expert_weights")
            for what in ("retyped", "deleted") if deletable else ("retyped",):
                edited = copy.deepcopy(m)
                parent = edited
                for step in path:
                    parent = parent[step]
                if what == "deleted":
                    del parent[k]
                else:
                    parent[k] = other[type(parent[k])]
                out.append((f"{'.'.join(map(str, where))} {what}", edited))
            if isinstance(node[k], (dict, list)):
                walk(node[k], where)

    walk(m, ())
    return out


def test_no_manifest_edit_escapes_as_another_exception(saved: tuple[Path, Config, dict], tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints" / "step_00000003"
    shutil.copytree(checkpoint_files.checkpoint_dir(saved[0]) / "step_00000003", ckpt)
    good = json.loads((ckpt / checkpoint_files.MANIFEST).read_text())
    mutations = _mutations(good)
    assert len(mutations) > 150
    passed = []
    for name, m in mutations:
        (ckpt / checkpoint_files.MANIFEST).write_text(json.dumps(m))
        try:
            checkpoint_files.read_manifest(ckpt)
            passed.append(name)
        except CheckpointError as e:
            assert "\n" not in str(e) and str(e).startswith(str(ckpt / checkpoint_files.MANIFEST)), name
    assert passed == []


def test_every_model_and_router_field_is_architecture_or_says_why_not() -> None:
    every = {f"model.{f.name}" for f in fields(ModelConfig)} | {f"router.{f.name}" for f in fields(RouterConfig)}
    assert set(manifest.ARCHITECTURE) | set(manifest.NOT_ARCHITECTURE) == every
    assert not set(manifest.ARCHITECTURE) & set(manifest.NOT_ARCHITECTURE)
    assert "model.n_heads" in manifest.ARCHITECTURE and "model.expert_impl" in manifest.NOT_ARCHITECTURE


def test_resume_into_another_architecture_is_refused_before_any_tensor_is_read(
    saved: tuple[Path, Config, dict], tmp_path: Path
) -> None:
    ckpt = tmp_path / "checkpoints" / "step_00000003"
    shutil.copytree(checkpoint_files.checkpoint_dir(saved[0]) / "step_00000003", ckpt)
    other = _cfg(saved[1].data.path, "model.n_heads=4", "router.top_k=3")
    # n_heads changes no shape: without the check the weights would load into another function
    Transformer(other.model, other.router).load_state_dict(checkpoint_state.consolidate(ckpt))
    for name in ("common.pt", "experts_rank0.pt"):
        (ckpt / name).unlink()  # reading a tensor now would fail with "cannot load checkpoint file"
    with pytest.raises(CheckpointError) as caught:
        _restore(ckpt, other)
    assert str(caught.value) == (
        f"{ckpt}: the checkpoint's architecture differs from this run's: model.n_heads 2 (saved) vs 4 (now), "
        "router.top_k 2 (saved) vs 3 (now); resume with the checkpoint's config (drop those overrides)"
    )


def test_resume_with_only_non_architecture_changes_restores_the_saved_state(saved: tuple[Path, Config, dict]) -> None:
    run, cfg, state = saved
    other = _cfg(cfg.data.path, "model.expert_impl=loop", "model.max_seq_len=64", "router.aux_loss_coef=0.1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # the same data: no warning either
        resumed, model = _restore(checkpoint_files.resolve(run), other)
    assert resumed.step == 3 and resumed.path.name == "step_00000003"
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_a_changed_data_source_is_a_warning_naming_what_changed(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus")
    cfg = _cfg(corpus)
    ckpt = _save(tmp_path / "run", 1, cfg, *_trained(cfg))
    shutil.copytree(corpus, tmp_path / "copy")  # new mtimes, the same bytes
    for f in (tmp_path / "copy").iterdir():
        os.utime(f, ns=(0, f.stat().st_mtime_ns + 10**9))
    (corpus / "doc_00.txt").write_text("other text")
    (corpus / "doc_01.txt").unlink()
    (corpus / "new.txt").write_text("more text")
    with pytest.warns(CheckpointWarning) as caught:
        _restore(ckpt, cfg)
    assert [str(w.message) for w in caught] == [
        f"resuming {ckpt} on a changed data source: files added: new.txt; files removed: doc_01.txt; "
        "files changed: doc_00.txt; the batches will not be those of the saved run"
    ]
    with pytest.warns(CheckpointWarning) as caught:  # the copy holds the saved files: only the path differs
        _restore(ckpt, _cfg(tmp_path / "copy"))
    assert [str(w.message) for w in caught] == [
        f"resuming {ckpt} on a changed data source: data.path {corpus} (saved) -> {tmp_path / 'copy'} (now); "
        "the batches will not be those of the saved run"
    ]


def test_fingerprint_hashes_the_ends_and_notices_a_new_mtime_on_a_large_file(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    big = folder / "big.txt"
    big.write_bytes(b"a" * (3 << 20))
    (folder / "small.txt").write_text("small")
    cfg = DataConfig(kind="text", path=str(folder))
    before = fingerprint(cfg)
    assert before["kind"] == "text" and before["path"] == str(folder.resolve())
    assert before["files"]["big.txt"]["sha256_ends"] == hashlib.sha256(b"a" * (2 << 20)).hexdigest()
    assert before["files"]["small.txt"] == {"bytes": 5, "mtime_ns": (folder / "small.txt").stat().st_mtime_ns,
                                            "sha256_ends": hashlib.sha256(b"small").hexdigest()}  # fmt: skip
    for f in (big, folder / "small.txt"):
        os.utime(f, ns=(0, f.stat().st_mtime_ns + 10**9))
    # the small file's hash covers it whole; the big file's middle is unhashed, so its mtime counts
    assert manifest.data_source_changes(before, fingerprint(cfg)) == ["files changed: big.txt"]
    stdlib = fingerprint(DataConfig())
    os_py = stdlib_root() / "os.py"
    assert stdlib["kind"] == "stdlib" and stdlib["path"] == str(stdlib_root()) and len(stdlib["files"]) > 500
    assert stdlib["files"]["os.py"]["sha256_ends"] == hashlib.sha256(os_py.read_bytes()).hexdigest()


# -- disk full -------------------------------------------------------------------------------------


def _save_then_fail(rank: int, world: int, port: int, root: str, data: str | None, fail: str) -> None:
    """One rank: save step 1, then save step 2 with `fail` written over a limit (RLIMIT_FSIZE)
    on the last rank ("none": no limit, the disk itself fills); writes what happened to root/rank<r>.json."""
    from epmoe.comm.process import end_process, init_from_env

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    init_from_env(torch.device("cpu"), timeout_s=60)
    cfg = _cfg(data, *([] if data else SMALLER), f"parallel.ep={world}")
    model, optimizer, scheduler = _trained(cfg)
    E, dims = cfg.model.num_experts, ParallelDims(world, world, world, cfg.model.num_experts)
    placement = Placement(torch.arange(E).repeat(2, 1), world, E, "contiguous") if world > 1 else None
    run_dir = Path(root) / "run"

    def save(step: int) -> Path:  # the rows saved are not read back: the model need not be sharded
        return checkpoint_state.save(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler, cfg=cfg,
                                     rank=rank, dims=dims, placement=placement)  # fmt: skip

    first = save(1)
    sizes = {n: f["bytes"] for n, f in checkpoint_files.read_manifest(first)["files"].items()}
    limit = {"experts": 1, "common": sizes["experts_rank0.pt"] + 1, "manifest": max(sizes.values()) + 1}.get(fail)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit is not None and rank == world - 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        save(2)
        record = {"error": None}
    except CheckpointError as e:
        record = {"error": str(e)}
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    if rank == 0:  # it removed the temporary directory before it raised
        folder = checkpoint_files.checkpoint_dir(run_dir)
        record["left"] = sorted(p.name for p in folder.iterdir())
        record["verified"] = checkpoint_files.verify(first)["step"]
    Path(root, f"rank{rank}.json").write_text(json.dumps(record))
    end_process(0)


def _spawn(world: int, root: Path, data: str | None, fail: str) -> list[dict]:
    ctx = mp.start_processes(_save_then_fail, args=(world, free_port(), str(root), data, fail), nprocs=world,
                             join=False, start_method="spawn")  # fmt: skip
    for _ in range(120):  # a rank left waiting in a collective would hang here
        if ctx.join(timeout=1):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail(f"the save with {fail} failing hung")
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(world)]


def _expected(root: Path, errno_text: str, file: str) -> str:
    previous = checkpoint_files.checkpoint_dir(root / "run") / "step_00000001"
    kept = f"the previous checkpoint {previous} is intact"
    return f"checkpoint step_00000002 not saved: {errno_text} writing {file}; {kept}"


@pytest.mark.parametrize(
    ("world", "fail", "file"),
    [(1, "experts", "experts_rank0.pt"), (1, "common", "common.pt"), (1, "manifest", "manifest.json"),
     (2, "experts", "experts_rank1.pt")],
    ids=["expert-file", "common", "manifest", "rank1-of-2"],
)  # fmt: skip
def test_a_write_past_the_file_size_limit_fails_the_save_on_every_rank(
    world: int, fail: str, file: str, tmp_path: Path
) -> None:
    corpus = None if fail == "manifest" else str(_corpus(tmp_path / "corpus"))  # the stdlib: a large manifest
    records = _spawn(world, tmp_path, corpus, fail)
    expected = _expected(tmp_path, "File too large", file)
    assert [r["error"] for r in records] == [expected] * world
    assert records[0]["left"] == ["step_00000001"] and records[0]["verified"] == 1
    folder = checkpoint_files.checkpoint_dir(tmp_path / "run")
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000001"]  # no step_00000002.tmp left
    assert checkpoint_files.resolve(tmp_path / "run").name == "step_00000001"  # it verifies


def test_a_full_filesystem_fails_the_save_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no user namespace to mount a small tmpfs in (unshare -rm)")
    corpus = _corpus(tmp_path / "corpus")
    mount = tmp_path / "disk"
    mount.mkdir()
    # two checkpoints of ~1.4 MB do not fit in 2 MB: the second fills the disk
    script = (f"from tests.test_checkpoint_manifest import _save_then_fail; "
              f"_save_then_fail(0, 1, 0, {str(mount)!r}, {str(corpus)!r}, 'none')")  # fmt: skip
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=2m tmpfs "{mount}" && '
                           f'"{sys.executable}" -c "{script}" && cp "{mount}/rank0.json" "{tmp_path}"'],
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "rank0.json").read_text())
    assert record["error"] is not None and record["error"].startswith(
        "checkpoint step_00000002 not saved: No space left on device writing "
    ), record
    assert record["error"].endswith(f"; the previous checkpoint {mount}/run/checkpoints/step_00000001 is intact")
    assert record["left"] == ["step_00000001"] and record["verified"] == 1
