"""CUDA split kernel for decode attention (issue 12), run in place of the Triton ``_decode_split_kernel`` by
:meth:`DecodePlan.run` for the layers whose format it reads; :meth:`DecodePlan.merge` (the Triton merge kernel)
finishes, staged-token importance included.

The kernel (``cuda/sealed_decode.cu``; layouts, fragment mappings and arithmetic are described at its top) copies
whole sealed blocks into a shared-memory ring with 1-D bulk copies, computes with ``mma.sync`` m16n8k16 (block rows
as M, the query heads of a KV head as N = 8), reads staged blocks from global memory and writes the plan's split
workspace and staged-logit scratch exactly as the Triton split kernel does. It reads every page a serving batch
meets with the default tiers: sealed blocks with tier-0 (k8v4) and tier-1 (k4v2) rows in any proportion (either
may be empty; pruned tokens are absent rows), staged blocks, empty pages, partly valid last pages.
:func:`check_format` refuses (ValueError naming what) the rest, from the layer format on the host:

* tiers other than ``(k8v4,)`` or ``(k8v4, k4v2)`` (2-bit keys, quantization groups, more than 2 tiers);
* Hadamard rotation; ``head_dim`` other than 64 or 128; more than 8 query heads per KV head;
* a model dtype (staged blocks, query) other than bfloat16 or float16 (:func:`check_dtype`).

Build: compiled on first use on CUDA (never at import, never on CPU) with ``torch.utils.cpp_extension.load``
(nvcc and ninja) for sm_90a plus compute_90 PTX, into ``$DIFFKV_CUDA_CACHE``, else
``$XDG_CACHE_HOME/diffkv_sglang/cuda`` (``~/.cache/...``), one folder per source hash and torch / CUDA version; a
log line says when it builds. :func:`load_extension` raises RuntimeError without CUDA or ninja;
:func:`split_for` (what :class:`DecodePlan` calls) logs one warning instead and the plan runs Triton.

Example (what ``DIFFKV_KERNELS=cuda`` does through :class:`DecodePlan`)::

    plan = DecodePlan(store.view, num_q_heads=32, max_batch=64, max_pages=512, split_kernel="cuda")
    plan.plan(page_table, seq_lens)
    out = plan.run(q, layer)               # q [B, Hq, D] bf16 -> [B, Hq, D]: CUDA split + Triton merge
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import time
from pathlib import Path

import torch

from diffkv_sglang.config import TierSpec
from diffkv_sglang.format import (BLOCK_ALIGN, INDEX, KEY_META, KEYS, META_BYTES, VALUE_META, VALUES, BlockFormat,
                                  BlockView, PageState, StagedBlockFormat)
from diffkv_sglang.kernels.block_read import sealed_format_constants

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).with_name("cuda")
SOURCES = (SOURCE_DIR / "sealed_decode.cu", SOURCE_DIR / "sealed_decode_binding.cpp")
CUDA_FLAGS = ("-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_90,code=compute_90", "-O3",
              "-lineinfo")
CACHE_ENV = "DIFFKV_CUDA_CACHE"

SUPPORTED_TIERS = (TierSpec(8, 4), TierSpec(4, 2))   # tier 0, tier 1 as the kernel decodes them
MODEL_DTYPES = (torch.bfloat16, torch.float16)
HEAD_DIMS = (64, 128)
MAX_GROUP = 8                   # the products' N: query heads per KV head
WARPS = 4                       # warps per CTA (sealed_decode.cu kWarps)
MAX_STAGES = 8                  # ring slots per warp (sealed_decode.cu kMaxStages)
MIN_STAGES = 2
CTAS_PER_SM = 2                 # the shared-memory budget keeps two CTAs resident per multiprocessor
DEFAULT_SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_CTA = 1024


def _source_hash() -> str:
    digest = hashlib.sha256()
    for path in (*SOURCES, SOURCE_DIR / "sealed_decode.h"):
        digest.update(path.read_bytes())
    digest.update(" ".join(CUDA_FLAGS).encode())
    return digest.hexdigest()[:12]


def build_directory() -> Path:
    """Where the extension is built and cached: ``$DIFFKV_CUDA_CACHE`` or the user's cache, per source hash and
    torch / CUDA version."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "diffkv_sglang", "cuda")
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}-{_source_hash()}".replace("+", "_")
    return Path(root) / tag


@functools.cache
def load_extension():
    """The compiled extension (``split``, ``smem_bytes``, ``kernel_info``), built on the first call (about a minute)
    and cached on disk. Raises RuntimeError without CUDA or ninja."""
    from torch.utils import cpp_extension

    if not torch.cuda.is_available():
        raise RuntimeError("the CUDA decode kernel needs a CUDA device")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("building the CUDA decode kernel needs ninja (torch.utils.cpp_extension.load); install "
                           "it (pip install ninja) or use the Triton kernels")
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    name = f"diffkv_sealed_decode_{_source_hash()}"
    built = any(directory.glob(f"{name}*.so"))
    if not built:
        logger.warning("diffkv_sglang: building the CUDA decode kernel in %s (first use; about a minute)", directory)
    start = time.perf_counter()
    module = cpp_extension.load(name=name, sources=[str(p) for p in SOURCES], extra_cuda_cflags=list(CUDA_FLAGS),
                                extra_cflags=["-O3"], build_directory=str(directory), verbose=False)
    if not built:
        logger.warning("diffkv_sglang: CUDA decode kernel built in %.0f s", time.perf_counter() - start)
    return module


