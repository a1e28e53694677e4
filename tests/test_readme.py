"""README.md is tested: every shell command of its ```bash blocks runs here, as a cheap variant
of itself, and fails the test if it errors (a non-zero exit or a traceback); its ```python block
runs on a tiny Hugging Face folder; every relative link of README.md and docs/architecture.md
names a file of the repository.

How each command runs is the table VARIANTS below, keyed by the command's first words
(`.venv/bin/python` read as `python`); the README's placeholders (`path/to/hf_model`, ...) are
the table PLACEHOLDERS, filled with things the test builds in its temporary folder, and $VARS
expand as a shell expands them (HOME is a folder the test makes). A README command or
placeholder that neither table knows fails its test, naming the table to add it to, so a new
README line cannot go untested. `pytest -s tests/test_readme.py` prints every README command
and what ran for it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from tests.conftest import REPO, _write_corpus

README = REPO / "README.md"
DOCS = [README, REPO / "docs" / "architecture.md"]  # the pages whose relative links must resolve

# The tiny model and the few steps a `python -m epmoe.train` command runs with here (as the
# command's own values of these keys, it keeps every other override). The model keys are left
# out where the model comes from elsewhere (train.resume: the checkpoint; train.init_from: the folder).
TINY_MODEL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.expert_hidden=16",
              "model.shared_hidden=16", "model.dense_hidden=48", "model.max_seq_len=32"]  # fmt: skip
STEPS = 3
FEW_STEPS = ["data.seq_len=32", f"train.steps={STEPS}", "train.batch_size=2", "train.warmup_steps=1",
             f"train.eval_every={STEPS}", "train.eval_batches=1", "train.sample_bytes=8", "train.log_every=1",
             "logger.progress=false", "logger.plots=false"]  # fmt: skip


# -- the two tables ------------------------------------------------------------------------------

# README command (its first words; `.venv/bin/python` reads as `python`) -> the runner, defined
# below, that runs it here. Each entry says why that variant is faithful. A new README command
# is one line here.
VARIANTS: dict[tuple[str, ...], str] = {
    # the same program (run as `python -m` runs it) and overrides, on TINY_MODEL for FEW_STEPS:
    # what is slow is size, not code. --multirun sweeps for real (every job), and train.resume
    # continues a real checkpoint.
    ("python", "-m", "epmoe.train"): "train_tiny",
    # --cfg job composes and validates the whole config; check() is everything the launcher
    # checks before it starts a rank (degrees against the world, the hostfile, data, resume target,
    # memory). What is left is starting torchrun, mpiexec, DeepSpeed or sbatch, which
    # tests/test_launch.py runs for real. --help and --cfg job run as written; --multirun plans its
    # jobs and checks each (tests/test_sweep.py sweeps for real).
    ("python", "-m", "epmoe.launch"): "launch_checked",
    # import and export of tiny folders and checkpoints are cheap as written; so are sampling
    # (200 tokens of a tiny model), evaluating and plotting a tiny run
    ("python", "-m", "epmoe.hf"): "module_as_written",
    ("python", "-m", "epmoe.generate"): "module_as_written",
    ("python", "-m", "epmoe.eval"): "module_as_written",
    ("python", "-m", "epmoe.plot"): "module_as_written",
    # training a tokenizer on, and preparing shards of, the test's ~/books/ (40 small files) take a
    # second as written; so does upcycling a tiny dense run
    ("python", "-m", "epmoe.data"): "module_as_written",
    ("python", "-m", "epmoe.upcycle"): "module_as_written",
    # a target runs what `make -n` prints; each printed line goes through this table again
    ("make", "train"): "make_recipe",
    ("make", "test"): "make_recipe",
    # `make test` runs ruff as written (seconds), and the suite only as far as collecting it:
    # running all of it inside one of its own tests would take the suite's time again
    (".venv/bin/ruff", "check"): "as_written",
    ("python", "-m", "pytest"): "pytest_collect",
}


@dataclass(frozen=True)
class Input:
    """A thing a module fixture builds once, named as in `things`."""

    name: str


@dataclass(frozen=True)
class Output:
    """A folder the command creates: a fresh path in the command's folder, checked to exist after."""


