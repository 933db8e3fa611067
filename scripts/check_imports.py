"""Fail when the package's imports form a circle or reach upward.

Every import counts, at module level or inside a function (a function-level import hides a circle, it
does not remove it); only ``if TYPE_CHECKING:`` blocks are left out, since they never run. Upward: the
lower layers (``checkpoint/``, ``guard/``, ``slurm/``) never import the trainer, the run or the CLI.
Run by ``scripts/test.sh``; exit 1 with one line per finding.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "radiodiff_resume"
LOWER = ("checkpoint", "guard", "slurm")
UPPER = ("trainer", "run", "cli")


def module_of(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def known(name: str, modules: set[str]) -> str | None:
    """``name`` or the nearest package module above it."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def runtime_imports(path: Path, root: Path, modules: set[str]) -> set[str]:
    """The package's modules ``path`` imports when it runs (``TYPE_CHECKING`` blocks left out)."""
    me = module_of(path, root)
    package = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    found: set[str | None] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.orelse:
                    visit_one(stmt)
            else:
                visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(known(a.name, modules) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(known(f"{base}.{alias.name}", modules) if f"{base}.{alias.name}" in modules
                          else known(base, modules))
        visit(node)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m is not None and m != me and m.startswith(PACKAGE)}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
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


def layer(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def problems(root: Path) -> list[str]:
    """One line per circle and per upward import in ``root``'s package."""
    files = sorted((root / PACKAGE).rglob("*.py"))
    modules = {module_of(f, root) for f in files}
    graph = {module_of(f, root): runtime_imports(f, root, modules) for f in files}
    problems = []
    for component in circles(graph):
        edges = "; ".join(f"{m} → {', '.join(sorted(graph[m] & set(component)))}" for m in component)
        problems.append(f"import circle: {edges}")
    for module, imported in sorted(graph.items()):
        if layer(module) in LOWER:
            problems += [f"upward import: {module} → {target} ({layer(module)}/ never imports "
                         f"{', '.join(UPPER)})" for target in sorted(imported) if layer(target) in UPPER]
    return problems


def main() -> int:
    found = problems(ROOT)
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
