"""Print the import graph of src/ and fail on a cycle: the design's one-way data flow, checked by anyone.

    python scripts/import_graph.py [--root=src] [--package=alexnet_jax]

One line per module: the project modules it imports, a `*` marking an import made
inside a function (deferred, yet still an edge: a deferred import back is still a
cycle in the design). Imports under `if TYPE_CHECKING:` count too. The last line
says how many modules and edges there are and whether any cycle exists; each cycle
is printed as a path. Exit status 1 when there is one, 0 otherwise. Reads the
files with ast: nothing is imported, so it needs no dependencies.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def module_files(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} of every .py file under root/package (a package is its __init__)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement may load, most specific first (a.b.c, then a.b for `from a.b import c`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the module's own package, up level - 1
        package_parts = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package_parts[: len(package_parts) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def import_graph(root: Path, package: str) -> dict[str, dict[str, bool]]:
    """{module: {imported project module: True when every import of it is deferred (inside a function)}}."""
    modules = module_files(root, package)
    graph: dict[str, dict[str, bool]] = {}
    for module, path in modules.items():
        edges: dict[str, bool] = {}
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, deferred in _walk(tree, deferred=False):
            names = _imported_names(node, module, path.name == "__init__.py")
            if isinstance(node, ast.ImportFrom):  # `from a import b`: the submodule b if there is one, else a
                submodules = [name for name in names[:-1] if name in modules]
                targets = submodules or ([names[-1]] if names[-1] in modules else [])
            else:
                targets = [name for name in names if name in modules]
            for target in targets:
                if target != module:
                    edges[target] = edges.get(target, True) and deferred
        graph[module] = edges
    return graph


def _walk(node: ast.AST, *, deferred: bool):
    """(import node, whether it sits inside a function) for every import in the tree."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, deferred
        inside = deferred or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        yield from _walk(child, deferred=inside)


def find_cycles(graph: dict[str, dict[str, bool]]) -> list[tuple[list[str], list[str]]]:
    """(the modules, one cycle through them) per strongly connected component of more than one module.

    Tarjan's algorithm, iterative (no recursion limit on deep graphs).
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
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
                    components.append(sorted(component))
    return [(component, _cycle_in(graph, set(component))) for component in components]


def _cycle_in(graph: dict[str, dict[str, bool]], component: set[str]) -> list[str]:
    """A path from the component's first module back to itself, through the component (breadth-first: a shortest)."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in component:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]  # start -> ... -> node -> start
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError("a strongly connected component without a cycle")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parent.parent / "src"))
    parser.add_argument("--package", default="alexnet_jax")
    args = parser.parse_args(argv)
    graph = import_graph(Path(args.root), args.package)
    for module in sorted(graph):
        targets = ", ".join(f"{name}{'*' if graph[module][name] else ''}" for name in sorted(graph[module]))
        print(f"{module} -> {targets or '(nothing of the project)'}")
    cycles = find_cycles(graph)
    edges = sum(len(targets) for targets in graph.values())
    for component, cycle in cycles:
        print(f"cycle among {len(component)} modules ({', '.join(component)}), e.g. " + " -> ".join(cycle))
    verdict = f"{len(cycles)} import cycle(s)" if cycles else "no import cycle"
    print(f"{len(graph)} modules, {edges} edges (* = imported inside a function): {verdict}")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