# README placeholder -> what stands in for it. `$HOME/books/` needs none: HOME is a folder holding books/.
PLACEHOLDERS: dict[str, Input | Output] = {
    "path/to/hf_model": Input("hf_model"),  # a tiny random OLMoE folder saved by transformers (vocabulary 256)
    "outputs/<date>/<time>": Input("hf_run"),  # a finished 2-step run trained from that folder: what export reads
    "outputs/2026-11-25/15-10-24": Input("run"),  # a finished 2-step run of TINY_MODEL: what train.resume continues
    "hosts": Input("hostfile"),  # a DeepSpeed hostfile, "localhost slots=2"
    "path/to/tokenizer.json": Input("tokenizer"),  # a BPE tokenizer trained on ~/books/ by train-tokenizer
    "path/to/shards": Input("shards"),  # ~/books/ prepared with that tokenizer
    "path/to/dense_run": Input("dense_run"),  # a finished 2-step run of TINY_MODEL without experts
    "path/to/out": Output(),
    "path/to/run_dir": Output(),
}
# after these flags a placeholder names what the command writes: a fresh path, as an Output
WRITES = ("--out",)
LOOKS_LIKE_A_PLACEHOLDER = re.compile(r"path/to/|<[^>]*>|^(outputs|multirun)/")


# -- the runners ----------------------------------------------------------------------------------


@dataclass
class Ctx:
    """One README command's run: its own folder, the fixtures' things, and the log of what ran."""

    tmp: Path
    things: Callable[[str], Path]  # a fixture's thing by name (PLACEHOLDERS' Input names)
    ran: list[str] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)  # Output placeholders: the command must create them


def _words(command: list[str]) -> list[str]:
    return [sys.executable if w in ("python", "python3", ".venv/bin/python") else w for w in command]


def _subprocess(ctx: Ctx, command: list[str], cwd: Path = REPO) -> str:
    """Run `command` (python and .venv/bin/python are this interpreter); its output, or fail."""
    command = _words(command)
    ctx.ran.append(shlex.join(command))
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback (most recent call last)" not in out, (
        f"{shlex.join(command)} exited {proc.returncode}:\n{out[-4000:]}"
    )
    return out


def _in_process(ctx: Ctx, main: Callable[[list[str]], object], name: str, argv: list[str]) -> str:
    """`main(argv)` in this process, as `python -m <name>` would run it; its stdout, or fail."""
    ctx.ran.append(shlex.join(["python", "-m", name, *argv]) + "   (in process)")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    assert code in (0, None) and "Traceback (most recent call last)" not in err.getvalue(), (
        f"python -m {name} {shlex.join(argv)} exited {code}:\n{out.getvalue()[-2000:]}{err.getvalue()[-4000:]}"
    )
    return out.getvalue() + err.getvalue()


def _python_m(ctx: Ctx, module: str, argv: list[str]) -> str:
    """`python -m <module> <argv>` in this process: runpy runs the module as __main__ with this
    sys.argv, as the interpreter would. NOTE: a rank's end_process (os._exit, epmoe/comm/process.py)
    becomes SystemExit with its code, and die_with_parent a no-op: this process outlives the run."""

    def end_process(code: int):
        raise SystemExit(code)

    def run(argv: list[str]) -> None:
        with (
            mock.patch.object(sys, "argv", [module, *argv]),
            mock.patch("epmoe.comm.process.end_process", end_process),
            mock.patch("epmoe.comm.process.die_with_parent", lambda *args: None),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before
            runpy.run_module(module, run_name="__main__", alter_sys=True)

    return _in_process(ctx, run, module, argv)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _finished_runs(root: Path, sweep: bool) -> list[Path]:
    """The run directories a command wrote (a sweep's job folders), each checked to have trained STEPS steps."""
    runs = sorted((p for p in root.iterdir() if (p / ".hydra").is_dir()), key=lambda p: p.name) if sweep else [root]
    for run in runs:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert records and records[-1]["step"] == STEPS, f"{run}: last step {records[-1:]} (expected {STEPS})"
    return runs


def _check_sweep(args: list[str], runs: list[Path]) -> None:
    """A sweep made a job per value: every value of a `key=a,b,c` override appears in some job's overrides."""
    assert len(runs) > 1, f"--multirun ran {len(runs)} job(s)"
    seen = {o for run in runs for o in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())}
    for a in args:
        if "=" in a and "," in a.split("=", 1)[1] and not a.startswith("hydra."):
            key, values = a.split("=", 1)
            missing = [v for v in values.split(",") if f"{key}={v}" not in seen]
            assert not missing, f"the sweep ran no job with {key}={missing}: {sorted(seen)}"


