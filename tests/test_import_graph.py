"""The package's import structure: every module imports on its own, and no two modules import each other.

Every ``import`` counts, also those inside functions (deferred imports still tie two modules together: a
cycle through one is a design knot, however it happens to load). ``speculative/`` and ``moe/`` never import
each other, and the seed paths of the original design keep working.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tandem"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """The tandem modules ``path`` imports anywhere in its body (``from pkg import module`` resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imported_modules(path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def _is_package_parent(importer: str, imported: str) -> bool:
    # ``import a.b.c`` runs ``a/__init__`` and ``a/b/__init__``: a package's __init__ is not an import cycle.
    return importer.startswith(imported + ".")


def test_no_import_cycles():
    graph = {m: {i for i in deps if not _is_package_parent(m, i)} for m, deps in import_graph().items()}
    assert find_cycles(graph) == []


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_speculative_and_moe_never_import_each_other():
    for module, deps in import_graph().items():
        for other in deps:
            halves = {module.split(".")[1:2][0] if "." in module else "", other.split(".")[1]}
            assert halves != {"speculative", "moe"}, f"{module} imports {other}"


# Imports each tandem module in a forked child of an interpreter that has loaded only third-party packages:
# a tandem module that works only after another tandem module was imported fails, at a fork's cost each.
_IMPORT_EACH = """
import importlib, os, sys
import torch, transformers, safetensors, numpy  # third-party, loaded once before the forks
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException as exc:
            print(f"{name}: {type(exc).__name__}: {exc}", flush=True)
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own():
    modules = sorted(all_modules())
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *modules], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_a_module_that_needs_another_first_is_caught(tmp_path):
    """The check above can fail: a module that uses a name another module's import leaves behind."""
    (tmp_path / "pkg_a.py").write_text("import sys\nVALUE = sys.modules['pkg_b'].VALUE\n")
    (tmp_path / "pkg_b.py").write_text("VALUE = 1\n")
    alone = subprocess.run([sys.executable, "-c", _IMPORT_EACH, "pkg_a"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert alone.returncode == 1 and "pkg_a: KeyError" in alone.stdout


SEED_PATHS = [
    ("tandem.speculative.eagle.remote.server",
     ["TargetModelServer", "serve", "compute_supervision", "_make_request_handler"]),
    ("tandem.speculative.eagle.remote.transport", ["NCCLTransport"]),
    ("tandem.moe.uccl_ep.buffer", ["UCCLBuffer"]),
    ("tandem.moe.uccl_ep", ["UCCLBuffer"]),
    ("tandem.moe.ep", ["Buffer", "Config", "EventOverlap", "ElasticBuffer"]),
]


@pytest.mark.parametrize("module,names", SEED_PATHS)
def test_seed_import_paths_work(module, names):
    loaded = importlib.import_module(module)
    for name in names:
        assert getattr(loaded, name, None) is not None, f"{module}.{name}"


def test_seed_paths_are_the_same_objects_as_the_code():
    from tandem.speculative.eagle.remote import server as seed_server
    from tandem.speculative.eagle.remote import transport as seed_transport
    from tandem.speculative.remote import server, transport

    assert seed_server.TargetModelServer is server.TargetModelServer and seed_server.serve is server.serve
    assert seed_transport.NCCLTransport is transport.NCCLTransport
