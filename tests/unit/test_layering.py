"""The core library's import rule, checked statically: nothing under ``illume/`` imports Ray or
``services`` (docs/ARCHITECTURE.md, "Layers"), at module level or inside a function, by an import
statement or by ``importlib.import_module``/``__import__`` with a literal name; and only the wire
client imports the generated stubs (``illume.v1``).

The scan reads the source with ``ast``, so an import that only runs on some code path is caught
as well as one that runs at import time.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CORE = REPO / "illume"
GENERATED = CORE / "v1"
FORBIDDEN = ("ray", "services")
STUBS = "illume.v1"
# The typed gRPC client is the one core module that speaks the wire contract (docs/ARCHITECTURE.md).
STUB_IMPORTERS = {"illume/client.py"}
DYNAMIC_IMPORTERS = {"import_module", "__import__"}


def core_files() -> list[Path]:
    return sorted(p for p in CORE.rglob("*.py") if GENERATED not in p.parents)


def imported_modules(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in ``tree``, nested ones and literal dynamic ones included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Call) and _called_name(node.func) in DYNAMIC_IMPORTERS and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value


def _called_name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(files: list[Path], root: Path) -> list[str]:
    """One line per offending import statement: ``path:line imports module``."""
    found: dict[tuple[str, int], str] = {}
    for path in files:
        rel = path.relative_to(root).as_posix()
        for line, module in imported_modules(ast.parse(path.read_text(), filename=rel)):
            if any(is_within(module, banned) for banned in FORBIDDEN):
                found.setdefault((rel, line), f"{rel}:{line} imports {module}")
            elif is_within(module, STUBS) and rel not in STUB_IMPORTERS:
                found.setdefault((rel, line), f"{rel}:{line} imports the generated stubs ({module})")
    return list(found.values())


def scan_source(root: Path, source: str) -> list[str]:
    """The scan's findings for one module ``illume/mod.py`` holding ``source`` under ``root``."""
    module = root / "illume" / "mod.py"
    module.parent.mkdir()
    module.write_text(source)
    return violations([module], root)


def test_the_core_imports_neither_ray_nor_services_nor_the_stubs():
    assert core_files(), "no core modules found"
    assert violations(core_files(), REPO) == []


@pytest.mark.parametrize(
    "source",
    [
        "import ray\n",
        "import ray.serve as serve\n",
        "from ray import serve\n",
        "def f():\n    from services.local import run_forever\n",
        "class C:\n    def m(self):\n        import services\n",
        "import importlib\nm = importlib.import_module('ray.train')\n",
        "m = __import__('services.tuner')\n",
        "from illume.v1 import illume_pb2\n",
    ],
)
def test_the_scan_catches_each_kind_of_import(tmp_path, source):
    assert scan_source(tmp_path, source), source


@pytest.mark.parametrize(
    "source",
    [
        "import rayon\n",
        "from illume.store import FeedbackStore\n",
        "x = 'import ray'\n",
        "from . import ray\n",
    ],
)
def test_the_scan_leaves_other_imports_alone(tmp_path, source):
    assert scan_source(tmp_path, source) == []
