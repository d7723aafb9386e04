"""The import graph between the hand-written packages: layers, bottom up, and no cycle.

common (config, logging, server bootstrap, the shared state layer) is imported by every service and imports
none of them; the services (gateway, scheduler, worker, registry) import common and the generated protos, never
each other; clients (CLI, launcher, typed client) may use anything. Checked on the source, statically.
"""

from __future__ import annotations

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("common", "gateway", "scheduler", "worker", "registry", "clients")
GENERATED = ("inference", "dispatch", "admin")
SERVICES = ("gateway", "scheduler", "worker", "registry")
ALLOWED = {
    "common": set(),
    **{service: {"common"} for service in SERVICES},
    "clients": {"common", *SERVICES},
}


IMPORT = re.compile(r"^\s*(?:from|import)\s+llmserve\.(\w+)", re.MULTILINE)


def _imports(path: pathlib.Path) -> set[str]:
    """The llmserve.<package> names a module imports (absolute imports, top level or inside functions).

    A regex, not ast: ast.parse in a long pytest run trips a CPython 3.11 bug ("AST constructor recursion
    depth mismatch"), and the project writes one import per line."""
    return set(IMPORT.findall(path.read_text()))


def package_graph() -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> the files that import it."""
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in PACKAGES}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if "pb" in path.relative_to(REPO / package).parts:
                continue  # generated stubs
            for target in _imports(path) - {package} - set(GENERATED):
                graph[package].setdefault(target, []).append(str(path.relative_to(REPO)))
    return graph


def test_each_package_imports_only_the_layers_below_it():
    graph = package_graph()
    wrong = {f"{src} -> {dst}": files for src, targets in graph.items() for dst, files in targets.items()
             if dst not in ALLOWED[src]}
    assert not wrong, f"imports across layers: {wrong}"


def test_no_cycle_between_packages():
    graph = {src: set(targets) for src, targets in package_graph().items()}
    visiting, done = set(), set()

    def visit(node: str, path: list[str]) -> None:
        assert node not in visiting, f"import cycle: {' -> '.join(path + [node])}"
        if node in done:
            return
        visiting.add(node)
        for nxt in graph.get(node, ()):
            visit(nxt, path + [node])
        visiting.discard(node)
        done.add(node)

    for package in PACKAGES:
        visit(package, [])


def test_the_checker_sees_real_imports():
    # Guards the test above against passing vacuously: the worker really imports common and its own protos.
    assert "common" in package_graph()["worker"]
    assert "dispatch" in _imports(REPO / "worker" / "service.py")