def split_for(kv: BlockView, group: int) -> CudaDecodeSplit | None:
    """The CUDA split kernel for a store's blocks (``group`` query heads per KV head), built on the first call; or
    None, after one warning, when it cannot be built (no nvcc / ninja) or cannot read the store's model dtype.
    Layer formats it refuses are warned about once each (those layers run the Triton split kernel)."""
    try:
        split = CudaDecodeSplit(kv, group, load_extension())
    except Exception as exc:          # noqa: BLE001  (any build failure: the plan runs Triton)
        _warn_unavailable(f"{type(exc).__name__}: {exc}")
        return None
    for reason in split.refused.values():
        _warn_unavailable(reason)
    return split


@functools.cache
def _warn_unavailable(reason: str) -> None:
    logger.warning("diffkv_sglang: the CUDA decode kernel is not used (%s); the Triton split kernel runs instead",
                   reason)


def check_format(fmt: BlockFormat, group: int) -> None:
    """Raise ValueError naming what the kernel does not read in this layer format (``group``: query heads per KV
    head)."""
    tiers = tuple(layout.spec for layout in fmt.tiers)
    if tiers != SUPPORTED_TIERS[:len(tiers)]:
        raise ValueError(f"CUDA decode kernel: tiers {','.join(t.name for t in tiers)}; it reads "
                         f"{SUPPORTED_TIERS[0].name} or {','.join(t.name for t in SUPPORTED_TIERS)} (one group, "
                         f"no 2-bit keys, at most {len(SUPPORTED_TIERS)} tiers)")
    if fmt.key_rotation != "none" or fmt.value_rotation != "none":
        raise ValueError(f"CUDA decode kernel: Hadamard rotation (keys {fmt.key_rotation}, values "
                         f"{fmt.value_rotation}) is not supported")
    if fmt.head_dim not in HEAD_DIMS:
        raise ValueError(f"CUDA decode kernel: head_dim {fmt.head_dim} is not supported (only {HEAD_DIMS})")
    if not 1 <= group <= MAX_GROUP:
        raise ValueError(f"CUDA decode kernel: {group} query heads per KV head; it supports 1 to {MAX_GROUP}")
    dim = fmt.head_dim
    for t, spec in enumerate(tiers):
        expected = {KEYS: dim * spec.key_bits // 8, VALUES: dim * spec.value_bits // 8, KEY_META: META_BYTES,
                    VALUE_META: META_BYTES, INDEX: 1}
        if any(fmt.row_bytes(kind, t) != nbytes for kind, nbytes in expected.items()):
            raise ValueError(f"CUDA decode kernel: {fmt} rows are not the packed rows the kernel reads")


def check_dtype(dtype: torch.dtype) -> None:
    """Raise ValueError unless ``dtype`` (the model's: staged blocks and the query) is bfloat16 or float16."""
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"CUDA decode kernel: model dtype {dtype}; it reads bfloat16 or float16 staged blocks and "
                         f"queries")


def block_layout(fmt: BlockFormat, staged: StagedBlockFormat) -> tuple[int, ...]:
    """A layer's blocks as the binding's ``layout`` numbers (sealed_decode_binding.cpp): per section kind (KEYS ..
    INDEX) and tier 0, 1, ``(c0, c1, const)`` with ``start = n0 * c0 + n1 * c1 + const`` (the coefficients of
    :func:`~diffkv_sglang.kernels.block_read.sealed_format_constants`, which the Triton kernels take too); the
    meta scales' two coefficients; bytes per row of tier 0, 1; the bytes of an empty block; the block alignment;
    the byte offset of a staged block's values; the STAGED and SEALED page-state codes. Raises ValueError if a code
    section could start off a 16-byte boundary or meta off 4 bytes."""
    consts = sealed_format_constants(fmt)
    tiers = len(SUPPORTED_TIERS)
    names = ("KEY_SEC", "VALUE_SEC", "KEY_META_SEC", "VALUE_META_SEC", "INDEX_SEC")
    aligns = (16, 16, 4, 4, 1)
    lines = []
    for name, align in zip(names, aligns):
        for t in range(tiers):
            line = (*consts[name][9 * t:9 * t + tiers], consts[name][9 * t + 8])
            if any(consts[name][9 * t + 4:9 * t + 8]):
                raise ValueError(f"CUDA decode kernel: {fmt} has per-block section bytes (per-channel keys)")
            if any(n % align for n in line):
                raise ValueError(f"CUDA decode kernel: {fmt} section {name} {line} is not aligned for its loads")
            lines += line
    meta_scales = consts["META_SCALE_SEC"][:tiers]
    if any(n % 4 for n in meta_scales):
        raise ValueError(f"CUDA decode kernel: {fmt} meta scales {meta_scales} are not 4-byte aligned")
    per_row = [fmt.tiers[t].bytes_per_token if t < fmt.num_tiers else 0 for t in range(tiers)]
    empty = int(fmt.data_nbytes(torch.zeros(fmt.num_tiers, dtype=torch.int64)))
    return (*lines, *meta_scales, *per_row, empty, BLOCK_ALIGN, staged.values_start, int(PageState.STAGED),
            int(PageState.SEALED))


