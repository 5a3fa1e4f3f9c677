"""GPU stand-in for ``sgl_kernel`` (SGLang's compiled kernel package): benchmark and test support only, never
shipped, and every result produced with it says so.

The real ``sglang-kernel`` 0.4.10 wheel is 373 MB (it cannot travel to the GPU machine) and its
``common_ops.abi3.so`` does not load under the GPU image's torch 2.11 (``undefined symbol
_ZN3c104cuda19CUDAErrorLogCaptureC1Ev``, measured). This module implements in plain torch exactly the ops a dense
Llama / Qwen2 model reaches under SGLang 0.5.23 on CUDA with the Triton attention backend and the pytorch sampling
backend (SGLang's own JIT kernels cover SiLU-and-mul, RoPE and the KV-cache store):

* ``rmsnorm(input, weight, eps, out=None)`` and ``fused_add_rmsnorm(input, residual, weight, eps)`` (in place:
  ``residual += input``, ``input = rmsnorm(residual)``), FlashInfer semantics with float32 arithmetic; the
  Gemma variants ``gemma_rmsnorm`` / ``gemma_fused_add_rmsnorm`` (weight ``1 + w``);
* ``silu_and_mul``, ``gelu_and_mul``, ``gelu_tanh_and_mul`` (``act(x[..., :d]) * x[..., d:]``), which SGLang
  calls only where its JIT activation kernel cannot run;
* ``weak_ref_tensor`` (SGLang's graph runners): returns the tensor itself, a strong reference where the real op
  makes a non-owning view, so captured buffers live a little longer; results are unaffected;
* ``sgl_kernel.utils.is_arch_support_pdl`` (the Triton attention backend).

Every other ``sgl_kernel`` name and submodule imports (SGLang imports many at module level) and raises
``NotImplementedError`` naming the op when called, so a path that needs a missing op fails loudly instead of
computing something else. ``sgl_kernel.scalar_type`` is not provided: SGLang then uses its own fallback types.
With ``DIFFKV_GPU_STANDIN_LOG=PATH`` each process appends one JSON line per first call of an implemented op and per
first request of a missing name. ``benchmarks/gpu/check_standin.py`` checks the ops against torch references.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys
import types

import torch
import torch.nn.functional as F

__version__ = "0.4.10+diffkv.gpu.standin"

_seen: set[str] = set()


def _log(event: str, name: str) -> None:
    """One JSON line per first ``event`` of ``name`` in this process (only with ``DIFFKV_GPU_STANDIN_LOG``)."""
    key = f"{event}:{name}"
    path = os.environ.get("DIFFKV_GPU_STANDIN_LOG")
    if key in _seen or not path:
        return
    _seen.add(key)
    with open(path, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "event": event, "name": name}) + "\n")


def _rms_scale(x32: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(mean(x^2) + eps)`` over the last dimension, float32 ``[..., 1]``."""
    return torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)


def _norm(name, x, weight, eps, out, gemma):
    """``x [..., H] * rms * w`` (or ``1 + w``) in float32, returned in ``x.dtype`` (into ``out`` if given)."""
    _log("call", name)
    x32 = x.float()
    w = weight.float() + 1.0 if gemma else weight.float()
    y = (x32 * _rms_scale(x32, eps) * w).to(x.dtype)
    return y if out is None else out.copy_(y)


def _fused_add_norm(name, x, residual, weight, eps, gemma):
    """In place: ``residual += x`` (rounded to its dtype), ``x = norm(residual)`` from the float32 sum."""
    _log("call", name)
    s = x.float() + residual.float()
    residual.copy_(s.to(residual.dtype))
    w = weight.float() + 1.0 if gemma else weight.float()
    x.copy_((s * _rms_scale(s, eps) * w).to(x.dtype))


def rmsnorm(input, weight, eps=1e-6, out=None, enable_pdl=None):
    return _norm("rmsnorm", input, weight, eps, out, gemma=False)


def gemma_rmsnorm(input, weight, eps=1e-6, out=None, enable_pdl=None):
    return _norm("gemma_rmsnorm", input, weight, eps, out, gemma=True)


def fused_add_rmsnorm(input, residual, weight, eps=1e-6, enable_pdl=None):
    _fused_add_norm("fused_add_rmsnorm", input, residual, weight, eps, gemma=False)


def gemma_fused_add_rmsnorm(input, residual, weight, eps=1e-6, enable_pdl=None):
    _fused_add_norm("gemma_fused_add_rmsnorm", input, residual, weight, eps, gemma=True)


def _gated(name, act, x, out):
    """``act(x[..., :d]) * x[..., d:]`` for ``x [..., 2d]``, into ``out`` if given."""
    _log("call", name)
    d = x.shape[-1] // 2
    y = act(x[..., :d]) * x[..., d:]
    return y if out is None else out.copy_(y)


def silu_and_mul(input, out=None, enable_pdl=None):
    return _gated("silu_and_mul", F.silu, input, out)


def gelu_and_mul(input, out=None, enable_pdl=None):
    return _gated("gelu_and_mul", F.gelu, input, out)


def gelu_tanh_and_mul(input, out=None, enable_pdl=None):
    return _gated("gelu_tanh_and_mul", lambda t: F.gelu(t, approximate="tanh"), input, out)


def weak_ref_tensor(tensor):
    _log("call", "weak_ref_tensor")
    return tensor


def _missing(qualname: str):
    def op(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel GPU stand-in (benchmarks/gpu/standin): {qualname!r} is not implemented")

    op.__name__ = op.__qualname__ = qualname.rsplit(".", 1)[-1]
    return op


def _module_getattr(module: str):
    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        _log("missing", f"{module}.{name}")
        return _missing(f"{module}.{name}")

    return __getattr__


__getattr__ = _module_getattr("sgl_kernel")


class _MissingSubmodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``sgl_kernel.<sub>`` (other than the files here and ``scalar_type``) imports as a module of missing ops."""

    OWN = {"sgl_kernel.utils"}
    ABSENT = {"sgl_kernel.scalar_type"}     # SGLang catches its ImportError and uses its own fallback

    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("sgl_kernel.") and fullname not in self.OWN | self.ABSENT:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _module_getattr(spec.name)
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _MissingSubmodules())
