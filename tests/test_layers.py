"""The library's floors (docs/architecture.md): imports only point down. Read off the source with ``ast``,
counting imports inside functions and under ``TYPE_CHECKING``: no import cycle anywhere in ``training/``;
the families import nothing above the ground floor; an import kept inside a function says why; nothing
outside the families compares a family's name."""

from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIBRARY = os.path.join(ROOT, "training")
GROUND = {"training.errors", "training.tensors", "training.files", "training.memory", "training.device"}


def _modules(top: str = LIBRARY, package: str = "training") -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(top):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), top)[:-3].replace(os.sep, ".")
                name = package if rel == "__init__" else f"{package}.{rel.removesuffix('.__init__')}"
                out[name] = os.path.join(folder, f)
    return out


MODULES = _modules()


def _imports(name: str, path: str) -> list[tuple[str, ast.AST, bool]]:
    """(imported training module, the statement, whether it sits inside a function) for each import."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            where = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            for alias in node.names:
                full = f"{where}.{alias.name}"
                targets.append(full if full in MODULES else where)
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        out += [(t, node, id(node) in inner) for t in targets if t in MODULES and t != name]
    return out


GRAPH = {m: sorted({t for t, _, _ in _imports(m, p)}) for m, p in MODULES.items()}


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in GRAPH[m]:
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in GRAPH:
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle_in_the_library():
    assert _cycle() is None, " -> ".join(_cycle())


def test_the_families_import_nothing_above_the_ground_floor():
    for m, targets in GRAPH.items():
        if m.startswith("training.families."):
            above = [t for t in targets if t not in GROUND and not t.startswith("training.families.")]
            assert not above, f"{m} imports {above}: a family gets what it needs from above as an argument"
    # the type and the shared grammar sit below the families, the registry above them
    assert set(GRAPH["training.families.base"]) <= GROUND
    assert set(GRAPH["training.families.ldm"]) <= GROUND | {"training.families.base"}
    for family in ("klf8", "flux2", "wan"):
        assert "training.families" not in GRAPH[f"training.families.{family}"]


def _says_why(lines: list[str], i: int) -> bool:
    """A comment on the import's line, on a neighbouring import of the same group, or on the line above the
    group (``try:  # why`` counts)."""
    j = i
    while j > 0 and lines[j - 1].strip().startswith(("import ", "from ")):
        j -= 1
    k = i
    while k + 1 < len(lines) and lines[k + 1].strip().startswith(("import ", "from ")):
        k += 1
    return any("#" in lines[n] for n in range(j, k + 1)) or (j > 0 and "#" in lines[j - 1])


def test_an_import_inside_a_function_says_why():
    silent = []
    for path in list(MODULES.values()):
        lines = open(path, encoding="utf-8").read().split("\n")
        tree = ast.parse("\n".join(lines))
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(f):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    if not _says_why(lines, node.lineno - 1):
                        silent.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not silent, "imports inside functions without a word on why:\n" + "\n".join(silent)


def test_no_family_name_is_compared_outside_the_families():
    from training.families import FAMILIES

    names = {f.name for f in FAMILIES}
    places = [p for m, p in MODULES.items() if not m.startswith("training.families")]
    nodes = os.path.join(ROOT, "nodes")
    places += [os.path.join(nodes, f) for f in os.listdir(nodes) if f.endswith(".py")]
    found = []
    for path in places:
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "family names outside training/families/ (ask the VAE's Family instead):\n" + "\n".join(found)
