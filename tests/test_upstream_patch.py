"""The upstream proposals ``patches/sglang-0.5.23-kv-pool.patch`` and ``patches/sglang-0.5.23-request-checks.patch``
apply to the installed SGLang and work.

Fast checks (no server, no SGLang import): the files the patch touches are copied from the installed
``sglang`` package into ``tmp_path``; ``patch -p1 --dry-run`` must apply every hunk exactly (no fuzz, no
offset); the patch is then applied to the copy and

(a) every patched or created file compiles;
(b) the new registry module, imported by file path (so it never shadows the installed ``sglang``), registers,
    looks up and refuses names as documented, and imports nothing from SGLang;
(c) the CLI pieces are in place: ``KV_POOL_CHOICES``/``add_kv_pool_choices``, the ``kv_pool`` field, its
    positional order entry and the ``server_args`` re-export.

The request-checks patch gets the same exact-application check; its new ``_validate_generate_prompt`` is compiled
from the patched source alone (importing ``tokenizer_manager`` would install uvloop's event loop policy in the test
process) and run on good and bad prompts, and ``_validate_one_request`` must call it.

One ``slow`` check copies the whole package, applies the patch and parses ``--kv-pool`` with the patched
``ServerArgs`` in a subprocess (plugins disabled: the diffkv plugin's own ``--kv-pool`` would clash).

The installed SGLang is never modified. Skipped only when the ``patch`` program is missing.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import py_compile
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATCH = ROOT / "patches" / "sglang-0.5.23-kv-pool.patch"
REQUEST_PATCH = ROOT / "patches" / "sglang-0.5.23-request-checks.patch"
TOKENIZER_MANAGER = "sglang/srt/managers/tokenizer_manager.py"
SGLANG_VERSION = "0.5.23"
REGISTRY = "sglang/srt/mem_cache/kv_pool_registry.py"

pytestmark = pytest.mark.skipif(shutil.which("patch") is None, reason="the `patch` program is not installed")


def _installed_sglang_root() -> Path:
    """The directory that contains the installed ``sglang/`` package (found without importing it)."""
    spec = importlib.util.find_spec("sglang")
    assert spec is not None and spec.submodule_search_locations, "sglang is not installed"
    version = importlib.metadata.version("sglang")
    assert version == SGLANG_VERSION, f"the patch targets sglang {SGLANG_VERSION}, installed is {version}"
    return Path(list(spec.submodule_search_locations)[0]).parent


def _patched_paths(patch: Path = PATCH) -> tuple[list[str], list[str]]:
    """(existing files the patch modifies, files it creates), as ``sglang/...`` paths."""
    text = patch.read_text()
    modified, created = [], []
    for old, new in re.findall(r"^--- (\S+).*\n\+\+\+ (\S+)", text, flags=re.M):
        assert new.startswith("b/sglang/"), f"patch path not under sglang/: {new}"
        (created if old == "/dev/null" else modified).append(new[2:])
    return modified, created


def _run_patch(cwd: Path, *extra: str, patch: Path = PATCH) -> list[str]:
    result = subprocess.run(["patch", "-p1", "--batch", "--no-backup-if-mismatch", *extra, "-i", str(patch)],
                            cwd=cwd, capture_output=True, text=True)
    output = (result.stdout + result.stderr).splitlines()
    assert result.returncode == 0, "\n".join(output)
    return output


def _copy_and_patch(dst: Path, patch: Path) -> Path:
    """The files ``patch`` touches, copied from the installed sglang into ``dst`` and patched exactly."""
    src = _installed_sglang_root()
    modified, created = _patched_paths(patch)
    for rel in modified:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dst / rel)
    for rel in created:
        assert not (src / rel).exists(), f"{rel} already exists in the installed sglang"

    dry = _run_patch(dst, "--dry-run", patch=patch)
    # Exact application: GNU patch names each file and says nothing else (any "Hunk #n succeeded at ... with
    # fuzz / (offset n lines)" or "FAILED" line means the patch no longer matches 0.5.23 byte for byte).
    assert dry and all(re.fullmatch(r"checking file \S+", line) for line in dry), "\n".join(dry)
    assert sorted(line.split()[-1] for line in dry) == sorted(modified + created)

    applied = _run_patch(dst, patch=patch)
    assert all(re.fullmatch(r"patching file \S+", line) for line in applied), "\n".join(applied)
    assert not list(dst.rglob("*.rej")) and not list(dst.rglob("*.orig"))
    return dst


@pytest.fixture(scope="module")
def patched_copy(tmp_path_factory) -> Path:
    """The touched files of the installed sglang, copied and patched; returns the directory holding ``sglang/``."""
    return _copy_and_patch(tmp_path_factory.mktemp("sglang-patched"), PATCH)


@pytest.fixture(scope="module")
def request_checks_copy(tmp_path_factory) -> Path:
    """``tokenizer_manager.py`` of the installed sglang with the request-checks patch applied."""
    return _copy_and_patch(tmp_path_factory.mktemp("sglang-request-checks"), REQUEST_PATCH)


def test_patch_touches_the_expected_files():
    modified, created = _patched_paths()
    assert created == [REGISTRY]
    assert sorted(modified) == sorted([
        "sglang/srt/arg_groups/choices.py",
        "sglang/srt/arg_groups/field_order.py",
        "sglang/srt/arg_groups/fields/memory.py",
        "sglang/srt/mem_cache/kv_cache_configurator.py",
        "sglang/srt/model_executor/pool_configurator.py",
        "sglang/srt/server_args.py",
    ])
    header = PATCH.read_text().split("\ndiff --git ", 1)[0]
    assert header.startswith("Subject: [PATCH]") and "register_kv_pool" in header


def test_patched_files_compile(patched_copy):
    modified, created = _patched_paths()
    for rel in modified + created:
        py_compile.compile(str(patched_copy / rel), cfile=str(patched_copy / (rel + "c")), doraise=True)


def _load_by_path(path: Path, monkeypatch):
    name = f"_under_test_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # removed again after the test
    spec.loader.exec_module(module)
    return module


def test_registry_register_lookup_and_errors(patched_copy, monkeypatch):
    registry = _load_by_path(patched_copy / REGISTRY, monkeypatch)
    assert registry.DEFAULT_KV_POOL == "default"
    assert registry.registered_kv_pools() == []

    def build_pool(kvc, *, max_total_num_tokens):
        return ("pool", kvc, max_total_num_tokens)

    def build_sizing(kvc):
        return ("sizing", kvc)

    entry = registry.register_kv_pool("demo", build_pool=build_pool, build_pool_configurator=build_sizing)
    assert registry.get_kv_pool("demo") is entry
    assert (entry.name, entry.build_pool, entry.build_allocator, entry.build_pool_configurator) == (
        "demo", build_pool, None, build_sizing)
    assert entry.build_pool("kvc", max_total_num_tokens=64) == ("pool", "kvc", 64)
    assert registry.registered_kv_pools() == ["demo"]

    with pytest.raises(ValueError, match="'demo' is already registered"):
        registry.register_kv_pool("demo", build_pool=build_pool)
    with pytest.raises(ValueError, match="reserved"):
        registry.register_kv_pool("default", build_pool=build_pool)
    for bad_name in ("", "   "):
        with pytest.raises(ValueError, match="must be non-empty"):
            registry.register_kv_pool(bad_name, build_pool=build_pool)
    with pytest.raises(TypeError, match="build_pool must be callable"):
        registry.register_kv_pool("other", build_pool=None)
    with pytest.raises(TypeError, match="build_allocator must be callable"):
        registry.register_kv_pool("other", build_pool=build_pool, build_allocator="not callable")
    with pytest.raises(ValueError, match=r"--kv-pool 'missing' is not registered.*\['demo'\].*register_kv_pool"):
        registry.get_kv_pool("missing")
    assert registry.registered_kv_pools() == ["demo"]  # failed registrations left nothing behind


def test_registry_imports_nothing_from_sglang(patched_copy):
    """Plugins import the registry from every process; it must not pull in the memory-pool stack."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('reg', {str(patched_copy / REGISTRY)!r})\n"
        "module = importlib.util.module_from_spec(spec); sys.modules['reg'] = module\n"
        "spec.loader.exec_module(module)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sglang', 'torch')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_cli_pieces(patched_copy, monkeypatch):
    choices = _load_by_path(patched_copy / "sglang/srt/arg_groups/choices.py", monkeypatch)
    assert choices.KV_POOL_CHOICES == ["default"]
    choices.add_kv_pool_choices(["demo"])
    assert choices.KV_POOL_CHOICES == ["default", "demo"]

    order = ast.parse((patched_copy / "sglang/srt/arg_groups/field_order.py").read_text())
    [assign] = [n for n in order.body if isinstance(n, ast.Assign) and n.targets[0].id == "POSITIONAL_FIELD_ORDER"]
    fields = ast.literal_eval(assign.value)
    assert fields[-1] == "kv_pool" and fields.count("kv_pool") == 1  # appended: positional order unchanged

    memory = ast.parse((patched_copy / "sglang/srt/arg_groups/fields/memory.py").read_text())
    [struct] = [n for n in memory.body if isinstance(n, ast.ClassDef) and n.name == "Memory"]
    [field] = [n for n in struct.body if isinstance(n, ast.AnnAssign) and n.target.id == "kv_pool"]
    assert ast.literal_eval(field.value) == "default"
    assert "choices=KV_POOL_CHOICES" in ast.unparse(field.annotation)

    server_args = (patched_copy / "sglang/srt/server_args.py").read_text()
    assert re.search(r"^    KV_POOL_CHOICES,$", server_args, flags=re.M)
    assert re.search(r"^    add_kv_pool_choices,$", server_args, flags=re.M)


