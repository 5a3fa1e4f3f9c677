"""Test-only CPU stand-in for ``sgl_kernel`` (SGLang's compiled kernel package).

The PyPI ``sglang-kernel`` wheels hold CUDA builds only; the CPU build is not on PyPI. With
``SGLANG_USE_CPU_ENGINE=1`` sglang imports its CPU ops from ``sgl_kernel`` at module level.
This module implements, in plain torch, the two ops a dense model on the torch_native backend
actually calls, and hands out a stub for every other name: importing it works, calling it
raises ``NotImplementedError``. No ``torch.ops.sgl_kernel`` ops are registered, so sglang's
fused-op checks fail and it uses its ``forward_native`` torch code.
"""

from __future__ import annotations

import ctypes
import sys

import torch

__version__ = "0.0.0+cpushim"


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """req_to_token[req_pool_indices[i], start[i]:end[i]] = next (end[i]-start[i]) of out_cache_loc."""
    pos = 0
    for i in range(req_pool_indices.numel()):
        start, end = int(start_offset[i]), int(end_offset[i])
        n = end - start
        req_to_token[int(req_pool_indices[i]), start:end] = out_cache_loc[pos : pos + n].to(
            req_to_token.dtype
        )
        pos += n


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor,
    strides: torch.Tensor,
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
) -> None:
    """For every KV buffer (base address, bytes per token row): copy row src_loc[j] to tgt_loc[j]."""
    tgt, src = tgt_loc.tolist(), src_loc.tolist()
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist()):
        for t, s in zip(tgt, src):
            ctypes.memmove(ptr + t * stride, ptr + s * stride, stride)


def _missing(name: str):
    def op(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel CPU shim: op {name!r} is not implemented")

    op.__name__ = name
    op.__qualname__ = name
    return op


def __getattr__(name: str):
    # Lets `from sgl_kernel import X` succeed at import time for every X.
    if name.startswith("__"):
        raise AttributeError(name)
    print(f"[sgl_kernel shim] stub requested: {name}", file=sys.stderr)
    return _missing(name)
