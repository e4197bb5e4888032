"""Structure figures of the package: lines per subpackage, import cycles between packages, longest functions.

The house issue's before/after figures (docs/architecture.md). Pure static analysis (``ast``), no
imports of the package; writes JSON.

    python benchmarks/code_structure.py --out benchmarks/results/<date>/code_structure.json [--root threedino_pipe]
"""

from __future__ import annotations

import argparse
import ast
import itertools
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import invocation, write_json  # noqa: E402

PACKAGE = "threedino_pipe"


def package_of(module: str) -> str:
    """``threedino_pipe.stages.pretrain`` -> ``training``; a top-level module is its own package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(tree: ast.AST, module: str) -> set[str]:
    """Absolute names of the package's modules imported anywhere in ``tree`` (function bodies too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(PACKAGE))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: -node.level] if not module.endswith("__init__") else module.split(".")
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith(PACKAGE):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
    return found


def cycles_between(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one package (each holds at least one cycle)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = itertools.count()

    def visit(v: str) -> None:
        index[v] = low[v] = next(counter)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def simple_cycles(graph: dict[str, set[str]], limit: int = 10_000) -> int:
    """Number of elementary cycles between packages (Johnson-style enumeration, small graphs)."""
    nodes = sorted(graph)
    count = 0
    for i, start in enumerate(nodes):
        allowed = set(nodes[i:])
        stack = [(start, [start])]
        while stack and count < limit:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    count += 1
                elif nxt in allowed and nxt not in path:
                    stack.append((nxt, path + [nxt]))
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(PACKAGE))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--top", type=int, default=15, help="How many of the longest functions to list.")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    lines: dict[str, int] = defaultdict(int)
    graph: dict[str, set[str]] = defaultdict(set)
    functions = []
    known = {module_name(root, p) for p in root.rglob("*.py")}
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        module = module_name(root, path)
        package = package_of(module)
        lines[package] += len(source.splitlines())
        tree = ast.parse(source)
        graph.setdefault(package, set())
        for target in imported_modules(tree, module) & known:
            other = package_of(target)
            if other != package and other != PACKAGE:
                graph[package].add(other)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append({"function": f"{module}.{node.name}", "lines": node.end_lineno - node.lineno + 1})
    functions.sort(key=lambda f: -f["lines"])
    components = cycles_between(graph)
    result = {
        "command": invocation(sys.argv if argv is None else ["code_structure.py", *argv]),
        "lines_per_package": dict(sorted(lines.items())),
        "lines_total": sum(lines.values()),
        "package_imports": {k: sorted(v) for k, v in sorted(graph.items())},
        "cyclic_components": components,
        "import_cycles": simple_cycles(graph),
        "functions_over_80_lines": sum(f["lines"] > 80 for f in functions),
        "longest_functions": functions[: args.top],
    }
    write_json(args.out, result)
    print(f"{result['lines_total']} lines; {result['import_cycles']} import cycles between packages "
          f"({len(components)} cyclic groups); {result['functions_over_80_lines']} functions over 80 lines; "
          f"longest {functions[0]['function']} ({functions[0]['lines']} lines)")


if __name__ == "__main__":
    main()
