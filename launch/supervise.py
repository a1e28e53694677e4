"""The launcher's child process: started, handed the signals the launcher gets, waited for, and
never left behind.

`run(cmd, shutdown_timeout_s)` starts `cmd` (torchrun, mpiexec, the DeepSpeed runner or one
rank) and returns the exit status the launcher should exit with:

- SIGINT, SIGTERM, SIGUSR1 and SIGHUP sent to the launcher go to the child, once each: the child
  runs in its own process group, so a terminal's Ctrl-C reaches the launcher alone and the
  ranks do not see the same SIGINT twice (once from the terminal, once forwarded).
- after a forwarded signal the child has `shutdown_timeout_s` (the ranks' time to save, which
  torchrun also waits) plus KILL_MARGIN_S; then every process of its tree is SIGKILLed.
- the child gets PR_SET_PDEATHSIG (Linux): a launcher that is SIGKILLed (no handler runs)
  hands its child SIGTERM from the kernel, which torchrun and the ranks take as a request to
  save and stop.
- the launcher is the job's child subreaper (Linux): a process the child leaves behind (a rank
  whose torchrun died) is re-parented to the launcher, not to init, and is found, given
  `shutdown_timeout_s` to finish and then killed, before the launcher exits.
- the child's status passes through (75: stopped after a complete checkpoint); a child ended
  by signal N gives 128 + N, as a shell reports it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
KILL_MARGIN_S = 30.0  # beyond launcher.shutdown_timeout_s: torchrun's own SIGKILL of the ranks and its exit
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36  # from <linux/prctl.h>
_POLL_S = 0.2


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A preexec_fn that makes the child get `sig` when its parent dies (Linux); None elsewhere.

    NOTE: the parent may already be gone when the child runs this (it died between fork and
    prctl): then nothing would ever send `sig`, so the child ends itself at once."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()
    # NOTE: libc loaded here, before the fork: dlopen in the forked child could deadlock on a
    # lock another thread of the launcher held (comm/process.py's die_with_parent is the ranks' own)
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(128 + int(sig))

    return preexec


def _become_subreaper() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _end_leftovers(timeout_s: float) -> None:
    """Reap, or after `timeout_s` SIGKILL and reap, the processes the child left to this one."""
    end = time.monotonic() + timeout_s
    while left := descendants(os.getpid()):
        for pid in left:
            if time.monotonic() > end:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not ours to reap (a grandchild whose parent lives)
                pass
        time.sleep(_POLL_S)


def descendants(pid: int) -> list[int]:
    """The PIDs of every live descendant of `pid` (children first), from /proc's ppid links;
    [] where there is no /proc. Ranks that torchrun starts in sessions of their own are found
    too, which a process-group kill would miss."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command name in (...) may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop(0)
        found.append(child)
        todo += children.get(child, [])
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`, its process group and every descendant (gathered before the kill)."""
    pids = [proc.pid, *descendants(proc.pid)]
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:  # the group is gone already
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def exit_status(returncode: int) -> int:
    """A child's Popen returncode as an exit status: itself, or 128 + N for death by signal N."""
    return returncode if returncode >= 0 else 128 - returncode


def run(cmd: list[str], shutdown_timeout_s: float, env: dict[str, str] | None = None) -> int:
    """Run `cmd` as the launcher's child, forwarding FORWARDED signals; return its exit status."""
    _become_subreaper()
    proc = subprocess.Popen(cmd, env=env, process_group=0, preexec_fn=die_with_parent())
    deadline: list[float] = []  # set by the first forwarded signal

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(proc.pid, signum)
        except OSError:  # exited meanwhile: its status is on its way
            return
        if not deadline:
            deadline.append(time.monotonic() + shutdown_timeout_s + KILL_MARGIN_S)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        while True:
            try:
                return exit_status(proc.wait(timeout=_POLL_S))
            except subprocess.TimeoutExpired:
                pass
            if deadline and time.monotonic() > deadline[0]:
                print(
                    f"epmoe.launch: the job did not stop within launcher.shutdown_timeout_s={shutdown_timeout_s:g} s "
                    f"(+{KILL_MARGIN_S:g} s) of the signal; killed it",
                    file=sys.stderr,
                )
                kill_tree(proc)
                return exit_status(proc.wait())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # an exception in this loop: nothing is left running
            kill_tree(proc)
            proc.wait()
        _end_leftovers(shutdown_timeout_s)