def train_tiny(ctx: Ctx, command: list[str]) -> None:
    """`python -m epmoe.train ...` with FEW_STEPS (and TINY_MODEL), run as `python -m` runs it (in
    this process: each run's start-up would cost seconds); its run directories trained STEPS steps."""
    args = command[3:]
    borrowed = any(_key(a) in ("train.resume", "train.init_from") for a in args)
    cheap = FEW_STEPS + ([] if borrowed else TINY_MODEL)
    sweep = "--multirun" in args or "-m" in args
    out_dir = ctx.tmp / ("sweep" if sweep else "run")
    cheap_keys = {_key(c) for c in cheap}
    args = [a for a in args if _key(a) not in cheap_keys] + cheap
    args.append(f"hydra.{'sweep' if sweep else 'run'}.dir={out_dir}")
    out = _python_m(ctx, "epmoe.train", args)
    runs = _finished_runs(out_dir, sweep)
    if sweep:
        _check_sweep(args, runs)
    if any(_key(a) == "train.resume" for a in args):
        assert "resumed from step" in out, out[-2000:]
    if "logger=wandb" in args:
        assert all((run / "wandb").is_dir() for run in runs), "logger=wandb wrote no wandb/ run"


def launch_checked(ctx: Ctx, command: list[str]) -> None:
    """`python -m epmoe.launch ...`: with `--cfg job` (in process), then the launcher's own check()."""
    from epmoe.launch.__main__ import LAUNCH_ERRORS, check, main
    from epmoe.train.cli import PATH_KEYS, expand_path

    args = command[3:]
    if {"--help", "-h", "--cfg"} & set(args):  # starts nothing as written
        _in_process(ctx, main, "epmoe.launch", args)
        return
    if "--multirun" in args or "-m" in args:
        # what the launcher does before it starts any job: plan the jobs, check each as one launch
        # (tests/test_sweep.py runs a real launcher sweep; here each job would start ranks)
        from epmoe.launch.sweep import plan

        sweep_dir, jobs = plan([*args[: args.index("--multirun")], *args[args.index("--multirun") + 1 :],
                                f"hydra.sweep.dir={ctx.tmp / 'sweep'}"])  # fmt: skip
        for job in jobs:
            ctx.ran.append(f"epmoe.launch.__main__.check({job.overrides}, {job.run_dir})   (in process)")
            try:
                check(job.with_wandb_names(sweep_dir), job.run_dir)
            except LAUNCH_ERRORS as e:
                raise AssertionError(f"the launcher would refuse job {job.num} of {shlex.join(args)}: {e}") from None
        swept = {o for job in jobs for o in job.swept}
        for a in args:  # a job per value of every `key=a,b` override
            if "=" in a and "," in a.split("=", 1)[1]:
                key, values = a.split("=", 1)
                assert {f"{key}={v}" for v in values.split(",")} <= swept, f"no job for some of {a}: {sorted(swept)}"
        assert not sweep_dir.exists(), "the checks created the sweep directory"
        return
    composed = yaml.safe_load(_in_process(ctx, main, "epmoe.launch", [*args, "--cfg", "job"]))
    for a in args:  # the composed config holds what the command set
        key, eq, value = a.partition("=")
        if eq and "." in key and not key.startswith("hydra."):
            want = expand_path(value) if key in PATH_KEYS else yaml.safe_load(value)
            got = composed
            for part in key.split("."):
                got = got[part]
            assert str(got) == str(want), f"--cfg job shows {key}={got!r}, the command set {value!r}"
    run_dir = ctx.tmp / "run"
    ctx.ran.append(f"epmoe.launch.__main__.check({args}, run_dir={run_dir})   (in process)")
    try:
        check(args, run_dir)  # every check the launcher makes before it starts a rank
    except LAUNCH_ERRORS as e:
        raise AssertionError(f"the launcher would refuse {shlex.join(args)}: error: {e}") from None
    assert not run_dir.exists(), "the check created the run directory"


def as_written(ctx: Ctx, command: list[str]) -> None:
    """The command itself, in its own process (placeholders filled)."""
    _subprocess(ctx, command)


def module_as_written(ctx: Ctx, command: list[str]) -> None:
    """`python -m <module> ...` itself, in this process (placeholders filled)."""
    _python_m(ctx, command[2], command[3:])


def pytest_collect(ctx: Ctx, command: list[str]) -> None:
    """`python -m pytest ...` with --collect-only: the suite's files import and its tests collect."""
    _subprocess(ctx, [*command, "--collect-only", "-p", "no:cacheprovider"])


