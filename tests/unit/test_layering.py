"""The code base's shape (ADR-0014) beyond what import-linter's contracts say: no import cycles anywhere, and no
module grown past what a reader takes in at one sitting without a stated reason."""

from __future__ import annotations

import grimp

from tests.conftest import REPO

PACKAGES = ("kestrel_core", "kestrel_device", "kestrel", "api", "authsvc", "devicesvc", "ingest", "pki")
#: Modules allowed past MAX_LINES, each with its reason.
LONG_MODULES: dict[str, str] = {}
MAX_LINES = 400


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles() -> None:
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    assert _cycles(graph) == []


def test_modules_stay_small_enough_to_read_in_one_sitting() -> None:
    roots = [REPO / p for p in ("kestrel", "api", "authsvc", "devicesvc", "ingest", "pki")]
    roots += [REPO / "sdk" / "src" / p for p in ("kestrel_core", "kestrel_device")]
    long = {
        str(path.relative_to(REPO)): n
        for root in roots
        for path in root.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert {k: v for k, v in long.items() if k not in LONG_MODULES} == {}
