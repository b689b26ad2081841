"""Dependencies point one way: tuner -> consumers -> hpad, with no import cycle between modules.

Every module of ``hpad/``, ``consumers/`` and ``tuner/`` is parsed with `ast` (nothing is imported):

* the library (``hpad``) imports neither service package, nor Kafka, settings or Prometheus code;
* the scoring service (``consumers``) never imports the tuner;
* the tuner imports only the service kernel of ``consumers`` (`TUNER_MAY_IMPORT`), never the scoring worker;
* the first-party module-level imports form an acyclic graph (a cycle is reported in full).

Module-level means outside any function (class bodies and ``if TYPE_CHECKING:`` blocks count); the direction
rules also see the imports inside functions.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hpad", "consumers", "tuner")

# third-party packages the library must not import (services only)
HPAD_FORBIDDEN_THIRD_PARTY = ("kafka", "pydantic_settings", "prometheus_client")

# the kernel of consumers: what every service process shares (see consumers/__init__.py)
CONSUMERS_KERNEL = frozenset({
    "consumers.settings", "consumers.kafka_io", "consumers.contract", "consumers.decode", "consumers.events",
    "consumers.metrics", "consumers.models", "consumers.prompt_records", "consumers.service",
})
# the tuner may import the kernel, and the README-table machinery for its own tables (tuner.docs)
TUNER_MAY_IMPORT = CONSUMERS_KERNEL | {"consumers.docs"}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (a first-party submodule when the name is one), or a third-party name
    line: int
    module_level: bool


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def first_party_modules(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    return {module_name(p, root): p for package in packages for p in sorted((root / package).rglob("*.py"))}


def _resolve(base: str, names: Iterable[str], known: set[str]) -> list[str]:
    """``from base import a, b``: ``base.a`` where that is a module, else ``base``."""
    targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
    return targets if len(targets) == len(list(names)) else [*targets, base]


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> list[Import]:
    """Every import statement of ``source`` (module ``module``), with whether it runs at import time."""
    tree = ast.parse(source)
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(module, alias.name, child.lineno, module_level) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolved against this module's package
                    package = module.split(".") if is_package else module.split(".")[:-1]
                    package = package[: len(package) - (child.level - 1)]
                    base = ".".join(package + ([child.module] if child.module else []))
                else:
                    base = child.module or ""
                names = [alias.name for alias in child.names]
                found.extend(Import(module, t, child.lineno, module_level) for t in _resolve(base, names, known))
            inside = module_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inside)

    visit(tree, True)
    return found


def all_imports(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> list[Import]:
    modules = first_party_modules(root, packages)
    known = set(modules)
    return [imp for name, path in modules.items()
            for imp in imports_of(path.read_text(), name, path.name == "__init__.py", known)]


def top(name: str) -> str:
    return name.split(".")[0]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None when it is acyclic (iterative DFS, three colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def _report(bad: list[Import]) -> str:
    return "\n".join(f"  {imp.source} (line {imp.line}) imports {imp.target}" for imp in bad)


IMPORTS = all_imports()


def test_the_graph_sees_every_package():
    sources = {top(imp.source) for imp in IMPORTS}
    assert sources == set(PACKAGES)
    assert any(imp.source == "tuner.registry" and imp.target == "consumers.prompt_records" for imp in IMPORTS)


def test_hpad_imports_no_service_package():
    bad = [imp for imp in IMPORTS if top(imp.source) == "hpad" and top(imp.target) in ("consumers", "tuner")]
    assert not bad, "the library must not import the services:\n" + _report(bad)


def test_hpad_imports_no_kafka_settings_or_prometheus():
    bad = [imp for imp in IMPORTS if top(imp.source) == "hpad" and top(imp.target) in HPAD_FORBIDDEN_THIRD_PARTY]
    assert not bad, "the library must not import service-only packages:\n" + _report(bad)


def test_consumers_imports_no_tuner():
    bad = [imp for imp in IMPORTS if top(imp.source) == "consumers" and top(imp.target) == "tuner"]
    assert not bad, "consumers -> tuner is against the direction tuner -> consumers -> hpad:\n" + _report(bad)


def test_tuner_imports_only_the_consumers_kernel():
    bad = [imp for imp in IMPORTS if top(imp.source) == "tuner" and top(imp.target) == "consumers"
           and imp.target not in TUNER_MAY_IMPORT]
    assert not bad, f"the tuner may import only {sorted(TUNER_MAY_IMPORT)} of consumers:\n" + _report(bad)


def test_the_kernel_is_the_one_consumers_documents():
    doc = (ROOT / "consumers" / "__init__.py").read_text()
    kernel_part = doc.split("The service kernel")[1].split("The scoring worker")[0]
    named = {f"consumers.{name}" for name in re.findall(r"`(\w+)`", kernel_part)} & set(first_party_modules())
    assert named == CONSUMERS_KERNEL


def test_the_kernel_imports_no_other_consumers_module():
    """The kernel stands alone: importing it never loads the scoring worker."""
    bad = [imp for imp in IMPORTS if imp.source in CONSUMERS_KERNEL and top(imp.target) == "consumers"
           and imp.target not in CONSUMERS_KERNEL]
    assert not bad, "a kernel module imports a non-kernel module:\n" + _report(bad)


def test_first_party_module_imports_are_acyclic():
    graph: dict[str, set[str]] = {}
    for imp in IMPORTS:
        if imp.module_level and top(imp.target) in PACKAGES and imp.target != imp.source:
            graph.setdefault(imp.source, set()).add(imp.target)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# ------------------------------------------------------------------------------------------ the checker itself


@pytest.mark.parametrize(("graph", "expected"), [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b", "c"}, "b": set(), "c": {"d"}, "d": {"c"}}, ["c", "d", "c"]),
])
def test_find_cycle(graph, expected):
    assert find_cycle(graph) == expected


def test_imports_of_sees_function_level_relative_and_submodule_imports():
    source = ("from consumers import kafka_io, WorkerSettings\nfrom . import b\n"
              "if TYPE_CHECKING:\n    from tuner.app import Tuner\n"
              "def f():\n    import kafka.errors\n")
    known = {"consumers", "consumers.kafka_io", "pkg", "pkg.a", "pkg.b", "tuner.app"}
    found = {(i.target, i.module_level) for i in imports_of(source, "pkg.a", False, known)}
    assert found == {("consumers.kafka_io", True), ("consumers", True), ("pkg.b", True), ("tuner.app", True),
                     ("kafka.errors", False)}