@pytest.mark.slow
def test_patched_server_args_parse_kv_pool(tmp_path):
    """The whole patched package (a copy) accepts ``--kv-pool`` and ``ServerArgs(kv_pool=...)``."""
    src = _installed_sglang_root()
    shutil.copytree(src / "sglang", tmp_path / "sglang", symlinks=True)  # copy2 keeps mtimes: cached .pyc stay valid
    _run_patch(tmp_path)
    code = (
        "import argparse, sglang\n"
        f"assert sglang.__file__.startswith({str(tmp_path)!r}), sglang.__file__\n"
        "from sglang.srt.server_args import ServerArgs, add_kv_pool_choices\n"
        "assert ServerArgs(model_path='m').kv_pool == 'default'\n"
        "add_kv_pool_choices(['demo'])\n"
        "parser = argparse.ArgumentParser(); ServerArgs.add_cli_args(parser)\n"
        "assert '--kv-pool' in parser.format_help()\n"
        "args = ServerArgs.from_cli_args(parser.parse_args(['--model-path', 'm', '--kv-pool', 'demo']))\n"
        "print(args.kv_pool, ServerArgs(model_path='m', kv_pool='demo').kv_pool)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path), SGLANG_PLUGINS="__no_plugins__")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split()[-2:] == ["demo", "demo"]


def test_request_checks_patch_touches_only_the_tokenizer_manager():
    assert _patched_paths(REQUEST_PATCH) == ([TOKENIZER_MANAGER], [])
    header = REQUEST_PATCH.read_text().split("\ndiff --git ", 1)[0]
    assert header.startswith("Subject: [PATCH]") and "_validate_generate_prompt" in header


def _patched_function(copy: Path, name: str) -> tuple[ast.Module, ast.FunctionDef]:
    tree = ast.parse((copy / TOKENIZER_MANAGER).read_text())
    [function] = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == name]
    return tree, function


