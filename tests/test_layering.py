"""The layering of docs/architecture.md (the design map), enforced on every module's imports (read from the AST).

Layers, top first; a module imports only its own layer and the ones above it:
    epmoe.config, epmoe.validate, epmoe.choices,
    epmoe.host_memory, epmoe.exit_codes, epmoe.durable (leaf modules)
    epmoe.model                         single-device math
    epmoe.placement                     pure policies
    epmoe.comm                          the communication leaf (comm/)
    epmoe.parallel                      composition: parallelize
    epmoe.hf, epmoe.data                interop, corpora (as they land)
    epmoe.train                         the trainer
    epmoe.generate, epmoe.eval,         command lines over checkpoints (and HF folders)
    epmoe.plot                          and over run directories
    epmoe.launch                        the launcher CLI (launch/)
and on top of that order: comm imports nothing from placement; placement nothing from model;
only comm/ imports torch.distributed or mpi4py (parallel/ may use FSDP2, DTensor and
distributed checkpoint, launch/ torchrun's own agent API: torch.distributed.run and .elastic);
no two modules import each other, directly or through others (imports
under `if TYPE_CHECKING:` and inside functions count too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# installed package -> source folder (setup.py's package_dir)
SOURCES = {"epmoe": REPO / "epmoe", "epmoe.comm": REPO / "comm", "epmoe.launch": REPO / "launch"}
LAYERS = [
    ("epmoe.config", "epmoe.choices", "epmoe.host_memory", "epmoe.exit_codes", "epmoe.validate", "epmoe.durable"),
    ("epmoe.model",),
    ("epmoe.placement",),
    ("epmoe.comm",),
    ("epmoe.parallel",),
    ("epmoe.hf", "epmoe.data"),
    ("epmoe.train",),
    ("epmoe.generate", "epmoe.eval", "epmoe.plot", "epmoe.upcycle"),  # command lines over checkpoints and runs
    ("epmoe.launch",),
]
FORBIDDEN = {  # beyond the layer order: (importer, imported) packages
    ("epmoe.comm", "epmoe.placement"),
    ("epmoe.placement", "epmoe.model"),
}
# command-line edges that sit outside the layer order, and why
EDGES = {"epmoe.hf.__main__": "`python -m epmoe.hf` converts to and from epmoe checkpoints (epmoe.train)"}
DISTRIBUTED = ("torch.distributed", "mpi4py")
# device_mesh: FSDP2's fully_shard takes a DeviceMesh (parallel/fsdp.py builds the world and expert-DP meshes)
PARALLEL_MAY_USE = ("torch.distributed.fsdp", "torch.distributed.tensor", "torch.distributed.checkpoint",
                    "torch.distributed.device_mesh")  # fmt: skip
LAUNCH_MAY_USE = ("torch.distributed.run", "torch.distributed.elastic")  # torchrun's agent, which the launcher runs


def module_files() -> dict[str, Path]:
    """{dotted module name: file} of every module the package installs."""
    out = {}
    for package, root in SOURCES.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "epmoe" and parts and parts[0] in ("comm", "launch"):
                continue  # not part of epmoe/ (the folders are comm/ and launch/)
            out[name] = path
    return out


def imports_of(name: str, path: Path) -> list[str]:
    """Every module one file imports, anywhere in it; relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from epmoe.model import moe` imports the module epmoe.model.moe
                sub = f"{base}.{alias.name}"
                out.append(sub if sub in MODULES else base)
    return out


MODULES = module_files()


def layer_of(module: str) -> tuple[int, str] | None:
    """(layer index, the layer's package) of an epmoe module, None for another library."""
    for i, packages in enumerate(LAYERS):
        for package in packages:
            if module == package or module.startswith(package + "."):
                return i, package
    return None


def violations(graph: dict[str, list[str]]) -> list[str]:
    found = []
    for importer, imported_list in graph.items():
        mine = layer_of(importer)
        for imported in imported_list:
            if imported.startswith(DISTRIBUTED) and mine is not None and mine[1] != "epmoe.comm":
                if not (mine[1] == "epmoe.parallel" and imported.startswith(PARALLEL_MAY_USE)) and not (
                    mine[1] == "epmoe.launch" and imported.startswith(LAUNCH_MAY_USE)
                ):
                    found.append(f"{importer} imports {imported}: only epmoe.comm talks to the process group")
            theirs = layer_of(imported)
            if mine is None or theirs is None or theirs[1] == mine[1] or importer in EDGES:
                continue
            if theirs[0] > mine[0]:
                found.append(f"{importer} imports {imported}: {theirs[1]} is below {mine[1]}")
            elif (mine[1], theirs[1]) in FORBIDDEN:
                found.append(f"{importer} imports {imported}: {mine[1]} may not import {theirs[1]}")
    return found


def cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Every import cycle between modules, each as a path."""
    edges = {m: sorted({i for i in imps if i in graph and i != m}) for m, imps in graph.items()}
    found, state = [], {}  # state: 1 on the stack, 2 done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in edges[m]:
            if state.get(n) == 1:
                found.append([*stack[stack.index(n) :], n])
            elif n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, list[str]]:
    return {name: imports_of(name, path) for name, path in modules.items()}


def test_every_module_keeps_to_its_layer() -> None:
    graph = import_graph(MODULES)
    assert len(graph) > 40 and "epmoe.comm.dispatch" in graph and "epmoe.parallel.parallelize" in graph
    assert violations(graph) == []


def test_every_module_has_a_layer() -> None:
    """A module outside every layer would escape the checks above (they skip what has no layer)."""
    assert [m for m in MODULES if layer_of(m) is None and m != "epmoe"] == []


def test_no_module_imports_itself_through_others() -> None:
    assert cycles(import_graph(MODULES)) == []


@pytest.mark.parametrize(
    ("module", "added", "message"),
    [
        ("epmoe.comm.dispatch", "epmoe.placement.placement", "epmoe.comm may not import epmoe.placement"),
        ("epmoe.model.moe", "epmoe.parallel.expert_parallel", "epmoe.parallel is below epmoe.model"),
        ("epmoe.model.router", "torch.distributed", "only epmoe.comm talks to the process group"),
        ("epmoe.placement.policies", "epmoe.train.trainer", "epmoe.train is below epmoe.placement"),
    ],
)
def test_a_forbidden_import_is_caught(module: str, added: str, message: str) -> None:
    graph = import_graph(MODULES)
    graph[module] = [*graph[module], added]
    assert [v for v in violations(graph) if v.startswith(module)] == [f"{module} imports {added}: {message}"]


def test_a_cycle_is_caught() -> None:
    graph = import_graph(MODULES)
    graph["epmoe.model.permute"] = [*graph["epmoe.model.permute"], "epmoe.model.moe"]
    assert any(c[0] == c[-1] and "epmoe.model.permute" in c for c in cycles(graph))
