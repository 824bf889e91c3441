"""The first-party import graph: no module of service/ or workers/ may import itself round a
circle, counting function-local imports (a local import must defer a heavy library, not hide a
cycle), and service/ never imports workers/ (the worker depends on the service, not back)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

ROOTS = ("service", "workers")

def _modname(p: Path) -> str:
    parts = list(p.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)

def _graph(root: Path):
    mods = {}
    for top in ROOTS:
        for p in (root / top).rglob("*.py"):
            mods[_modname(p.relative_to(root))] = p
    edges = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = pkg.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for n in names:
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n != m and not m.startswith(n + "."):
                    edges[m].add(n)
    return edges

def _cycles(edges):
    index: dict = {}
    low: dict = {}
    stack: list = []
    on: set = set()
    out: list = []
    i = [0]
    sys.setrecursionlimit(10000)
    def visit(v):
        index[v] = low[v] = i[0]
        i[0] += 1
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
    for v in edges:
        if v not in index:
            visit(v)
    return out



def test_no_import_cycles():
    assert _cycles(_graph(REPO)) == []


def test_the_cycle_finder_finds_a_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]


def test_service_never_imports_workers():
    edges = _graph(REPO)
    wrong = sorted(f"{m} -> {n}" for m, ns in edges.items() if m.startswith("service")
                   for n in ns if n.startswith("workers"))
    assert wrong == []
