"""Packaging guards.

(a) The core stays torch-only: no module under diffkv_sglang/ (kernels/ included, it ships as
    diffkv_sglang.kernels) imports sglang or sgl_kernel, except diffkv_sglang/plugin.py and
    anything under diffkv_sglang/integration/. Imports under ``if TYPE_CHECKING:`` are allowed
    (they never run). Files that do not exist yet are simply not scanned.
    Nothing under diffkv_sglang/ (plugin and integration included) imports diffkv_devtools, the repo's
    development support package, and ``diffkv_sglang.calibrate`` (a CLI of the core) imports neither the
    SGLang glue (plugin.py, integration/) nor sglang.
(b) The wheel (``pip wheel --no-deps --no-build-isolation``) ships diffkv_sglang/ and
    diffkv_sglang/kernels/, and no top-level kernels/, nothing from tests/ or diffkv_devtools/.
    (b) is marked ``slow`` (one wheel build, a few seconds); it is in the default run. Deselect with
    ``-m "not slow"``.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "diffkv_sglang"
KERNELS = ROOT / "kernels"  # shipped as diffkv_sglang.kernels (pyproject package-dir)

FORBIDDEN_ROOTS = {"sglang", "sgl_kernel"}
ALLOWED = ("diffkv_sglang/plugin.py", "diffkv_sglang/integration/")


# --------------------------------------------------------------------------- (a) import scan


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def forbidden_imports(source: str, filename: str = "<src>",
                      roots: set[str] = FORBIDDEN_ROOTS) -> list[tuple[int, str]]:
    """(line, module) for every import of a ``roots`` module (default FORBIDDEN_ROOTS) outside
    ``if TYPE_CHECKING:``, including lazy imports inside functions and
    ``importlib.import_module("...")``/``__import__``."""
    found: list[tuple[int, str]] = []

    def check(lineno: int, module: str | None) -> None:
        if module and module.split(".")[0] in roots:
            found.append((lineno, module))

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:  # the else branch does run
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                check(node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            check(node.lineno, node.module)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0]
            if name in ("import_module", "__import__") and isinstance(arg, ast.Constant):
                if isinstance(arg.value, str):
                    check(node.lineno, arg.value)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source, filename=filename))
    return found


def core_modules() -> list[tuple[str, Path]]:
    """(path as shipped in the wheel, file on disk) for every scanned module."""
    out: list[tuple[str, Path]] = []
    trees = [(PKG, "diffkv_sglang"), (KERNELS, "diffkv_sglang/kernels")]
    for base, shipped in trees:
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            # diffkv_sglang/kernels is a symlink to ../kernels: scanned once, through KERNELS
            dirnames[:] = sorted(
                d for d in dirnames if d != "__pycache__" and not Path(dirpath, d).is_symlink()
            )
            for name in sorted(filenames):
                if name.endswith(".py"):
                    path = Path(dirpath, name)
                    out.append((f"{shipped}/{path.relative_to(base).as_posix()}", path))
    return out


def _allowed(shipped: str) -> bool:
    return shipped == ALLOWED[0] or shipped.startswith(ALLOWED[1])


def test_scanner_finds_every_import_form():
    src = """
import os
import sglang
import sglang.srt.server_args as sa
from sglang.srt.mem_cache import memory_pool
from sgl_kernel import rmsnorm
from . import sglang_free
from .integration import glue
from typing import TYPE_CHECKING
import importlib
if TYPE_CHECKING:
    from sglang.srt.mem_cache.radix_cache import RadixCache
else:
    import sglang.else_branch
def lazy():
    import sglang.lazy
    return importlib.import_module("sglang.dynamic")
