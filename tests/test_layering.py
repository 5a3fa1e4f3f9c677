"""The import graph follows the layering of docs/design.md: kernels sit below the core (they import
``diffkv_sglang.format`` and ``diffkv_sglang.config`` and each other, never the store, the memory manager or the
wrappers), and the core's modules form no import cycle."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNEL_ALLOWED = ("diffkv_sglang.format", "diffkv_sglang.config", "diffkv_sglang.kernels.")


def _imports(path: Path, package: str) -> set[str]:
    """Every ``diffkv_sglang`` module ``path`` imports, at any depth of the file (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:                                         # relative: resolve against the package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            found.add(module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("diffkv_sglang")}


def test_kernels_import_only_format_and_config():
    for path in sorted((REPO / "kernels").glob("*.py")):
        bad = [m for m in _imports(path, "diffkv_sglang.kernels") if not m.startswith(KERNEL_ALLOWED)]
        assert not bad, f"kernels/{path.name} imports {bad}; kernels take tensors and a format.BlockView"


def test_core_modules_have_no_import_cycle():
    core = {f"diffkv_sglang.{p.stem}": p for p in (REPO / "diffkv_sglang").glob("*.py") if p.stem != "__init__"}
    graph = {name: {m for m in _imports(path, "diffkv_sglang") if m in core} for name, path in core.items()}
    state: dict[str, int] = {}

    def visit(name, trail):
        if state.get(name) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(trail + [name])}")
        if state.get(name) == 2:
            return
        state[name] = 1
        for dep in sorted(graph[name]):
            visit(dep, trail + [name])
        state[name] = 2

    for name in sorted(graph):
        visit(name, [])
