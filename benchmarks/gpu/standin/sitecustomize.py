"""Measurement-only import hooks for the GPU runs (benchmarks/gpu/run.sh puts this folder on ``PYTHONPATH``, so
every SGLang process loads it). Nothing here is shipped or changes the project's files; each hook is off unless
its environment variable is set (run.sh sets both):

* ``DIFFKV_GPU_NO_SM100_DUAL_GEMM=1``: SGLang's ``LlamaMLP`` imports ``sglang.kernels.ops.gemm.cutedsl_dual_gemm`` on
  every CUDA device to ask ``can_use_dual_gemm``; that module imports ``cutlass`` (nvidia-cutlass-dsl, not carried)
  at module level. It is replaced by a module with the same three names whose ``can_use_dual_gemm`` returns False,
  what the real one returns on any GPU but SM100 (``is_sm100_supported()`` is False on an H200), so the MLP
  takes its usual gate_up GEMM + SiLU path either way.
* ``DIFFKV_GPU_LOG_S=N``: the DiffKV pool's stats line every N seconds instead of 30
  (``diffkv_sglang.integration.metrics.LOG_INTERVAL_S``), so short benchmark runs log compression and tier shares.
"""

import importlib.abc
import importlib.machinery
import os
import sys
from enum import IntEnum

DUAL_GEMM = "sglang.kernels.ops.gemm.cutedsl_dual_gemm"
METRICS = "diffkv_sglang.integration.metrics"


class DualGemmQuantMode(IntEnum):
    """The real module's enum (same members and properties)."""

    STATIC_PER_TENSOR = 0
    STATIC_PER_TOKEN = 1
    DYNAMIC_PER_TENSOR = 2
    DYNAMIC_PER_TOKEN = 3
    UNQUANT = 4

    @property
    def is_quantized(self) -> bool:
        return self is not self.UNQUANT

    @property
    def is_dynamic(self) -> bool:
        return self in (self.DYNAMIC_PER_TENSOR, self.DYNAMIC_PER_TOKEN)

    @property
    def is_per_token(self) -> bool:
        return self in (self.STATIC_PER_TOKEN, self.DYNAMIC_PER_TOKEN)


def _fill_dual_gemm(module) -> None:
    module.MAX_DUAL_GEMM_DECODE_TOKENS = 16
    module.DualGemmQuantMode = DualGemmQuantMode
    module.can_use_dual_gemm = lambda *args, **kwargs: False


def _patch_metrics(module) -> None:
    module.LOG_INTERVAL_S = float(os.environ["DIFFKV_GPU_LOG_S"])


class _Hooks(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Builds the replaced module itself; runs a patch right after the real module of a patched name executes."""

    def __init__(self, replace: dict, patch: dict):
        self.replace, self.patch = replace, patch

    def find_spec(self, name, path, target=None):
        if name in self.replace:
            return importlib.machinery.ModuleSpec(name, self)
        if name not in self.patch:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None:
                run, patch = spec.loader.exec_module, self.patch[name]
                spec.loader.exec_module = lambda module: (run(module), patch(module))
                return spec
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        self.replace[module.__name__](module)


_replace = {DUAL_GEMM: _fill_dual_gemm} if os.environ.get("DIFFKV_GPU_NO_SM100_DUAL_GEMM") == "1" else {}
_patch = {METRICS: _patch_metrics} if os.environ.get("DIFFKV_GPU_LOG_S") else {}
if _replace or _patch:
    sys.meta_path.insert(0, _Hooks(_replace, _patch))
