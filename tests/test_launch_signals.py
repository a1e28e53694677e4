"""Signals to a real `python -m epmoe.launch launcher=torchrun` job (2 gloo ranks, tiny model): to
the launcher, to torchrun, to one rank, Ctrl-C to the launcher alone, SIGKILL to the launcher.

Each job must stop with the ranks' status (75 after SIGTERM, 130 after Ctrl-C; both after a
complete checkpoint, which verifies), and leave no process of its tree alive: the PIDs are
collected from /proc while it trains (ppid links from the launcher's PID, so the ranks, which
torchrun starts in sessions of their own, are found too) and each must be gone afterwards.
A one-node job's sockets must listen on loopback only; two nodes' on their launcher.local_addr.

Timing: a job runs train.steps=200, far more than it gets through before the signal (sent once
rank 0 has logged a step); every wait is bounded by a generous timeout (240 s) because these
2-core CI machines are shared and a rendezvous plus the first step can take tens of seconds.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from epmoe.config import LauncherConfig
from epmoe.launch.commands import torchrun_command
from epmoe.train.checkpoint_files import resolve, verify

from .conftest import REPO, TINY, free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG")

STEPS = 200
WAIT_S = 240.0  # generous: shared 2-core machines (see the module docstring)
STOPPED = re.compile(r"^stopped by (SIG\w+) after step (\d+): checkpoint (\S+); ", re.MULTILINE)


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _tree(root: int) -> list[int]:
    """root and its descendants, from /proc's ppid links."""
    children, found, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Running (a zombie has finished: only its exit status waits to be collected)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _listening(pids: list[int]) -> list[tuple[str, int]]:
    """(address as /proc/net writes it, pid) of every TCP socket in LISTEN that `pids` hold."""
    owner = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    owner[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in owner:  # st 0A: LISTEN
                found.append((fields[1].rsplit(":", 1)[0], owner[fields[9]]))
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1 (as /proc/net writes them)


class Job:
    """A launcher run in its own session (a signal to it reaches nothing else of pytest's)."""

    def __init__(self, tmp_path: Path, corpus: Path) -> None:
        self.run_dir = tmp_path / "run"
        self.log = tmp_path / "launch.log"
        args = ["launcher=torchrun", "launcher.nproc_per_node=2", *TINY, f"train.steps={STEPS}",
                "train.eval_every=0", "train.sample_bytes=0", "data=text", f"data.path={corpus}",
                f"hydra.run.dir={self.run_dir}"]  # fmt: skip
        env = {**os.environ, "PYTHONHASHSEED": "0", "WANDB_SILENT": "true"}
        with self.log.open("w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "epmoe.launch", *args], cwd=REPO, env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.pids: list[int] = []

    def wait_for_training(self) -> None:
        """Until rank 0 has logged a step; then the job's PIDs (launcher, torchrun, 2 ranks)."""
        metrics, end = self.run_dir / "metrics.jsonl", time.monotonic() + WAIT_S
        while not (metrics.is_file() and metrics.stat().st_size):
            assert self.proc.poll() is None, f"the job ended before training: {self.log.read_text()[-3000:]}"
            assert time.monotonic() < end, f"no step logged in {WAIT_S} s: {self.log.read_text()[-3000:]}"
            time.sleep(0.1)
        self.pids = _tree(self.proc.pid)
        assert len(self.pids) == 4, [_cmdline(p) for p in self.pids]

    def pid_of(self, needle: str) -> int:
        (pid,) = [p for p in self.pids if needle in _cmdline(p)][:1]
        return pid

    def finish(self) -> tuple[int, str]:
        """The launcher's exit status and output, once every process of the tree is gone."""
        rc = self.proc.wait(timeout=WAIT_S)
        end = time.monotonic() + 30  # the ranks, re-parented to init, may take a moment to be reaped
        while (alive := [p for p in self.pids if _alive(p)]) and time.monotonic() < end:
            time.sleep(0.1)
        assert alive == [], [(p, _cmdline(p)) for p in alive]
        return rc, self.log.read_text()

    def kill(self) -> None:
        for pid in self.pids or [self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _assert_saved(job: Job, out: str, signal_name: str) -> int:
    """The one "stopped by" line names the newest complete checkpoint, which verifies; its step."""
    lines = STOPPED.findall(out)
    assert len(lines) == 1, out[-3000:]  # one line for the job, not one per rank
    name, step, path = lines[0]
    assert name == signal_name
    assert 0 < int(step) < STEPS
    newest = resolve(job.run_dir)
    assert Path(path) == newest and newest.name == f"step_{int(step):08d}"
    assert verify(newest)["step"] == int(step)
    return int(step)


@pytest.fixture
def job(tmp_path: Path, text_corpus: Path):
    job = Job(tmp_path, text_corpus)
    yield job
    job.kill()  # a failed assertion must not leave the job running


def test_sigterm_to_the_launcher_saves_exits_75_and_the_job_listened_on_loopback_only(job: Job) -> None:
    job.wait_for_training()
    sockets = _listening(job.pids)
    torchrun = job.pid_of("epmoe.launch.torchrun")
    assert sum(pid == torchrun for _, pid in sockets) >= 2, sockets  # the rendezvous store and the ranks' store
    assert {addr for addr, _ in sockets} <= LOOPBACK, sockets
    os.kill(job.proc.pid, signal.SIGTERM)
    rc, out = job.finish()
    assert rc == 75, out[-3000:]
    _assert_saved(job, out, "SIGTERM")
    assert "Traceback" not in out, out[-3000:]


@pytest.mark.parametrize("target", ["epmoe.launch.torchrun", "-m epmoe.train"])
def test_sigterm_to_torchrun_or_to_one_rank_saves_and_exits_75(job: Job, target: str) -> None:
    job.wait_for_training()
    os.kill(job.pid_of(target), signal.SIGTERM)  # one rank: the first one found
    rc, out = job.finish()
    assert rc == 75, out[-3000:]
    _assert_saved(job, out, "SIGTERM")


def test_ctrl_c_to_the_launcher_alone_saves_and_exits_130(job: Job) -> None:
    job.wait_for_training()
    os.kill(job.proc.pid, signal.SIGINT)  # as a terminal would, were the job in its own process group
    rc, out = job.finish()
    assert rc == 130, out[-3000:]
    newest = resolve(job.run_dir)
    assert 0 < verify(newest)["step"] < STEPS


def test_a_sigkilled_launcher_leaves_no_process_and_the_ranks_still_save(job: Job) -> None:
    job.wait_for_training()
    os.kill(job.proc.pid, signal.SIGKILL)  # no handler runs: torchrun gets SIGTERM from the kernel (PDEATHSIG)
    rc, out = job.finish()
    assert rc == -signal.SIGKILL
    newest = resolve(job.run_dir)
    assert 0 < verify(newest)["step"] < STEPS


RANK_SCRIPT = """
import os, sys, time
import torch, torch.distributed as dist
dist.init_process_group("gloo")
x = torch.ones(1)
dist.all_reduce(x)
open(sys.argv[1] + f"/ready{dist.get_rank()}", "w").write(f"{x.item():g} {os.environ['MASTER_ADDR']}")
time.sleep(float(sys.argv[2]))
dist.barrier()
"""


def test_two_nodes_listen_on_their_local_addr_only(tmp_path: Path) -> None:
    # two torchrun agents on this machine as two nodes, node 1 on 127.0.0.2 (all of 127/8 is loopback)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    for node, addr in ((0, "127.0.0.1"), (1, "127.0.0.2")):
        lc = LauncherConfig(name="torchrun", nproc_per_node=1, nnodes=2, node_rank=node, rdzv_endpoint=endpoint,
                            local_addr=addr)  # fmt: skip
        cmd = torchrun_command(lc, [], tmp_path)
        cmd = [*cmd[: cmd.index("-m", 3)], str(script), str(tmp_path), "3"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        end = time.monotonic() + WAIT_S
        while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
            assert time.monotonic() < end and all(p.poll() is None for p in procs), [p.poll() for p in procs]
            time.sleep(0.1)
        sockets = {pid: [a for a, owner in _listening(_tree(p.pid)) if owner == pid] for p in procs for pid in [p.pid]}
        assert sorted(set(sockets[procs[0].pid])) == ["0100007F"]  # 127.0.0.1: the rendezvous store
        # the ranks' store is on whichever agent became rank 0: on its own local_addr
        assert sorted(set(sum(sockets.values(), []))) in (["0100007F"], ["0100007F", "0200007F"])
        assert {a for a, _ in _listening(_tree(procs[0].pid) + _tree(procs[1].pid))} <= {"0100007F", "0200007F"}
        assert (tmp_path / "ready0").read_text().startswith("2 127.0.0.")
        for p in procs:
            out = p.communicate(timeout=WAIT_S)[0]
            assert p.returncode == 0, out[-3000:]
    finally:
        for p in procs:
            p.kill()