def ring_slot_bytes(fmt: BlockFormat) -> int:
    """Bytes of one ring slot: the largest sealed block of ``fmt`` (every token in the most expensive tier; the
    kernel clamps its reads to a tier's rows, so nothing past a block is read)."""
    return fmt.max_block_nbytes


def ring_stages(slot_bytes: int, smem_per_sm: int) -> int:
    """Ring slots per warp such that CTAS_PER_SM CTAs fit in ``smem_per_sm`` bytes of shared memory (at most
    MAX_STAGES). Raises ValueError below MIN_STAGES (pages too large)."""
    budget = smem_per_sm // CTAS_PER_SM - SMEM_RESERVED_PER_CTA - WARPS * MAX_STAGES * 8
    stages = min(MAX_STAGES, budget // (WARPS * slot_bytes))
    if stages < MIN_STAGES:
        raise ValueError(f"CUDA decode kernel: blocks of {slot_bytes} bytes leave fewer than {MIN_STAGES} ring "
                         f"slots per warp in {smem_per_sm} bytes of shared memory; use a smaller page size")
    return stages


class CudaDecodeSplit:
    """The CUDA split kernel over one store's blocks, for the layers whose format it reads.

    Args:
        kv: the store's blocks (on CUDA; bfloat16 or float16 model).
        group: query heads per KV head.
        module: the built extension (:func:`load_extension`).

    Raises ValueError for a store off CUDA or another model dtype. Layers whose format :func:`check_format`
    refuses are reported by :meth:`supports` (False), with the reason in ``refused[format]``.
    """

    def __init__(self, kv: BlockView, group: int, module):
        if kv.device.type != "cuda":
            raise ValueError(f"CUDA decode kernel: the store is on {kv.device}; it needs a CUDA store")
        check_dtype(kv.dtype)
        self.kv, self.group, self.module = kv, group, module
        props = torch.cuda.get_device_properties(kv.device)
        smem_per_sm = getattr(props, "shared_memory_per_multiprocessor", 0) or DEFAULT_SMEM_PER_SM
        self._launch = {}                # layer format -> (layout, ring stages, slot bytes)
        self.refused = {}                # layer format -> why the kernel does not read it
        for fmt in dict.fromkeys(kv.formats.sealed):
            try:
                check_format(fmt, group)
                slot = ring_slot_bytes(fmt)
                self._launch[fmt] = (list(block_layout(fmt, kv.formats.staged)), ring_stages(slot, smem_per_sm), slot)
            except ValueError as exc:
                self.refused[fmt] = str(exc)

    def supports(self, layer: int, q: torch.Tensor) -> bool:
        """Whether the kernel reads ``layer`` for this query (a host check of the format and dtypes, no sync)."""
        return self.kv.formats[layer] in self._launch and q.dtype == self.kv.dtype

    def split(self, plan, q: torch.Tensor, layer: int, sm_scale: float) -> None:
        """Launch the split kernel for ``plan``'s batch (a :class:`DecodePlan`: its page table, staged ranks,
        lengths, ``num_splits`` and workspaces) on ``q`` ``[B, Hq, D]``; ``plan.merge`` finishes. Launches only."""
        kv = self.kv
        layout, stages, slot = self._launch[kv.formats[layer]]
        self.module.split(
            q, kv.data, kv.block_offset, kv.page_state, kv.tier_counts, plan.page_table, plan.staged_rank,
            plan.seq_lens, plan._part_m, plan._part_l, plan._part_acc, plan._logits, plan.staged_cap,
            kv.num_kv_heads, layer, kv.num_layers, kv.page_size, plan.num_splits, plan.config.min_pages_per_split,
            sm_scale * math.log2(math.e), layout, stages, slot, torch.cuda.current_stream(q.device).cuda_stream)

    def kernel_info(self, layer: int) -> dict:
        """Registers and spill bytes per thread, resident CTAs per multiprocessor, dynamic shared memory, ring
        stages and slot bytes of the kernel for ``layer``."""
        _, stages, slot = self._launch[self.kv.formats[layer]]
        smem = self.module.smem_bytes(self.kv.head_dim, stages, slot)
        info = dict(self.module.kernel_info(self.kv.head_dim, self.kv.dtype == torch.bfloat16, smem))
        return {**info, "smem_bytes": smem, "stages": stages, "slot_bytes": slot}
