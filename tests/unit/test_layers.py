"""The import layers of kanmon hold: the import-linter contract in pyproject.toml is kept,
every module belongs to a layer, and there is no import cycle.

The contract is the one `lint-imports` checks from the repository root. These tests also
show it fails when it should: the same contract on the same graph with one upward import
added is broken, and `lint-imports` exits non-zero on a contract the code breaks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest
from importlinter.api import read_configuration
from importlinter.contracts.layers import LayersContract

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"


def _graph() -> grimp.ImportGraph:
    """The import graph of this tree's kanmon (imports inside functions count too)."""
    sys.path.insert(0, str(ROOT))
    try:
        return grimp.build_graph("kanmon", cache_dir=None)
    finally:
        sys.path.remove(str(ROOT))


def _layers_contract(*, without_ignores: bool = False) -> LayersContract:
    config = read_configuration(str(PYPROJECT))
    (options,) = [c for c in config["contracts_options"] if c.get("id") == "layers"]
    options = dict(options)
    if without_ignores:
        options.pop("ignore_imports", None)
    return LayersContract(name=options["name"], session_options=config["session_options"], contract_options=options)


def _lint_imports(cwd: Path, *config_files: str) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        "from importlinter.cli import lint_imports\n"
        "sys.exit(lint_imports(config_filenames=tuple(sys.argv[1:]), no_cache=True, no_logo=True))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *config_files], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_lint_imports_keeps_every_contract():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_lint_imports_fails_on_a_contract_the_code_breaks(tmp_path):
    # The queue imports the spool, so a contract putting the spool above the queue is broken.
    (tmp_path / "broken.toml").write_text(
        '[tool.importlinter]\nroot_package = "kanmon"\n\n'
        '[[tool.importlinter.contracts]]\nname = "spool above queue (wrong)"\ntype = "layers"\n'
        'layers = ["kanmon.spool", "kanmon.queue"]\n'
    )
    result = _lint_imports(tmp_path, "broken.toml")
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout and "kanmon.queue" in result.stdout


def test_the_contract_is_kept_on_the_real_graph():
    assert _layers_contract().check(_graph(), verbose=False).kept


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("kanmon.model", "kanmon.queue.manager"),  # plain values reaching up into the scheduler
        ("kanmon.config", "kanmon.admin.service"),  # config reaching into the admin plane
        ("kanmon.commands.user", "kanmon.commands.queue"),  # one command group importing another
        ("kanmon.commands.records", "kanmon.cli"),  # a group importing the assembler
        ("kanmon.queue.manager", "kanmon.smtp.server"),  # the scheduler reaching into the listener
        ("kanmon.deliver.dsn", "kanmon.queue.notices"),  # a delivery agent importing the scheduler
        ("kanmon.spool.store", "kanmon.records.store"),  # the spool writing records itself
        ("kanmon.smtp.session", "kanmon.spool.store"),  # the I/O-free session touching storage
        ("kanmon.policy.access", "kanmon.spool.store"),  # a check touching the spool
    ],
)
def test_an_upward_import_breaks_the_contract(importer, imported):
    graph = _graph()
    graph.add_import(importer=importer, imported=imported)
    assert not _layers_contract().check(graph, verbose=False).kept


def test_the_checks_must_not_reach_into_the_mailbox_store():
    # The recipient checks once read the mailbox directory (policy.access -> store.maildir);
    # the listener carries out such effects now, and the layers forbid the import, even
    # if an ignore_imports line were added for it.
    graph = _graph()
    graph.add_import(importer="kanmon.policy.access", imported="kanmon.store.maildir")
    assert not _layers_contract().check(graph, verbose=False).kept
    assert not _layers_contract(without_ignores=True).check(graph, verbose=False).kept


def _layer_modules() -> list[str]:
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c.get("id") == "layers"]
    return [m.strip() for line in layers for m in line.replace(":", "|").split("|")]


def test_every_module_belongs_to_a_layer():
    """A new module must be placed in the contract, or the layers would not cover it."""
    graph = _graph()
    layers = _layer_modules()
    outside = sorted(
        m for m in graph.modules
        if not any(m == layer or m.startswith(layer + ".") for layer in layers)
        # packages that are only namespaces (an __init__ importing nothing) need no layer
        and not (graph.find_children(m) and not graph.find_modules_directly_imported_by(m))
    )
    assert outside == [], f"add these modules to a layer in pyproject.toml: {outside}"


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of a graph: its strongly connected components of more than one
    module, or a module importing itself (Tarjan's algorithm, without recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(sorted(edges[root])))]
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1 or node in edges[node]:
                    cycles.append(sorted(component))
    return cycles


def test_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}, "b": set()}) == [["a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules():
    graph = _graph()
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert _cycles(edges) == []
