"""Which implementation runs the store's data paths: the Triton kernels or the torch reference.

One switch, the environment variable ``DIFFKV_KERNELS``, read here and nowhere else:

=========  =========================================================================================
``auto``   (default) Triton kernels for a store on CUDA, the torch reference on any other device
``torch``  the torch reference everywhere (debugging, comparisons)
``triton`` the Triton kernels everywhere; off CUDA they run in Triton's interpreter (``TRITON_INTERPRET=1``,
           set here when no kernel module is imported yet), which is how the CPU tests exercise them
``cuda``   (opt-in) as ``auto``, and decode attention on CUDA runs the CUDA split kernel
           (:mod:`diffkv_sglang.kernels.cuda_decode`, compiled on first use) for every layer whose format it
           reads, the Triton split kernel for the others (or for all, with one warning, if it cannot be built);
           the Triton merge kernel finishes either way
=========  =========================================================================================

``auto`` stays on the Triton decode kernel on CUDA until a GPU run has verified the CUDA kernel on every page kind
(mixed tiers, staged pages; it was verified on all-high sealed pages only).

:class:`~diffkv_sglang.store.CompressedKVStore` decides once, when it is built (``store.kernels``), and its
arena (compaction moves) and :class:`~diffkv_sglang.attention.DecodeAttentionWrapper` follow that decision; the
seal step, the compaction moves, decode attention and extend attention (its dense read and attention kernels)
switch together.

The kernels tile ``head_dim`` with ``tl.arange``, so they need a power of two: with ``auto`` another
``head_dim`` falls back to the reference (with a warning), with ``triton`` it is an error.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

__all__ = ["CUDA_GRAPH_ENV", "KERNELS_ENV", "MODES", "cuda_graph_enabled", "decode_split_kernel", "kernel_mode",
           "use_kernels"]

KERNELS_ENV = "DIFFKV_KERNELS"
CUDA_GRAPH_ENV = "DIFFKV_CUDA_GRAPH"
MODES = ("auto", "torch", "triton", "cuda")
_KERNEL_MODULES = tuple(f"diffkv_sglang.kernels.{name}" for name in ("seal", "compaction", "decode_attention"))

logger = logging.getLogger(__name__)


def kernel_mode() -> str:
    """The value of ``DIFFKV_KERNELS`` (default ``auto``); raises ValueError for anything else."""
    mode = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{KERNELS_ENV}={mode!r}; allowed: {', '.join(MODES)}")
    return mode


def use_kernels(device: torch.device | str, head_dim: int | None = None) -> bool:
    """Whether data on ``device`` (with this ``head_dim``, when given) is processed by the kernels.

    Off CUDA, a True answer also turns on Triton's interpreter for the kernel modules (they are imported lazily,
    after this call). Raises ValueError for an unknown mode or, with ``triton``, an unsupported ``head_dim``;
    RuntimeError if the interpreter is needed but the kernel modules were already compiled for a GPU.
    """
    mode = kernel_mode()
    device = torch.device(device)
    if mode == "torch" or (mode in ("auto", "cuda") and device.type != "cuda"):
        return False
    if head_dim is not None and head_dim & (head_dim - 1):
        reason = f"the Triton kernels need a power-of-two head_dim, got {head_dim}"
        if mode == "triton":
            raise ValueError(f"{KERNELS_ENV}=triton: {reason}")
        logger.warning("DiffKV runs the torch reference: %s", reason)
        return False
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        loaded = [name for name in _KERNEL_MODULES if name in sys.modules]
        if loaded:
            raise RuntimeError(f"{KERNELS_ENV}=triton on {device}: the kernels need Triton's interpreter, but "
                               f"{', '.join(loaded)} was imported without it (set TRITON_INTERPRET=1 first)")
        os.environ["TRITON_INTERPRET"] = "1"
    return True


def decode_split_kernel() -> str:
    """The split kernel decode plans on a CUDA store launch: ``cuda`` with ``DIFFKV_KERNELS=cuda``, else
    ``triton`` (:class:`~diffkv_sglang.kernels.decode_attention.DecodePlan`'s ``split_kernel``)."""
    return "cuda" if kernel_mode() == "cuda" else "triton"


def cuda_graph_enabled() -> bool:
    """Whether ``--kv-pool diffkv`` lets SGLang capture decode CUDA graphs on a CUDA device: ``DIFFKV_CUDA_GRAPH``
    ``1`` (the default) or ``0`` (an off switch; SGLang's own ``--disable-cuda-graph`` works too).

    On by default since real SGLang 0.5.23 served with them on an H100 and decoded bit-identically to an eager
    server at every unpadded batch size, pages sealed between replays (``tests/test_gpu_serving.py``,
    docs/serving-gpu.md). Raises ValueError for a value other than 0 or 1."""
    value = os.environ.get(CUDA_GRAPH_ENV, "1").strip() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"{CUDA_GRAPH_ENV}={value!r}; allowed: 0 (SGLang's decode CUDA graphs off), 1 (on)")
    return value == "1"
