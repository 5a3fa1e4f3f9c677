"""CUDA split kernel for decode over sealed pages (issue 12, item 1: the prototype), run in place of the Triton
``_decode_split_kernel``; :meth:`DecodePlan.merge` (the Triton merge kernel) finishes.

The kernel (``cuda/sealed_decode.cu``; layouts, fragment mappings and arithmetic are described at its top) copies
whole blocks into a shared-memory ring with 1-D bulk copies, computes with ``mma.sync`` m16n8k16 (block rows as M,
the query heads of a KV head as N = 8) and writes the plan's split workspace. It handles one case only, and
:class:`CudaSealedDecode` refuses every other with a ValueError naming what is unsupported:

* every planned page of the layer is SEALED and all its kept tokens are in tier 0 (pruned tokens are fine);
* tier 0 is ``k8v4`` with one quantization group for keys and for values, no Hadamard rotation;
* ``head_dim`` 64 or 128, 1 to 8 query heads per KV head, a bfloat16 or float16 query.

Build: compiled on first use on CUDA (never at import, never on CPU) with ``torch.utils.cpp_extension.load``
(nvcc and ninja) for sm_90a plus compute_90 PTX, into ``$DIFFKV_CUDA_CACHE``, else
``$XDG_CACHE_HOME/diffkv_sglang/cuda`` (``~/.cache/...``), one folder per source hash and torch / CUDA version; a
log line says when it builds. Without ninja, :func:`load_extension` raises a RuntimeError that says so.

Example::

    plan = DecodePlan(store.view, num_q_heads=32, max_batch=64, max_pages=512)
    sealed = CudaSealedDecode(plan)
    plan.plan(page_table, seq_lens)
    sealed.check_pages(layer)              # host sync: every planned page sealed, all tokens in the high tier
    out = sealed.run(q, layer)             # q [B, Hq, D] bf16 -> [B, Hq, D]; launches only (CUDA-graph capturable)
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
                                  PageState)
from diffkv_sglang.kernels.decode_attention import MAX_SPLITS, DecodePlan

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).with_name("cuda")
SOURCES = (SOURCE_DIR / "sealed_decode.cu", SOURCE_DIR / "sealed_decode_binding.cpp")
CUDA_FLAGS = ("-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_90,code=compute_90", "-O3",
              "-lineinfo")
CACHE_ENV = "DIFFKV_CUDA_CACHE"

SUPPORTED_TIER = TierSpec(8, 4)
HEAD_DIMS = (64, 128)
MAX_GROUP = 8                   # the products' N: query heads per KV head
WARPS = 4                       # warps per CTA (sealed_decode.cu kWarps)
MAX_STAGES = 8                  # ring slots per warp (sealed_decode.cu kMaxStages)
MIN_STAGES = 2
TILE_ROWS = 16
CTAS_PER_SM = 2                 # the shared-memory budget keeps two CTAs resident per multiprocessor
DEFAULT_SPLIT_TARGET = 4        # split-K aims at this many CTAs per multiprocessor (about two waves)
MIN_PAGES_PER_WARP = 2          # splits never leave a warp fewer pages than this (per request of max_pages)
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


def check_format(fmt: BlockFormat, group: int) -> None:
    """Raise ValueError naming what the kernel does not read in this layer format (``group``: query heads per KV
    head)."""
    spec = fmt.tiers[0].spec
    if spec != SUPPORTED_TIER:
        raise ValueError(f"CUDA decode prototype: tier 0 is {spec.name}; it reads {SUPPORTED_TIER.name} (one "
                         f"group) only")
    if fmt.key_rotation != "none" or fmt.value_rotation != "none":
        raise ValueError(f"CUDA decode prototype: Hadamard rotation (keys {fmt.key_rotation}, values "
                         f"{fmt.value_rotation}) is not supported")
    if fmt.head_dim not in HEAD_DIMS:
        raise ValueError(f"CUDA decode prototype: head_dim {fmt.head_dim} is not supported (only {HEAD_DIMS})")
    if not 1 <= group <= MAX_GROUP:
        raise ValueError(f"CUDA decode prototype: {group} query heads per KV head; it supports 1 to {MAX_GROUP}")
    dim = fmt.head_dim
    expected = {KEYS: dim, VALUES: dim // 2, KEY_META: META_BYTES, VALUE_META: META_BYTES, INDEX: 1}
    if any(fmt.row_bytes(kind, 0) != nbytes for kind, nbytes in expected.items()):
        raise ValueError(f"CUDA decode prototype: {fmt} rows are not the packed k8v4 rows the kernel reads")


def block_layout(fmt: BlockFormat) -> tuple[int, ...]:
    """A tier-0-only block of ``fmt`` as the binding's 15 ``layout`` numbers: ``(per_row, start)`` of the key,
    value, key meta, value meta, meta scale and index sections (start = per_row * rows + start, from
    :meth:`BlockFormat.section_coefficients`), then bytes per row, the bytes of an empty block and the block
    alignment. Raises ValueError if a code section could start off a 16-byte boundary or meta off 4 bytes."""
    coeffs, const = fmt.section_coefficients()
    high_only = torch.zeros(fmt.num_tiers, dtype=torch.int64)
    high_only[0] = 1
    lines = [(coeffs[kind][0][0], const[kind]) for kind in (KEYS, VALUES, KEY_META, VALUE_META)]
    lines.append((int(fmt.meta_scale_start(high_only)), 0))
    lines.append((coeffs[INDEX][0][0], const[INDEX]))
    aligns = (16, 16, 4, 4, 4, 1)
    if any(per_row % align or start % align for (per_row, start), align in zip(lines, aligns)):
        raise ValueError(f"CUDA decode prototype: {fmt} sections {lines} are not aligned for the kernel's loads")
    empty = int(fmt.data_nbytes(torch.zeros(fmt.num_tiers, dtype=torch.int64)))
    return (*(n for line in lines for n in line), fmt.bytes_per_token(0), empty, BLOCK_ALIGN)


def ring_slot_bytes(fmt: BlockFormat) -> int:
    """Bytes of one ring slot: a tier-0 block of the page size rounded up to whole 16-row tiles (the kernel reads
    every row of a tile, so rows past a block's own stay inside its slot)."""
    counts = torch.zeros(fmt.num_tiers, dtype=torch.int64)
    counts[0] = math.ceil(fmt.page_size / TILE_ROWS) * TILE_ROWS
    return int(fmt.block_nbytes(counts))


def ring_stages(slot_bytes: int, smem_per_sm: int) -> int:
    """Ring slots per warp such that CTAS_PER_SM CTAs fit in ``smem_per_sm`` bytes of shared memory (at most
    MAX_STAGES). Raises ValueError below MIN_STAGES (pages too large)."""
    budget = smem_per_sm // CTAS_PER_SM - SMEM_RESERVED_PER_CTA - WARPS * MAX_STAGES * 8
    stages = min(MAX_STAGES, budget // (WARPS * slot_bytes))
    if stages < MIN_STAGES:
        raise ValueError(f"CUDA decode prototype: blocks of {slot_bytes} bytes leave fewer than {MIN_STAGES} ring "
                         f"slots per warp in {smem_per_sm} bytes of shared memory; use a smaller page size")
    return stages


class CudaSealedDecode:
    """The CUDA split kernel over a :class:`DecodePlan`'s sealed all-high pages; the plan's merge finishes.

    Args:
        plan: the Triton decode plan: its page table, lengths and split workspace are used; ``plan.plan`` fills them.
        ctas_per_sm: split-K aims at this many CTAs per multiprocessor (two are resident at a time).
        num_splits: a fixed split count instead (capped by the plan's workspace).

    See the module docstring for the example and the supported case.
    """

    def __init__(self, plan: DecodePlan, ctas_per_sm: int = DEFAULT_SPLIT_TARGET, num_splits: int | None = None):
        kv = plan.kv
        if kv.device.type != "cuda":
            raise ValueError(f"CUDA decode prototype: the store is on {kv.device}; it needs a CUDA store")
        for layer in range(kv.num_layers):
            check_format(kv.formats[layer], plan.group)
        self.plan, self.ctas_per_sm, self.fixed_splits = plan, ctas_per_sm, num_splits
        props = torch.cuda.get_device_properties(kv.device)
        self._sms = props.multi_processor_count
        smem_per_sm = getattr(props, "shared_memory_per_multiprocessor", 0) or DEFAULT_SMEM_PER_SM
        self._launch = {}                # layer format -> (layout, ring stages, slot bytes)
        for fmt in kv.formats.sealed:
            slot = ring_slot_bytes(fmt)
            self._launch[fmt] = (block_layout(fmt), ring_stages(slot, smem_per_sm), slot)

    def num_splits(self, batch: int) -> int:
        """Split count for ``batch`` requests: about ``ctas_per_sm`` CTAs per multiprocessor, at least
        MIN_PAGES_PER_WARP pages per warp of a ``max_pages`` request, within the plan's workspace rows."""
        plan = self.plan
        pairs = batch * plan.kv.num_kv_heads
        capacity = plan._part_m.shape[0] // pairs
        if self.fixed_splits is not None:
            return max(1, min(self.fixed_splits, capacity))
        wanted = math.ceil(self.ctas_per_sm * self._sms / pairs)
        most = math.ceil(plan.max_pages / (WARPS * MIN_PAGES_PER_WARP))
        return max(1, min(wanted, most, capacity, MAX_SPLITS))

    def check_pages(self, layer: int) -> None:
        """Raise ValueError unless every page of the planned batch is sealed with all its kept tokens of ``layer``
        in tier 0 (one host sync)."""
        plan, kv = self.plan, self.plan.kv
        batch, page = plan.batch, kv.page_size
        pages_needed = (plan.seq_lens[:batch].long() + page - 1) // page
        in_request = torch.arange(plan.max_pages, device=kv.device)[None, :] < pages_needed[:, None]
        pages = plan.page_table[:batch][in_request].long()
        not_sealed = (kv.page_state[pages] != PageState.SEALED).sum()
        lower_tiers = kv.tier_counts[pages, layer, :, 1:].sum()
        not_sealed, lower_tiers = torch.stack([not_sealed, lower_tiers.to(not_sealed.dtype)]).tolist()
        if not_sealed:
            raise ValueError(f"CUDA decode prototype: {not_sealed} planned pages are staged or empty; it reads "
                             f"sealed pages only")
        if lower_tiers:
            raise ValueError(f"CUDA decode prototype: {lower_tiers} tokens of layer {layer} are in tiers other than "
                             f"the high tier; it reads all-high pages only")

    def run(self, q: torch.Tensor, layer: int, out: torch.Tensor | None = None, sm_scale: float | None = None,
            check: bool = True) -> torch.Tensor:
        """Attention of ``q`` ``[B, Hq, D]`` (bfloat16 or float16) over the planned batch in ``layer``; returns
        ``out`` ``[B, Hq, D]`` (allocated only when not given). ``check``: :meth:`check_pages` first (a host sync;
        pass False inside CUDA-graph capture after checking once)."""
        plan, kv = self.plan, self.plan.kv
        out = plan.check_run(q, out)
        if q.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"CUDA decode prototype: q is {q.dtype}; it takes bfloat16 or float16")
        layout, stages, slot = self._launch[kv.formats[layer]]
        if check:
            self.check_pages(layer)
        splits = self.num_splits(plan.batch)
        scale = plan.sm_scale if sm_scale is None else sm_scale
        load_extension().split(
            q, kv.data, kv.block_offset, kv.tier_counts, plan.page_table, plan.seq_lens,
            plan._part_m, plan._part_l, plan._part_acc, kv.num_kv_heads, layer, kv.num_layers, kv.page_size,
            splits, plan.config.min_pages_per_split, scale * math.log2(math.e), list(layout), stages, slot,
            torch.cuda.current_stream(q.device).cuda_stream)
        return plan.merge(out, layer, splits)

    def kernel_info(self, layer: int, q_dtype: torch.dtype = torch.bfloat16) -> dict:
        """Registers and spill bytes per thread, resident CTAs per multiprocessor, dynamic shared memory, ring
        stages and slot bytes of the kernel for ``layer`` (builds the extension)."""
        _, stages, slot = self._launch[self.plan.kv.formats[layer]]
        module = load_extension()
        smem = module.smem_bytes(self.plan.kv.head_dim, stages, slot)
        info = dict(module.kernel_info(self.plan.kv.head_dim, q_dtype == torch.bfloat16, smem))
        return {**info, "smem_bytes": smem, "stages": stages, "slot_bytes": slot}