def test_request_checks_reject_what_stops_the_scheduler(request_checks_copy):
    py_compile.compile(str(request_checks_copy / TOKENIZER_MANAGER), cfile=str(request_checks_copy / "tm.pyc"),
                       doraise=True)
    _, function = _patched_function(request_checks_copy, "_validate_generate_prompt")
    namespace = {"GenerateReqInput": object, "Optional": Optional, "List": List}
    exec(compile(ast.Module(body=[function], type_ignores=[]), TOKENIZER_MANAGER, "exec"), namespace)
    validate = namespace["_validate_generate_prompt"]
    def request(top=0, logprob=False, start=-1):
        return SimpleNamespace(top_logprobs_num=top, return_logprob=logprob, logprob_start_len=start)

    validate(request(505, True, 1), [0, 504], 505)
    validate(request(10**6), [1], 505)                                   # top_logprobs_num unused without logprobs
    validate(request(), None, 505)                                       # input_embeds
    with pytest.raises(ValueError, match=r"^The prompt has no tokens after tokenization"):
        validate(request(), [], 505)
    for ids, token, position in (([1, 505, -1], 505, 1), ([-3], -3, 0), ([1, 2, 2**40], 2**40, 2)):
        with pytest.raises(ValueError) as info:
            validate(request(), ids, 505)
        assert str(info.value) == (f"input_ids contains out-of-vocabulary token id {token} at position {position}; "
                                   "valid range is [0, 505).")
    with pytest.raises(ValueError, match=r"^top_logprobs_num=506 is larger than the vocabulary size 505\.$"):
        validate(request(506, True), [1], 505)
    with pytest.raises(ValueError, match=r"^logprob_start_len=-2 is invalid; use -1 \(output tokens only\)"):
        validate(request(0, True, -2), [1, 2, 3], 505)


def test_request_checks_run_for_every_generate_request(request_checks_copy):
    _, method = _patched_function(request_checks_copy, "_validate_one_request")
    calls = [ast.unparse(node) for node in ast.walk(method) if isinstance(node, ast.Call)]
    assert "_validate_generate_prompt(obj, input_ids, self.model_config.vocab_size)" in calls
