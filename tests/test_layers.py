"""The layers hold: no module imports a layer above its own, and the service never loads torch.

    top      lantern.cli, lantern.commands.*, lantern.stack, lantern.client,
             lantern.batch, lantern.redis_server                    may import anything
    middle   service.*  -> the core only
             models.*   -> the core only (and torch)
             workers.*  -> the core and models (and torch)
    bottom   lantern.core.* -> nothing of Lantern's above it, and never torch

Every import is read from the source (function-level ones included), so a lazy import
cannot hide a dependency; a second check imports every service module in a fresh
interpreter and looks at what it loaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("lantern", "models", "service", "workers")
TORCH = ("torch", "torchvision", "onnx", "onnxscript", "matplotlib")

# layer -> the project layers it may import (itself included)
ALLOWED = {
    "core": {"core"},
    "models": {"core", "models"},
    "service": {"core", "service"},
    "workers": {"core", "models", "workers"},
    "top": {"core", "models", "service", "workers", "top"},
}
MAY_IMPORT_TORCH = {"models", "workers", "top"}
FORBIDDEN_IN_SERVICE = (*TORCH, "workers", "models")


def layer_of(module: str) -> str | None:
    root = module.split(".", 1)[0]
    if module == "lantern.core" or module.startswith("lantern.core."):
        return "core"
    if root == "lantern":
        return "top"
    return root if root in PACKAGES else None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    package = module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def project_modules() -> dict[str, Path]:
    return {
        module_name(p): p
        for package in PACKAGES
        for p in (REPO / package).rglob("*.py")
        if "static" not in p.parts
    }


def test_the_import_graph_checker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The checker itself: an import inside a function is an import."""
    source = REPO / "lantern" / "core" / "_probe_for_the_test.py"
    source.write_text("def f():\n    import torch\n    from workers import tasks\n")
    try:
        assert {"torch", "workers", "workers.tasks"} <= imports_of(source)
    finally:
        source.unlink()


def test_no_module_imports_a_layer_above_its_own() -> None:
    modules = project_modules()
    assert len(modules) > 40  # the walk found the code
    violations = []
    for name, path in sorted(modules.items()):
        layer = layer_of(name)
        assert layer is not None
        for imported in imports_of(path):
            target = layer_of(imported)
            if target is not None and target not in ALLOWED[layer]:
                violations.append(f"{name} ({layer}) imports {imported} ({target})")
            if layer not in MAY_IMPORT_TORCH and imported.split(".", 1)[0] in TORCH:
                violations.append(f"{name} ({layer}) imports {imported}")
    assert not violations, "\n".join(violations)


def test_no_two_service_modules_import_each_other() -> None:
    modules = {n: p for n, p in project_modules().items() if layer_of(n) == "service"}
    graph = {n: {i for i in imports_of(p) if i in modules and i != n} for n, p in modules.items()}
    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if a in graph.get(b, ()))
    assert not cycles, cycles


@pytest.mark.integration
def test_importing_every_service_module_loads_no_torch(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    names = sorted(n for n in project_modules() if layer_of(n) in ("service", "core"))
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN_IN_SERVICE!r})\n"
        "print(len(sys.modules), bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    import os

    env = {**os.environ, "LANTERN_MODEL": tiny_bundle.tag}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
