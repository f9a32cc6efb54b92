"""Every import of crossdiff resolves, and imports point one way between the layers (README.md, "File tree").

Read from the source with `ast`, without importing anything: most of the package imports lazily inside
functions (so `import crossdiff` and `--help` stay fast), and a lazy import that names a moved or
renamed module fails only when that function runs. So every `from .x import y`, `from crossdiff.x
import y`, `import crossdiff.x`, and every dotted "crossdiff.x.y" / "crossdiff.x:y" string (the CLI's
command table, the lazy names of `crossdiff/__init__.py`, monkeypatch targets in tests) must name a
module that exists and a name defined at its top level.
"""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(
    p
    for folder in ("crossdiff", "tests", "bench")
    for p in (REPO / folder).rglob("*.py")
    if "__pycache__" not in p.parts
)

# Layers, lowest first (README.md, "File tree"): a module imports only from its own group and from
# groups of a lower rank. Groups of the same rank (harvest, analysis, check, interop) do not import each other.
RANK = {
    "core": 0,
    "inputs": 1,
    "coder": 2,
    "harvest": 3,
    "analysis": 3,
    "check": 3,
    "interop": 3,
    "report": 4,
    "budget": 5,
    "pipeline": 6,
    "controls": 7,  # the organism control runs a whole diff (pipeline)
    "cli": 8,
    "__main__": 9,
}
DOTTED = re.compile(r"crossdiff(?:\.\w+)+(?::\w+)?")


def module_file(name: str) -> Path | None:
    """The file of module `name` (dotted), or None when there is none."""
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_names(path: Path) -> set[str]:
    """Names a module defines at its top level (also inside top-level if/try blocks)."""
    names: set[str] = set()
    tree = ast.parse(path.read_text())
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.If | ast.Try):
            todo.extend(node.body + node.orelse + getattr(node, "finalbody", []))
            todo.extend(s for h in getattr(node, "handlers", []) for s in h.body)
    return names


def lazy_names() -> set[str]:
    """The names `crossdiff/__init__.py` serves through its module `__getattr__` (_LAZY)."""
    tree = ast.parse((REPO / "crossdiff" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_LAZY" for t in node.targets):
            return {k.value for k in node.value.keys}
    raise AssertionError("crossdiff/__init__.py has no _LAZY table")


def has_name(module: str, name: str) -> bool:
    """`from module import name` works: a submodule, a top-level name, or a lazy name of the root."""
    if module_file(f"{module}.{name}") is not None:
        return True
    path = module_file(module)
    return name in top_level_names(path) or (module == "crossdiff" and name in lazy_names())


def imports(path: Path, source: str):
    """(line, target module, imported names) of every crossdiff import in `source` (the text of `path`),
    lazy ones too."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "crossdiff":
                yield node.lineno, target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "crossdiff":
                    yield node.lineno, a.name, []


def resolves(dotted: str) -> bool:
    """ "crossdiff.a.b:name", "crossdiff.a.b.name" or "crossdiff.a.b.Class.attr": the longest module
    prefix, then a name defined in it (and an attribute defined in that class's body)."""
    module, _, name = dotted.partition(":")
    parts = module.split(".")
    if name:
        return module_file(module) is not None and has_name(module, name)
    for cut in range(len(parts), 0, -1):
        path = module_file(".".join(parts[:cut]))
        if path is None:
            continue
        rest = parts[cut:]
        if len(rest) <= 1:
            return not rest or has_name(".".join(parts[:cut]), rest[0])
        classes = [
            n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef) and n.name == rest[0]
        ]
        return len(rest) == 2 and any(
            getattr(n, "name", None) == rest[1]
            or rest[1] in {getattr(t, "id", None) for t in getattr(n, "targets", [])}
            for c in classes
            for n in c.body
        )
    return False


def problems(path: Path, source: str) -> list[str]:
    """One line per import in `source` (the text of `path`) that does not resolve."""
    rel, out = path.relative_to(REPO), []
    for line, target, names in imports(path, source):
        if module_file(target) is None:
            out.append(f"{rel}:{line}: no module {target}")
            continue
        out += [f"{rel}:{line}: {target} has no {n}" for n in names if not has_name(target, n)]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and DOTTED.fullmatch(node.value):
            if not resolves(node.value):
                out.append(f"{rel}:{node.lineno}: {node.value} does not resolve")
    return out


def group(module: str) -> str | None:
    """The layer group of a module of the package; None for the root package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_crossdiff_import_resolves():
    broken = [p for path in SOURCES for p in problems(path, path.read_text())]
    assert not broken, "\n".join(broken)


def test_imports_point_one_way_between_layers():
    upward = []
    for path in (REPO / "crossdiff").rglob("*.py"):
        here = module_name(path)
        src = group(here)
        if src is None:
            continue  # the root package: __version__ and the lazy name table only
        assert src in RANK, f"{here}: add its group to RANK (and to the README's layering)"
        for line, target, _ in imports(path, path.read_text()):
            dst = group(target)
            if dst is None or dst == src:
                continue  # `from .. import __version__`, or within the group
            if RANK[dst] >= RANK[src]:
                upward.append(f"{path.relative_to(REPO)}:{line}: {src} (layer {RANK[src]}) imports {target}")
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize(
    "source, want",
    [
        ("from .store import Store\n", None),
        ("from .stores import Store\n", "no module crossdiff.inputs.stores"),
        ("from ..inputs.store import NoSuchName\n", "crossdiff.inputs.store has no NoSuchName"),
        ("def f():\n    from crossdiff.store import Store\n", "no module crossdiff.store"),
        ("from crossdiff import NoSuchName\n", "crossdiff has no NoSuchName"),
        ("X = 'crossdiff.coder.train:no_such_function'\n", "does not resolve"),
        ("X = 'crossdiff.coder.train.train'\n", None),
        ("X = 'crossdiff.train.train'\n", "does not resolve"),
    ],
)
def test_a_broken_import_is_caught(source, want):
    """The check above on a snippet read as if it were crossdiff/inputs/snippet.py: it passes a good
    import and names the broken one."""
    found = problems(REPO / "crossdiff" / "inputs" / "snippet.py", source)
    if want is None:
        assert found == []
    else:
        assert len(found) == 1 and want in found[0], found
