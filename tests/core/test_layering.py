"""Import layering, checked on the source with ``ast`` (nothing is imported).

- The shared layers (``thrifty.data``, ``thrifty.core``) never import a recipe (``thrifty.methods``).
- Within one recipe package ``thrifty/methods/<recipe>/`` the modules import each other without cycles
  (e.g. ``train`` may import ``figures``, but then ``figures`` must not import ``train``).

Every import statement counts, at module level or inside a function; relative imports are resolved first.
"""

from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "thrifty"
SHARED_LAYERS = ("data", "core")
RECIPES = sorted(p for p in (PACKAGE / "methods").iterdir() if p.is_dir() and any(p.glob("*.py")))


@dataclass(frozen=True)
class Import:
    """One imported module name, with where it was imported."""

    target: str  # dotted module name, e.g. ``thrifty.methods.squid.train``
    path: Path
    line: int
    statement: str  # the import statement as written, for messages

    def where(self) -> str:
        return f"{self.path.relative_to(SRC.parent)}:{self.line} `{self.statement}`"


def module_name(path: Path, root: Path = SRC) -> str:
    """Dotted name of a source file under ``root`` (a package's ``__init__`` is the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve_relative(path: Path, root: Path, level: int, module: str | None) -> str:
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package.pop()  # a module's relative imports start from its package
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imports_of(path: Path, root: Path = SRC) -> list[Import]:
    """Every module a source file imports; ``from m import n`` yields both ``m`` and ``m.n`` (``n`` may be a module)."""
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, path, node.lineno, ast.unparse(node)) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(path, root, node.level, node.module) if node.level else node.module or ""
            names = [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
            found += [Import(name, path, node.lineno, ast.unparse(node)) for name in names]
    return found


def _is_within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@pytest.mark.parametrize("layer", SHARED_LAYERS)
def test_shared_layer_does_not_import_a_recipe(layer: str) -> None:
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"no modules found under {PACKAGE / layer}"
    bad = sorted({imp.where() for f in files for imp in imports_of(f) if _is_within(imp.target, "thrifty.methods")})
    assert not bad, f"thrifty.{layer} must not depend on a recipe (thrifty.methods.*):\n  " + "\n  ".join(bad)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]`` of ``graph`` (module -> modules it imports), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_modules_have_no_import_cycle(recipe: Path) -> None:
    files = {module_name(f): f for f in sorted(recipe.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    sites: dict[tuple[str, str], str] = {}
    for name, path in files.items():
        for imp in imports_of(path):
            if imp.target in files and imp.target != name:
                graph[name].add(imp.target)
                sites.setdefault((name, imp.target), imp.where())
    cycle = _find_cycle(graph)
    assert cycle is None, (
        f"import cycle in recipe {recipe.name}: "
        + " -> ".join(cycle)
        + "\n  "
        + "\n  ".join(sites[a, b] for a, b in itertools.pairwise(cycle))
    )


def test_the_checker_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    """The parser itself: imports inside functions and relative imports are found and resolved."""
    pkg = tmp_path / "thrifty" / "methods" / "demo"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from thrifty.methods.demo.b import g\n    return g\n")
    (pkg / "b.py").write_text("from . import a\nimport thrifty.methods.demo.c as c\n")
    assert {i.target for i in imports_of(pkg / "a.py", tmp_path)} >= {"thrifty.methods.demo.b"}
    assert {i.target for i in imports_of(pkg / "b.py", tmp_path)} >= {
        "thrifty.methods.demo.a",
        "thrifty.methods.demo.c",
    }
    assert _find_cycle({"a": {"b"}, "b": {"a"}, "c": set()}) == ["a", "b", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
