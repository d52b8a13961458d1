"""Count the package's architecture: modules, import floors, cycles, upward imports, function-local imports.

    python benchmarks/import_layers.py            # this checkout
    python benchmarks/import_layers.py OTHER_CHECKOUT

Every intra-package import counts, function-local ones included (a cycle held together by an import inside a
function is still a cycle). Floors: the longest chain of imports, plus one. Upward: an import from a lower layer
into a higher one, by the layers of `.importlinter` (a module outside every layer, such as the package's
`__init__`, is not counted). The README's layout numbers come from this script.
"""

from __future__ import annotations

import ast
import sys
from functools import lru_cache
from pathlib import Path

LAYERS = [["cli"], ["serving", "experiments"], ["pipelines"], ["models"], ["core"], ["config"], ["schedules", "errors"]]


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None
    for rank, names in enumerate(LAYERS):
        if parts[1] in names:
            return rank
    return None


def imports(root: Path) -> tuple[dict[str, set[str]], int, int]:
    pkg = root / "textdiffusion"
    mods = {}
    for p in pkg.rglob("*.py"):
        parts = list(p.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    edges: dict[str, set[str]] = {m: set() for m in mods}
    top = local = 0
    for m, p in mods.items():
        tree = ast.parse(p.read_text())
        toplevel = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = m.split(".") if p.name == "__init__.py" else m.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [f"{target}.{a.name}" for a in node.names] + [target]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            found = next((c for c in candidates if c in mods and c != m), None)
            if found is None:
                continue
            edges[m].add(found)
            if id(node) in toplevel:
                top += 1
            else:
                local += 1
    return edges, top, local


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
    edges, top, local = imports(root)

    @lru_cache(None)
    def depth(m: str, seen: frozenset = frozenset()) -> int:
        return 1 + max((depth(n, seen | {m}) for n in edges[m] if n not in seen), default=0)

    upward = [(a, b) for a, targets in edges.items() for b in targets
              if layer_of(a) is not None and layer_of(b) is not None and layer_of(b) < layer_of(a)]
    found = cycles(edges)
    print(f"{len(edges)} modules, {max(depth(m) for m in edges)} import floors, {sum(map(len, edges.values()))} "
          f"import edges, {len(found)} cycle(s), {len(upward)} upward import(s), {top} top-level and {local} "
          "function-local intra-package imports")
    for c in found:
        print("  cycle:", " <-> ".join(c))
    for a, b in upward:
        print("  upward:", a, "->", b)


if __name__ == "__main__":
    main()
