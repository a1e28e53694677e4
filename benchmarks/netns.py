"""Two hosts on one machine: network namespaces joined by a veth pair, optionally shaped.

Each namespace stands for a node with its own address; every byte between processes started
in them crosses the veth link, as between two hosts. `tc ... tbf` on both ends of the pair
(netem is not available on these machines; tbf is) turns the link into a slow inter-node one.
Needs root and iproute2; where the machine refuses, `SkipLink` says why. Used by
benchmarks/overlap.py (the shaped link) and tests/test_two_nodes.py (two launcher agents).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Node:
    """Where one rank (or launcher agent) runs; the defaults are this host on loopback."""

    prefix: list[str] = field(default_factory=list)  # command prefix (ip netns exec ...)
    addr: str = "127.0.0.1"
    iface: str | None = None  # the node's end of the veth pair (for GLOO_SOCKET_IFNAME)


class SkipLink(Exception):
    """The link cannot be set up here; the message says why."""


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@contextmanager
def veth_nodes(label: str, tbf: dict[str, str] | None = None) -> Iterator[list[Node]]:
    """Two network namespaces joined by a veth pair; torn down on exit.

    label: a short tag in the namespace and interface names (<= 4 characters, so that interface
    names stay within Linux's 15); tbf: `tc qdisc ... tbf` options (rate, burst, latency) put on
    both ends of the pair, None for an unshaped link.
    """
    if os.geteuid() != 0:
        raise SkipLink("network namespaces need root")
    if shutil.which("ip") is None or (tbf is not None and shutil.which("tc") is None):
        raise SkipLink("iproute2 (ip, tc) is not installed")
    tag = f"{label}{os.getpid() % 10000}"
    names, ifaces = [f"epmoe{tag}n0", f"epmoe{tag}n1"], [f"{tag}a", f"{tag}b"]
    subnet = os.getpid() % 250 + 1
    addrs = [f"10.77.{subnet}.1", f"10.77.{subnet}.2"]
    made: list[str] = []
    try:
        for name in names:
            proc = _ip("netns", "add", name)
            if proc.returncode != 0:
                raise SkipLink(f"cannot create a network namespace: {proc.stderr.strip()}")
            made.append(name)
        steps = [("link", "add", ifaces[0], "type", "veth", "peer", "name", ifaces[1])]
        for name, iface, addr in zip(names, ifaces, addrs):
            steps += [("link", "set", iface, "netns", name), ("-n", name, "addr", "add", f"{addr}/24", "dev", iface),
                      ("-n", name, "link", "set", iface, "up"), ("-n", name, "link", "set", "lo", "up")]  # fmt: skip
        for step in steps:
            proc = _ip(*step)
            if proc.returncode != 0:
                raise SkipLink(f"cannot set up the veth link (ip {' '.join(step)}): {proc.stderr.strip()}")
        if tbf is not None:
            options = [word for key, value in tbf.items() for word in (key, value)]
            for name, iface in zip(names, ifaces):
                step = ("netns", "exec", name, "tc", "qdisc", "add", "dev", iface, "root", "tbf", *options)
                proc = _ip(*step)
                if proc.returncode != 0:
                    raise SkipLink(f"cannot shape the link (ip {' '.join(step)}): {proc.stderr.strip()}")
        yield [Node(["ip", "netns", "exec", name], addr, iface) for name, addr, iface in zip(names, addrs, ifaces)]
    finally:
        for name in made:  # deleting a namespace deletes its end of the veth pair, and so the pair
            _ip("netns", "delete", name)
