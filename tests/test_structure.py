"""The package's structure: imports only go down the layers, never in a cycle, and the library never
imports the applications. Every import counts, inside a function too (deferring an import hides a
dependency, it does not remove it), and so does one made only for
annotations (``if TYPE_CHECKING:``)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Layers, bottom to top: a module may import its own layer or a lower one. The longest prefix wins.
LAYERS = [
    ("contract", ("moekit.routing", "moekit.registry", "moekit.io", "moekit._checks", "moekit.ops")),
    ("routers", ("moekit.routers",)),
    ("dispatch and experts", ("moekit.dispatch", "moekit.experts")),
    ("layer", ("moekit.layer",)),
    ("models and data", ("moekit.models", "moekit.data")),
    ("features", ("moekit.convert", "moekit.offload", "moekit.parallel", "moekit.train", "moekit.compress")),
    ("public API", ("moekit",)),
    ("applications", ("moekit.apps", "moekit.__main__")),
]

# Imports of moekit modules inside a function, each with its reason. Everything else imports at the
# top of its module.
DEFERRED = {
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in (SRC / "moekit").rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def _resolve(name: str, names: set[str]) -> str:
    while name not in names:
        name = name.rpartition(".")[0]
    return name


def _imports(name: str, path: Path, names: set[str]) -> list[tuple[str, int, bool]]:
    """``(target, line, inside a function)`` for every import of a moekit module."""
    out = []

    def visit(node: ast.AST, deferred: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend((_resolve(a.name, names), child.lineno, deferred) for a in child.names
                           if a.name.split(".")[0] == "moekit")
            elif isinstance(child, ast.ImportFrom):
                assert not child.level, f"{path}:{child.lineno}: relative import; moekit imports absolutely"
                if (child.module or "").split(".")[0] == "moekit":
                    for a in child.names:
                        full = f"{child.module}.{a.name}"
                        out.append((full if full in names else _resolve(child.module, names), child.lineno, deferred))
            visit(child, deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(), str(path)), False)
    return [(t, ln, d) for t, ln, d in out if t != name]


def _layer(name: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{name}: in no layer; add it to LAYERS"
    return rank


def _graph():
    mods = _modules()
    names = set(mods)
    return mods, {m: _imports(m, p, names) for m, p in mods.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
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

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    _, graph = _graph()
    assert _cycles({m: {t for t, _, _ in imps} for m, imps in graph.items()}) == []


def test_imports_only_go_down_and_the_library_never_imports_the_applications():
    mods, graph = _graph()
    up = [f"{mods[m].relative_to(SRC)}:{ln} {m} ({LAYERS[_layer(m)][0]}) -> {t} ({LAYERS[_layer(t)][0]})"
          for m, imps in graph.items() for t, ln, _ in imps if _layer(t) > _layer(m)]
    assert up == []


def test_imports_inside_functions_have_a_reason():
    mods, graph = _graph()
    hidden = sorted(f"{mods[m].relative_to(SRC)}:{ln} {m} -> {t}" for m, imps in graph.items()
                    for t, ln, deferred in imps if deferred and (m, t) not in DEFERRED)
    assert hidden == []
    stale = [k for k in DEFERRED if not any(t == k[1] and d for t, _, d in graph.get(k[0], ()))]
    assert stale == []


def _library_files() -> list[Path]:
    return sorted(p for p in (SRC / "moekit").rglob("*.py") if "apps" not in p.relative_to(SRC).parts)


def test_no_library_function_is_longer_than_80_lines():
    long = []
    for p in _library_files():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{p.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []


def _code_lines(p: Path) -> list[tuple[int, str]]:
    """``(line number, stripped text)`` of the lines that carry code: no blank lines, comments,
    docstrings, imports or lone closing brackets."""
    text = p.read_text()
    prose = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            prose.update(range(node.lineno, node.end_lineno + 1))
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if i not in prose and s and not s.startswith(("#", "import ", "from ")) and s.strip(")]}:,") != "":
            out.append((i, s))
    return out


def test_no_block_of_six_lines_is_repeated_in_the_library():
    seen: dict[tuple[str, ...], tuple[Path, int]] = {}
    repeated = []
    for p in _library_files():
        lines = _code_lines(p)
        for j in range(len(lines) - 5):
            key = tuple(s for _, s in lines[j : j + 6])
            first = seen.setdefault(key, (p, j))
            if first[0] != p or j - first[1] >= 6:  # not the same window, nor one overlapping it
                repeated.append(f"{p.relative_to(SRC)}:{lines[j][0]} repeats {first[0].relative_to(SRC)}")
    assert repeated == []