def make_recipe(ctx: Ctx, command: list[str]) -> None:
    """`make TARGET [VAR=...]`: make -n prints the commands the target runs, and each runs as its
    own entry of VARIANTS. -o .venv/.installed: the venv exists (this test runs in it), so the
    install recipe is left out."""
    # NOTE: under `make test` this is a sub-make: without the outer make's variables (make exports
    # command-line ones, e.g. `make test ARGS=...`) and with --no-print-directory it prints only the
    # recipe ("make[1]: Entering directory" otherwise)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "ARGS")}
    printed = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed", *command[1:]], cwd=REPO,
                             capture_output=True, text=True, check=True, env=env).stdout  # fmt: skip
    ctx.ran.append(f"make -n -o .venv/.installed {shlex.join(command[1:])}   (prints what it runs)")
    lines = [shlex.split(line) for line in printed.splitlines() if line.strip()]
    assert lines, f"{shlex.join(command)} runs nothing"
    for words in lines:
        run_command(ctx, words)


def _stand_in(ctx: Ctx, placeholder: str, written: bool = False) -> Path:
    """What stands in for a PLACEHOLDERS entry in this command's run; written: the command writes it
    (it follows one of WRITES), so a fresh path even for an Input."""
    kind = PLACEHOLDERS[placeholder]
    if isinstance(kind, Input) and not written:
        return ctx.things(kind.name)
    path = ctx.tmp / re.sub(r"\W+", "_", placeholder)
    ctx.outputs.append(path)
    return path


def _fill(ctx: Ctx, word: str, after: str = "") -> str:
    """`word`, or the value of a `key=value` word, with its placeholder replaced (after: the word before it)."""
    key, eq, value = word.rpartition("=") if "=" in word else ("", "", word)
    if value in PLACEHOLDERS:
        return f"{key}{eq}{_stand_in(ctx, value, written=after in WRITES)}"
    assert not LOOKS_LIKE_A_PLACEHOLDER.search(value), f"{value!r} looks like a placeholder: add it to PLACEHOLDERS"
    if value.startswith("~"):
        assert Path(os.path.expanduser(value)).exists(), f"{value}: add it to the `home` fixture"
    return word


def _variant(words: list[str]) -> Callable[[Ctx, list[str]], None] | None:
    """The runner of the longest VARIANTS key that `words` starts with, or None."""
    normalised = ("python" if _words(words[:1]) == [sys.executable] else words[0], *words[1:])
    keys = [k for k in VARIANTS if normalised[: len(k)] == k]
    return globals()[VARIANTS[max(keys, key=len)]] if keys else None


def run_command(ctx: Ctx, words: list[str]) -> None:
    """Run one command (README's, or one a make target prints) as its VARIANTS entry says."""
    runner = _variant(words)
    assert runner, (f"no variant for {shlex.join(words)!r}: add its first words to VARIANTS in "
                    "tests/test_readme.py, with why that variant is faithful")  # fmt: skip
    # $VARS expanded as the shell does, and a word's leading ~ (not one after `key=`: not an assignment)
    words = [os.path.expanduser(os.path.expandvars(w)) if w.startswith("~") else os.path.expandvars(w) for w in words]
    runner(ctx, [_fill(ctx, w, after) for after, w in zip(["", *words], words)])


# -- reading the README -----------------------------------------------------------------------


