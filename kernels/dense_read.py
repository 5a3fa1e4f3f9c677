"""Dense read of pages: sealed blocks dequantized, staged blocks copied, into ``[n, H, P, D]`` keys and values.

The contract is :meth:`diffkv_sglang.store.CompressedKVStore.read_pages` (the reference), with the result written
in the caller's dtype: keys and values in the model's space (Hadamard rotations undone), zeros and
``present = False`` for pruned slots and EMPTY pages. The extend path reads the batch's pages through it once per
layer (:class:`diffkv_sglang.attention.ExtendAttentionWrapper`).

One kernel, grid ``(n, H)``: a program reads one (page, KV head) block, whose descriptor (state, block offset,
tier counts) says what it is.

* Staged: the dense ``[P, D]`` keys and values are copied.
* Sealed: per tier, the tier's rows (code words, (scale, zero) words, in-page token index) are loaded as tiles
  and dequantized as the reference does, ``(code * scale + zero) * meta_scale`` in float32 with no fused
  multiply-add (so the result is bit-identical to ``quant.read_sealed_blocks`` without rotation); a tier with
  per-channel keys (``KEY_CHANNEL``) loads the block's ``D`` key (scale, zero) words once, shared by its rows,
  instead of per-row words (a constexpr branch: token-only formats compile as before). A rotated kind is
  multiplied by the normalized Hadamard matrix (IEEE float32 products: the reference's butterfly differs by
  float32 rounding). Rows are scattered to their in-page slots; the slots no tier holds are zeroed.

Block offsets come only from :mod:`diffkv_sglang.format` through :mod:`diffkv_sglang.kernels.block_read`
(descriptor, section starts, code unpacking; shared with the decode and seal kernels).

Example::

    keys, values, present = read_pages_dense(store.view, layer, pages, torch.bfloat16)     # [n, H, P, D], [n, H, P]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffkv_sglang.format import BlockView, hadamard_matrix
from diffkv_sglang.kernels.block_read import (SEALED, STAGED, describe_block, half_to_float, meta_scale_start,
                                              section_start, sealed_format_constants, tier_count, unpack_codes)
from diffkv_sglang.kernels.tl_utils import mma, round_to

__all__ = ["read_pages_dense"]

@triton.jit
def _tier_rows(U32, HAD, base, n0, n1, n2, n3, rank, in_tier, t: tl.constexpr, BITS: tl.constexpr,
               GROUPS: tl.constexpr, CHANNEL: tl.constexpr, SEC: tl.constexpr, META_SEC: tl.constexpr, meta_scale,
               ROT: tl.constexpr, CODE_ALIGN: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr):
    """Tier ``t``'s rows ``rank`` (``[BLOCK_P]``, masked by ``in_tier``) of one kind (keys or values) of a sealed
    block, dequantized: ``[BLOCK_P, D]`` float32 (zeros outside the tier). ``CHANNEL``: the kind's (scale, zero)
    are per channel of the block (``[D]`` words) instead of per row and group."""
    row_words: tl.constexpr = D * BITS // 32
    at = tl.multiple_of((base + section_start(n0, n1, n2, n3, SEC, t)) >> 2, CODE_ALIGN // 4)
    words = tl.load(U32 + at + rank[:, None] * row_words + tl.arange(0, row_words)[None, :], mask=in_tier[:, None],
                    other=0)
    codes = unpack_codes(words, BITS, BLOCK_P, D).to(tl.float32)
    meta_at = (base + section_start(n0, n1, n2, n3, META_SEC, t)) >> 2
    if CHANNEL:                 # [1, D]: present only when the tier holds a token
        meta = tl.load(U32 + meta_at + tl.arange(0, D)[None, :], mask=tier_count(n0, n1, n2, n3, t) > 0, other=0)
    else:                       # [BLOCK_P, D]: each row's group word
        group = tl.arange(0, D) // (D // GROUPS)
        meta = tl.load(U32 + meta_at + rank[:, None] * GROUPS + group[None, :], mask=in_tier[:, None], other=0)
    x = (codes * half_to_float(meta) + half_to_float(meta >> 16)) * meta_scale
    x = tl.where(in_tier[:, None], x, 0.0)
    if ROT:
        h = tl.load(HAD + tl.arange(0, D)[:, None] * D + tl.arange(0, D)[None, :])
        x = mma(x, h, tl.zeros_like(x), True)
    return x


@triton.jit
def _store_tier(U8, U32, K_OUT, V_OUT, PRESENT, HAD, base, n0, n1, n2, n3, out_row, key_ms, value_ms,
                t: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, KEY_GROUPS: tl.constexpr,
                VALUE_GROUPS: tl.constexpr, KEY_CHANNEL: tl.constexpr, KEY_SEC: tl.constexpr,
                VALUE_SEC: tl.constexpr, KEY_META_SEC: tl.constexpr, VALUE_META_SEC: tl.constexpr,
                INDEX_SEC: tl.constexpr, KEY_ROT: tl.constexpr, VALUE_ROT: tl.constexpr, CODE_ALIGN: tl.constexpr,
                D: tl.constexpr, BLOCK_P: tl.constexpr):
    """Dequantize tier ``t`` of a sealed block and scatter its rows to their in-page slots; returns the slots
    ``[BLOCK_P]`` (-1 past the tier's rows)."""
    rank = tl.arange(0, BLOCK_P)
    in_tier = rank < tier_count(n0, n1, n2, n3, t)
    slot = tl.load(U8 + base + section_start(n0, n1, n2, n3, INDEX_SEC, t) + rank, mask=in_tier, other=0)
    rows = out_row + slot.to(tl.int64)
    d = tl.arange(0, D)
    keys = _tier_rows(U32, HAD, base, n0, n1, n2, n3, rank, in_tier, t, KEY_BITS, KEY_GROUPS, KEY_CHANNEL, KEY_SEC,
                      KEY_META_SEC, key_ms, KEY_ROT, CODE_ALIGN, D, BLOCK_P)
    tl.store(K_OUT + rows[:, None] * D + d[None, :], round_to(keys, K_OUT.dtype.element_ty), mask=in_tier[:, None])
    values = _tier_rows(U32, HAD, base, n0, n1, n2, n3, rank, in_tier, t, VALUE_BITS, VALUE_GROUPS, False, VALUE_SEC,
                        VALUE_META_SEC, value_ms, VALUE_ROT, CODE_ALIGN, D, BLOCK_P)
    tl.store(V_OUT + rows[:, None] * D + d[None, :], round_to(values, V_OUT.dtype.element_ty), mask=in_tier[:, None])
    tl.store(PRESENT + rows, tl.full([BLOCK_P], 1, tl.uint8), mask=in_tier)
    return tl.where(in_tier, slot.to(tl.int32), -1)


@triton.jit
def _covered(slots, BLOCK_P: tl.constexpr):
    """``[BLOCK_P]`` bool: which in-page slots appear in ``slots`` (``[BLOCK_P]``, -1 for none)."""
    return tl.max((slots[None, :] == tl.arange(0, BLOCK_P)[:, None]).to(tl.int32), 1) > 0


@triton.jit
def _dense_read_kernel(U8, U32, KV, PAGES, PAGE_STATE, BLOCK_OFFSET, TIER_COUNTS, HAD, K_OUT, V_OUT, PRESENT,
                       layer, values_start, NUM_LAYERS: tl.constexpr, H: tl.constexpr, P: tl.constexpr, D: tl.constexpr,
                       ELEMENT_BYTES: tl.constexpr, BLOCK_P: tl.constexpr, T: tl.constexpr,
                       KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, KEY_GROUPS: tl.constexpr,
                       VALUE_GROUPS: tl.constexpr, KEY_SEC: tl.constexpr, VALUE_SEC: tl.constexpr,
                       KEY_META_SEC: tl.constexpr, VALUE_META_SEC: tl.constexpr, INDEX_SEC: tl.constexpr,
                       META_SCALE_SEC: tl.constexpr, KEY_CHANNEL: tl.constexpr, KEY_ROT: tl.constexpr,
                       VALUE_ROT: tl.constexpr, CODE_ALIGN: tl.constexpr):
    """One (page, KV head) block of ``PAGES`` into its ``[P, D]`` rows of the outputs (``U8``, ``U32``, ``KV``:
    the arena as bytes, int32 words and the model dtype)."""
    i = tl.program_id(0)
    h = tl.program_id(1)
    page = tl.load(PAGES + i).to(tl.int64)
    state, base, n0, n1, n2, n3 = describe_block(page, True, layer, h, PAGE_STATE, BLOCK_OFFSET, TIER_COUNTS,
                                                 NUM_LAYERS, H, T)
    out_row = (i.to(tl.int64) * H + h) * P
    slot = tl.arange(0, BLOCK_P)
    in_page = slot < P
    d = tl.arange(0, D)
    out = (out_row + slot)[:, None] * D + d[None, :]
    if state == STAGED:
        src = (base // ELEMENT_BYTES + slot * D)[:, None] + d[None, :]
        keys = tl.load(KV + src, mask=in_page[:, None], other=0.0)
        values = tl.load(KV + src + values_start // ELEMENT_BYTES, mask=in_page[:, None], other=0.0)
        tl.store(K_OUT + out, keys.to(K_OUT.dtype.element_ty), mask=in_page[:, None])
        tl.store(V_OUT + out, values.to(V_OUT.dtype.element_ty), mask=in_page[:, None])
        tl.store(PRESENT + out_row + slot, tl.full([BLOCK_P], 1, tl.uint8), mask=in_page)
    else:
        covered = tl.zeros([BLOCK_P], tl.int1)
        if state == SEALED:
            scales_at = (base + meta_scale_start(n0, n1, n2, n3, META_SCALE_SEC)) >> 2
            key_ms = tl.load(U32 + scales_at).to(tl.float32, bitcast=True)
            value_ms = tl.load(U32 + scales_at + 1).to(tl.float32, bitcast=True)
            for t in tl.static_range(T):
                slots = _store_tier(U8, U32, K_OUT, V_OUT, PRESENT, HAD, base, n0, n1, n2, n3, out_row, key_ms,
                                    value_ms, t, KEY_BITS[t], VALUE_BITS[t], KEY_GROUPS[t], VALUE_GROUPS[t],
                                    KEY_CHANNEL[t], KEY_SEC, VALUE_SEC, KEY_META_SEC, VALUE_META_SEC, INDEX_SEC,
                                    KEY_ROT, VALUE_ROT, CODE_ALIGN, D, BLOCK_P)
                covered = covered | _covered(slots, BLOCK_P)
        empty = in_page & ~covered                                              # pruned slots, EMPTY pages
        zeros = tl.zeros([BLOCK_P, D], K_OUT.dtype.element_ty)
        tl.store(K_OUT + out, zeros, mask=empty[:, None])
        tl.store(V_OUT + out, zeros, mask=empty[:, None])
        tl.store(PRESENT + out_row + slot, tl.zeros([BLOCK_P], tl.uint8), mask=empty)


def read_pages_dense(kv: BlockView, layer: int, pages: torch.Tensor,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values of ``pages`` in ``layer``, dense, in ``dtype`` (the store's dtype, or float32).

    Args:
        kv: the store's blocks (``CompressedKVStore.view``).
        layer: the layer.
        pages: ``[n]`` int logical pages (any state).
        dtype: output dtype: the store's model dtype or float32.

    Returns:
        keys, values: ``[n, H, P, D]`` in ``dtype`` (model space); present: ``[n, H, P]`` bool.
    """
    heads, page, dim = kv.num_kv_heads, kv.page_size, kv.head_dim
    if dtype not in (kv.dtype, torch.float32):
        raise ValueError(f"read_pages_dense: dtype {dtype}; allowed: the store's {kv.dtype} or torch.float32")
    pages = pages.to(kv.device, torch.int64).contiguous()
    n = pages.numel()
    keys = torch.empty(n, heads, page, dim, dtype=dtype, device=kv.device)
    values = torch.empty_like(keys)
    present = torch.empty(n, heads, page, dtype=torch.bool, device=kv.device)
    if n == 0:
        return keys, values, present
    fmt, staged = kv.formats[layer], kv.formats.staged
    consts = sealed_format_constants(fmt)
    rotated = consts["KEY_ROT"] or consts["VALUE_ROT"]
    had = hadamard_matrix(dim, kv.device) if rotated else keys   # any pointer when nothing is rotated
    _dense_read_kernel[(n, heads)](
        kv.data, kv.typed(torch.int32), kv.typed(kv.dtype), pages, kv.page_state, kv.block_offset,
        kv.tier_counts, had, keys, values, present.view(torch.uint8), layer, staged.values_start,
        kv.num_layers, heads, page, dim, staged.element_bytes, max(32, triton.next_power_of_2(page)),
        enable_fp_fusion=False, **consts)
    return keys, values, present