"""
    lines = {module for _, module in forbidden_imports(src)}
    assert lines == {
        "sglang",
        "sglang.srt.server_args",
        "sglang.srt.mem_cache",
        "sgl_kernel",
        "sglang.else_branch",
        "sglang.lazy",
        "sglang.dynamic",
    }
    assert forbidden_imports("import sglang_tools\nfrom sglangx import y\nimport torch\n") == []


def test_core_does_not_import_sglang():
    modules = core_modules()
    if not modules:
        pytest.skip("no modules under diffkv_sglang/ or kernels/ yet")
    offenders = []
    for shipped, path in modules:
        if _allowed(shipped):
            continue
        for lineno, module in forbidden_imports(path.read_text(encoding="utf-8"), str(path)):
            offenders.append(f"{path.relative_to(ROOT)}:{lineno}: imports {module}")
    assert not offenders, (
        "the torch-only core must not import sglang; move this into diffkv_sglang/plugin.py "
        "or diffkv_sglang/integration/:\n  " + "\n  ".join(offenders)
    )


def test_core_does_not_import_devtools():
    offenders = [f"{path.relative_to(ROOT)}:{lineno}: imports {module}"
                 for _, path in core_modules()
                 for lineno, module in forbidden_imports(path.read_text(encoding="utf-8"), str(path),
                                                         roots={"diffkv_devtools"})]
    assert not offenders, "diffkv_devtools is never shipped; the package must not import it:\n  " + "\n  ".join(
        offenders)


def imported_modules(source: str, module: str) -> set[str]:
    """Absolute names of what ``module`` (dotted) imports anywhere in ``source`` (lazy imports included), relative
    imports resolved; ``from X import y`` gives both ``X`` and ``X.y``."""
    package = module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            name = ".".join(part for part in (base, node.module) if part)
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def test_imported_modules_resolves_relative_imports():
    src = "from .config import build_config\nfrom . import integration\nfrom .integration.args import x\nimport os\n"
    assert imported_modules(src, "diffkv_sglang.calibrate") == {
        "diffkv_sglang.config", "diffkv_sglang.config.build_config", "diffkv_sglang", "diffkv_sglang.integration",
        "diffkv_sglang.integration.args", "diffkv_sglang.integration.args.x", "os"}


def test_calibrate_depends_on_the_core_only():
    glue = ("diffkv_sglang.integration", "diffkv_sglang.plugin", *FORBIDDEN_ROOTS)
    found = imported_modules((PKG / "calibrate.py").read_text(encoding="utf-8"), "diffkv_sglang.calibrate")
    offenders = sorted(m for m in found if any(m == g or m.startswith(g + ".") for g in glue))
    assert not offenders, f"diffkv_sglang/calibrate.py imports the SGLang glue: {offenders}"


def test_top_level_kernels_folder_is_not_a_package():
    # pyproject: kernels/ has no __init__.py on purpose, so a top-level `import kernels` (sglang,
    # transformers: the PyPI `kernels` package) never resolves to a regular package from this repo.
    assert not (KERNELS / "__init__.py").exists()
    link = PKG / "kernels"
    assert link.is_symlink() and os.readlink(link) == "../kernels"


# --------------------------------------------------------------------------- (b) the wheel

_BUILD_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", ".cache", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
    ".hypothesis", ".whl",
)


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    """Build the wheel from a copy of the working tree (no build/ or egg-info left in the repo)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=_BUILD_IGNORE)
    out = tmp_path / "wheel"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(out.glob("diffkv_sglang-*.whl"))
    assert len(wheels) == 1, list(out.iterdir())
    names = zipfile.ZipFile(wheels[0]).namelist()

    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"diffkv_sglang"}, f"unexpected top-level entries: {sorted(top)}"
    assert not [n for n in names if n.startswith(("kernels/", "tests/", "diffkv_devtools/"))]
    leaked = [n for n in names if any(s in n for s in ("cpu_shims", "e2e_support", "conftest", "diffkv_devtools"))]
    assert not leaked, f"test files in the wheel: {leaked}"

    if any(KERNELS.rglob("*.py")):
        assert any(n.startswith("diffkv_sglang/kernels/") for n in names), sorted(names)

    # every module of the package (and of kernels/) ships, so a new subpackage that is missing
    # from pyproject's explicit `packages` list fails here, not on a user's machine
    missing = sorted(shipped for shipped, _ in core_modules() if shipped not in names)
    assert not missing, f"modules missing from the wheel (pyproject [tool.setuptools] packages?): {missing}"