def fenced(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def shell_commands(text: str) -> list[list[str]]:
    """The commands of the ```bash blocks as the shell splits them: a line continued with `\\`
    joins the next, a `#` comment is not part of its command ($VARS are expanded when it runs)."""
    commands = []
    for block in fenced(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if words := shlex.split(line, comments=True):
                # NOTE: run_command expands $VARS in every word; a shell leaves them alone in single quotes
                assert not ("'" in line and "$" in line), f"single quotes and $ in one README line: {line}"
                commands.append(words)
    return commands


COMMANDS = shell_commands(README.read_text())
RAN: dict[str, list[str]] = {}  # README command -> what ran, printed at the end of the module


# -- fixtures: the things placeholders stand for ------------------------------------------------


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """HOME for the commands: `$HOME/books/` is a folder of 40 small text files."""
    home = tmp_path_factory.mktemp("home")
    _write_corpus(home / "books")
    return home


def hostfile(path: Path) -> Path:
    path.write_text("localhost slots=2\n")
    return path


@pytest.fixture(scope="module")
def things(tmp_path_factory, home) -> Callable[[str], Path]:
    """The Input placeholders' things, each built once, when a command first needs it."""
    from epmoe.train.cli import load_config
    from epmoe.train.trainer import train
    from tests.hf_tiny import save

    root = tmp_path_factory.mktemp("things")
    text = ["data=text", f"data.path={home / 'books'}"]
    two_steps = [*FEW_STEPS, "train.steps=2", "train.eval_every=2", "train.precision=fp32"]

    def run(name: str, *overrides: str) -> Path:  # a finished run with its final checkpoint
        return train(load_config([*two_steps, *text, *overrides]), root / name).run_dir

    builders: dict[str, Callable[[], Path]] = {
        "hf_model": lambda: save("olmoe", root / "hf_model", vocab_size=256),
        "hf_run": lambda: run("hf_run", f"train.init_from={get('hf_model')}"),
        "run": lambda: run("run", *TINY_MODEL),
        "hostfile": lambda: hostfile(root / "hostfile"),
        "tokenizer": lambda: data_cli("train-tokenizer", "--vocab", "512", "--out", root / "tokenizer.json"),
        "shards": lambda: data_cli("prepare", "--tokenizer", get("tokenizer"), "--out", root / "shards"),
        "dense_run": lambda: run("dense_run", "model=dense_small", *TINY_MODEL),
    }

    def data_cli(command: str, *args: str | Path) -> Path:  # python -m epmoe.data on ~/books/: its --out
        from epmoe.data.__main__ import main

        assert main([command, *map(str, args), "--no-progress", str(home / "books")]) == 0
        return Path(args[-1])
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = Path(builders[name]())
        return built[name]

    return get


@pytest.fixture(autouse=True)
def environment(monkeypatch, home) -> None:
    """What every command runs under: HOME holding books/, no hub, wandb quiet and offline."""
    for key, value in {"HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "WANDB_SILENT": "true", "PYTHONHASHSEED": "0"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module", autouse=True)
def print_what_ran():
    yield
    print("\nREADME commands and what ran for them:")
    for command, ran in RAN.items():
        print(f"  {command}\n" + "".join(f"      {r}\n" for r in ran), end="")


# -- the tests ----------------------------------------------------------------------------------


def test_the_readme_has_commands_and_every_one_has_a_variant() -> None:
    assert len(COMMANDS) > 10, f"found only {len(COMMANDS)} commands in README.md's ```bash blocks"
    assert all(callable(globals().get(name)) for name in VARIANTS.values()), "a VARIANTS runner is not defined"
    unknown = [shlex.join(c) for c in COMMANDS if _variant(c) is None]
    assert not unknown, f"add these README commands to VARIANTS in tests/test_readme.py: {unknown}"


@pytest.mark.parametrize("command", COMMANDS, ids=[shlex.join(c)[:120] for c in COMMANDS])
def test_readme_command_runs(command: list[str], tmp_path: Path, things) -> None:
    ctx = Ctx(tmp_path, things)
    RAN[shlex.join(command)] = ctx.ran
    try:
        run_command(ctx, command)
        for path in ctx.outputs:
            assert path.exists(), f"{path} (a placeholder's output) was not created"
    finally:
        print(f"\nREADME: {shlex.join(command)}\n" + "".join(f"  ran: {r}\n" for r in ctx.ran), end="")


def test_readme_python_block_imports_and_exports_a_tiny_folder(tmp_path: Path, things) -> None:
    """The ```python block, its quoted placeholders filled: the export loads in transformers with
    the logits of the model the block imported."""
    transformers = pytest.importorskip("transformers")
    blocks = fenced(README.read_text(), "python")
    assert len(blocks) == 1, f"README.md has {len(blocks)} python blocks; this test runs one: extend it"
    ctx, source = Ctx(tmp_path, things), blocks[0]
    for placeholder in PLACEHOLDERS:
        if f'"{placeholder}"' in source:
            source = source.replace(f'"{placeholder}"', repr(str(_stand_in(ctx, placeholder))))
    assert not LOOKS_LIKE_A_PLACEHOLDER.search(source), f"a placeholder has no stand-in in PLACEHOLDERS: {source}"
    namespace: dict = {}
    exec(compile(source, "README.md", "exec"), namespace)
    (out,) = ctx.outputs  # path/to/out, written by save_pretrained
    tokens_BS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = namespace["model"].eval()(tokens_BS).logits_BSV
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(tokens_BS).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_relative_links_name_files_of_the_repository(page: Path) -> None:
    assert page.is_file(), f"{page} is missing"
    targets = [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:|#", t)]
    broken = []
    for target in targets:
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists() or not path.is_relative_to(REPO):
            broken.append(target)
    assert not broken, f"{page.name} links to what is not in the repository: {broken}"
