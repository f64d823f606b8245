"""Fail when the modules of lorafit/ import each other in a cycle (``make lint`` runs this).

Reads every ``import`` / ``from ... import`` in lorafit/ with ``ast`` — also those inside functions and under
``if TYPE_CHECKING:``: a deferred or annotation-only import still ties two modules' designs together. An
edge a -> b means module a imports module b (``from lorafit.x import y`` counts as lorafit.x, or lorafit.x.y
when that is a module). Prints each cycle found and exits 1; exits 0 when the graph has none.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "lorafit"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The lorafit modules ``path`` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules and name.split(".")[0] == PACKAGE}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def main() -> int:
    files = {module_name(path): path for path in sorted((ROOT / PACKAGE).rglob("*.py"))}
    # A package's own __init__ is imported by each of its submodules: not an edge a cycle is made of.
    graph = {name: imports_of(path, set(files)) - {name} - {name.rpartition(".")[0]} for name, path in files.items()}
    found = cycles(graph)
    for component in found:
        print("import cycle: " + " <-> ".join(component), file=sys.stderr)
    if not found:
        print(f"no import cycle among {len(graph)} modules of {PACKAGE}/")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
