"""Two nodes, one rank each, meeting at a c10d rendezvous endpoint (launcher.nnodes=2).

Where the machine allows it (root and iproute2), the nodes are two network namespaces
joined by a veth pair, each with its own address: every byte between the ranks crosses
that link, as between two hosts. Otherwise the two launcher agents share loopback. Each
node runs its own `python -m epmoe.launch`, as a user would on each machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import REPO, TINY, free_port

# benchmarks/netns.py sets up the namespaces (the overlap benchmark's shaped link uses it too)
_spec = importlib.util.spec_from_file_location("netns", REPO / "benchmarks" / "netns.py")
netns = importlib.util.module_from_spec(_spec)
sys.modules["netns"] = netns  # dataclasses look their module up by name
_spec.loader.exec_module(netns)
Node = netns.Node


@pytest.fixture
def veth_nodes() -> Iterator[list[Node]]:
    """Two network namespaces joined by an unshaped veth pair, one node each."""
    try:
        with netns.veth_nodes("t") as nodes:
            yield nodes
    except netns.SkipLink as why:
        pytest.skip(f"{why}; the loopback test covers two agents")


def _train_on_two_nodes(nodes: list[Node], run_dir: Path, corpus: Path) -> list[dict]:
    """Start one launcher per node (node 0 hosts the rendezvous); returns rank 0's metrics.
    A node without an interface is this host as torchrun sees it (loopback)."""
    endpoint = f"{nodes[0].addr}:{free_port()}"
    procs = []
    for node_rank, node in enumerate(nodes):
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        if node.iface:
            env["GLOO_SOCKET_IFNAME"] = node.iface  # the ranks' own traffic takes the node's link too
        cmd = [*node.prefix, sys.executable, "-m", "epmoe.launch", "launcher=torchrun", "launcher.nnodes=2",
               f"launcher.node_rank={node_rank}", "launcher.nproc_per_node=1", f"launcher.rdzv_endpoint={endpoint}",
               "parallel.ep=2", *TINY, "data=text", f"data.path={corpus}", f"hydra.run.dir={run_dir}"]  # fmt: skip
        if node.iface:  # a node of its own (not loopback): its address is the one peers reach
            cmd.append(f"launcher.local_addr={node.addr}")
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
    stats = f"/sys/class/net/{node.iface}/statistics/rx_bytes"
    proc = subprocess.run([*node.prefix, "cat", stats], capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_two_nodes_on_a_veth_link_train_with_ep2(veth_nodes, tmp_path: Path, text_corpus: Path) -> None:
    _check(_train_on_two_nodes(veth_nodes, tmp_path / "run", text_corpus))
    # the tokens crossed the link: per step and MoE layer, ~half of node 0's 256 rows of 64
    # fp32 (32 KiB) go to node 1 forward and as gradients backward: > 1 MiB over 10 steps
    assert min(_received_bytes(n) for n in veth_nodes) > 1 << 20


def test_two_launcher_agents_on_loopback_train_with_ep2(tmp_path: Path, text_corpus: Path) -> None:
    nodes = [Node(), Node()]  # this host, loopback
    _check(_train_on_two_nodes(nodes, tmp_path / "run", text_corpus))
