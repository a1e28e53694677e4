"""Two nodes, one rank each, meeting at a c10d rendezvous endpoint (launcher.nnodes=2).

Where the machine allows it (root and iproute2), the nodes are two network namespaces
joined by a veth pair, each with its own address: every byte between the ranks crosses
that link, as between two hosts. Otherwise the two launcher agents share loopback. Each
node runs its own `python -m epmoe.launch`, as a user would on each machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from epmoe.launch.commands import free_port

from .conftest import REPO, TINY

SUBNET = "10.77.{}.{}"
Node = tuple[list[str], str | None, str | None]  # (command prefix, address, network interface)


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def veth_nodes() -> Iterator[list[Node]]:
    """Two network namespaces joined by a veth pair: per node (command prefix, address, interface)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (ip); the loopback test covers two agents")
    tag = f"{os.getpid() % 10000}"
    names, ifaces = [f"epmoe{tag}n0", f"epmoe{tag}n1"], [f"ep{tag}a", f"ep{tag}b"]
    subnet = os.getpid() % 250 + 1
    addrs = [SUBNET.format(subnet, 1), SUBNET.format(subnet, 2)]
    made = []
    try:
        for name in names:
            proc = _ip("netns", "add", name)
            if proc.returncode != 0:
                pytest.skip(f"cannot create a network namespace here: {proc.stderr.strip()}")
            made.append(name)
        steps = [("link", "add", ifaces[0], "type", "veth", "peer", "name", ifaces[1])]
        for name, iface, addr in zip(names, ifaces, addrs):
            steps += [("link", "set", iface, "netns", name), ("-n", name, "addr", "add", f"{addr}/24", "dev", iface),
                      ("-n", name, "link", "set", iface, "up"), ("-n", name, "link", "set", "lo", "up")]  # fmt: skip
        for step in steps:
            proc = _ip(*step)
            if proc.returncode != 0:
                pytest.skip(f"cannot set up the veth link (ip {' '.join(step)}): {proc.stderr.strip()}")
        yield [(["ip", "netns", "exec", name], addr, iface) for name, addr, iface in zip(names, addrs, ifaces)]
    finally:
        for name in made:  # deleting a namespace deletes its end of the veth pair, and so the pair
            _ip("netns", "delete", name)


def _train_on_two_nodes(nodes: list[Node], run_dir: Path, corpus: Path) -> list[dict]:
    """Start one launcher per node (node 0 hosts the rendezvous); returns rank 0's metrics.
    Without an address, a node is this host as torchrun sees it (loopback)."""
    endpoint = f"{nodes[0][1] or '127.0.0.1'}:{free_port()}"
    procs = []
    for node_rank, (prefix, addr, iface) in enumerate(nodes):
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        if iface:
            env["GLOO_SOCKET_IFNAME"] = iface  # the ranks' own traffic takes the node's link too
        cmd = [*prefix, sys.executable, "-m", "epmoe.launch", "launcher=torchrun", "launcher.nnodes=2",
               f"launcher.node_rank={node_rank}", "launcher.nproc_per_node=1", f"launcher.rdzv_endpoint={endpoint}",
               "parallel.ep=2", *TINY, "data=text", f"data.path={corpus}", f"hydra.run.dir={run_dir}"]  # fmt: skip
        if addr:
            cmd.append(f"launcher.local_addr={addr}")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))  # fmt: skip
    outputs = [p.communicate(timeout=240) for p in procs]
    for node_rank, (p, (_, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {node_rank}:\n{err[-3000:]}"
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check(records: list[dict]) -> None:
    assert [r["step"] for r in records] == list(range(1, 11))
    assert sum(records[0]["expert_load"][0]) == 2 * 4 * 32 * 2  # both nodes' tokens were routed (top-2)
    assert records[-1]["loss"] < records[0]["loss"]


def _received_bytes(node: Node) -> int:
    prefix, _, iface = node
    proc = subprocess.run([*prefix, "cat", f"/sys/class/net/{iface}/statistics/rx_bytes"], capture_output=True,
                          text=True, check=True)  # fmt: skip
    return int(proc.stdout)


def test_two_nodes_on_a_veth_link_train_with_ep2(veth_nodes, tmp_path: Path, text_corpus: Path) -> None:
    _check(_train_on_two_nodes(veth_nodes, tmp_path / "run", text_corpus))
    # the tokens crossed the link: per step and MoE layer, ~half of node 0's 256 rows of 64
    # fp32 (32 KiB) go to node 1 forward and as gradients backward: > 1 MiB over 10 steps
    assert min(_received_bytes(n) for n in veth_nodes) > 1 << 20


def test_two_launcher_agents_on_loopback_train_with_ep2(tmp_path: Path, text_corpus: Path) -> None:
    nodes: list[Node] = [([], None, None), ([], None, None)]
    _check(_train_on_two_nodes(nodes, tmp_path / "run", text_corpus))
