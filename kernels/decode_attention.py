"""Decode attention over the compressed store: flash-decoding over sealed (compressed) and staged (dense) pages.

The contract is the torch path of :meth:`diffkv_sglang.attention.DecodeAttentionWrapper.run` (the reference; the
wrapper runs this kernel instead when the store uses kernels, see :mod:`diffkv_sglang.backend_select`): for each
request ``b`` and KV head ``h`` the ``G = Hq / H`` query heads of the group attend over every kept token of the
request's pages, with a float32 softmax, and the attention of every staged token is added to its importance
statistics (``score_sum += max over the group of its probability``, ``seen += 1``).

Two kernels per layer:

* ``_decode_split_kernel``, grid ``(B, H, num_splits)``. Request ``b``'s ``n_b = ceil(seq_len / P)`` pages are
  cut into ``num_splits`` contiguous ranges of ``max(ceil(n_b / num_splits), MIN_PAGES)`` pages; a split whose
  range starts past ``n_b`` exits at once, so short requests cost no padding work. A program serves all ``G``
  query heads of its KV head (they are the M dimension of its products) and walks its range one *item* at a
  time: a page, or a ``BLOCK_N``-row chunk of one when ``P > BLOCK_N``. In a sealed block each tier's key
  codes, value codes, (scale, zero) rows and token indices are contiguous ``[n_t, row_bytes]`` arrays, so a
  sealed item is, per tier, one ``[BLOCK_N, row_bytes]`` tile of each (one 2-D load, rows masked by the tier
  count; section starts once per item from the format's coefficients), unpacked in registers with shifts,
  masks and ``tl.join``. A staged item is one dense ``[BLOCK_N, D]`` tile of keys and one of values. The loop
  is pipelined by hand: page ids are loaded three items ahead, descriptors (state, block offset, tier counts)
  two ahead, a sealed item's tiles and meta scales one ahead, so their latencies overlap the current item's
  arithmetic. Tiers with no rows in an item cost a branch. The split's running max, sum and unnormalized
  output go to a workspace, the base-2 logits of staged tokens to a scratch buffer indexed by the page's rank
  among the request's staged pages (from the plan).
* ``_decode_merge_kernel``, grid ``(B, H)``: combines the splits, writes the output, then turns the staged
  tokens' logits into probabilities with the final max and sum and accumulates ``score_sum`` / ``seen``
  directly in the staged blocks of the arena (no host sync, no torch scatter).

Arithmetic: 16-bit operands on tensor cores, float32 accumulation, float32 online softmax (base 2). Codes
(< 256) are exact in float16 and enter the products as they are; scale, zero point and the power-of-two meta
scale ``m`` are applied around the products, per row and group::

    logit = m * (s * (q . c) + z * sum(q))          values += m * ((p * s) @ c + p @ z)

The other operand is rounded to float16 once: ``q`` (per program; the rotated query for rotated keys) and the
weights ``p * s`` (per tile). Both are scaled by exact powers of two so that float16's range is never a
concern: ``q`` so its largest entry lies in [2^14, 2^15) (a bfloat16 or float16 query is then exact: 8 or 11
significant bits, 29 binades below the maximum before float16 subnormals), ``p * s`` by 2^16 (``p <= 1``,
``s <= 2/3`` in meta-scale units, so below 43691 < 65504; subnormal only below 2^-30). ``sum(q)`` is taken over
the rounded query, so a logit is exactly ``m * (q~ . k^)`` up to float32 accumulation, with
``|q~ - q| <= 2^-11 |q|``. With quantization groups, the ``J`` groups of a tier go into the M dimension: block
``j`` of the stacked query ``[J * G, D]`` holds the query's group-``j`` columns, so one product gives every
group's partial dot products (free while ``J * G <= 16``, the tensor cores' minimum M); for values block ``j``
of the weights holds ``p * s_j`` and the output keeps block ``j`` on group ``j``'s columns.

Per-channel key tiers (``+kc``, ``KEY_CHANNEL``: one (scale, zero) pair per channel over the tier's tokens of the
block, read once per item as ``D`` words) have their scale on the columns, so it goes into the query instead::

    logit = m * ((q o s) . c + q . z)           (s, z: the tier's [D] scale and zero of the block)

``q o s`` (``q``: the float32 query keys see, rotated with key rotation) is formed in float32 per item and tier,
scaled per query row by the power of two putting its largest entry in [2^14, 2^15), rounded to float16 (a pair
for a float32 query) and multiplied with the tier's codes in a product of its own; the power of two is undone on
the float32 result and ``q . z`` (float32) is added on the tier's rows. The error is that of the token path in
another place: the float16 rounding of ``q o s`` is a relative 2^-11 per element (2^-22 for a pair), the same bound
as rounding ``q``, plus 2^-24 for the float32 product ``q * s``; the zero term sees the unrounded query. It
multiplies the code part of the key, ``m * s * c = k - m * z``, instead of ``k``: at most the channel's range over
the tier's tokens of the block (up to float16 roundings), so at most about three times their largest dequantized
``|k|`` in that channel (the bound the tests use, derived in ``tests/test_kernel_decode.py``). Token
tiers keep their single product; a layer without per-channel tiers compiles to the same code as before (the
branches are on constants).

Precision follows the query's dtype. A 16-bit query (what a model passes) gets one float16 product per operand
(relative rounding 2^-11 of ``q`` and of ``p * s``, below the 2^-9 rounding of a bfloat16 output); staged
tiles use the model dtype (a 16-bit query in that dtype is exact; ``p`` rounds to it, as in a dense kernel).
A float32 query (float32 outputs) gets each operand as a float16 pair (high part plus float16 rounding of the
remainder: relative 2^-22), and staged tiles in float32 with IEEE products; likewise float32 models' staged
tiles. The bound the tests check is derived in ``tests/test_kernel_decode.py``.

Block byte offsets come only from :mod:`diffkv_sglang.format` through :mod:`.block_read` (shared with the seal and
dense-read kernels): the launcher passes each layer's section coefficients, bit widths and groups as
``tl.constexpr`` tuples and the kernel computes section starts from the block's tier counts. Hadamard rotation:
``q`` is rotated once per layer (torch, into a plan buffer) for sealed keys while staged keys use the plain ``q``;
values of sealed pages are accumulated in the rotated space and staged ones in the model's space, and ``out =
acc_rotated @ H + acc_staged``.

Example::

    plan = DecodePlan(store.view, num_q_heads=32, max_batch=64, max_pages=512)   # buffers: once
    plan.plan(page_table, seq_lens)                                        # once per batch
    for layer in range(store.num_layers):
        store.write_tokens(layer, new_locs, k[layer], v[layer])
        out = plan.run(q[layer], layer)                                    # [B, Hq, D], launches only
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from diffkv_sglang.format import BlockView, PageState, hadamard_matrix
from diffkv_sglang.kernels.block_read import (SEALED, STAGED, describe_block, half_to_float, meta_scale_start,
                                              section_start, sealed_format_constants, tier_count, unpack_codes)
from diffkv_sglang.kernels.tl_utils import mma as _mma

# The interpreter keeps bfloat16 as raw bits and multiplies them as integers in tl.dot: there, products run on
# exact float32 copies of the 16-bit operands (what the tensor cores multiply).
W_SHIFT = 16                    # value weights p * s enter float16 multiplied by 2^W_SHIFT
_W_SCALE = tl.constexpr(float(2 ** W_SHIFT))
_W_UNSCALE = tl.constexpr(float(2 ** -W_SHIFT))
MIN_TILE_ROWS = 16              # the tensor cores' smallest N / K


# --------------------------------------------------------------------------------------------- helpers
@triton.jit
def _group_blocks(x, GROUPS: tl.constexpr, D: tl.constexpr):
    """``x`` ``[M, D]`` -> ``[GROUPS * M, D]``: row block ``j`` keeps the columns of quantization group ``j``
    (``D / GROUPS`` contiguous columns each) and zeros elsewhere; ``x`` itself for one group."""
    if GROUPS == 1:
        out = x
    else:
        j = tl.arange(0, GROUPS)[:, None, None]
        group = (tl.arange(0, D) // (D // GROUPS))[None, None, :]
        out = tl.where(j == group, x[None, :, :], 0.0).reshape(GROUPS * x.shape[0], D)
    return out


@triton.jit
def _query_operands(q, q_pow, GROUPS: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, PARTS: tl.constexpr):
    """The keys' left operand for ``GROUPS`` groups: ``q * q_pow`` (``[BLOCK_G, D]`` float32, ``q_pow`` a power of
    two) in group blocks ``[GROUPS * BLOCK_G, D]``, as a float16 high part and (``PARTS == 2``) the float16
    remainder, plus the group sums of what the products see (high + low parts): ``[BLOCK_G]`` for one group,
    ``[GROUPS, BLOCK_G]`` otherwise."""
    x = _group_blocks(q * q_pow, GROUPS, D)
    hi = x.to(tl.float16)
    seen = hi.to(tl.float32)
    lo = hi
    if PARTS == 2:
        lo = (x - seen).to(tl.float16)
        seen = seen + lo.to(tl.float32)
    if GROUPS == 1:
        sums = tl.sum(seen, 1)
    else:
        sums = tl.sum(seen.reshape(GROUPS, BLOCK_G, D), 2)
    return hi, lo, sums


@triton.jit
def _pow2_ratio(a, b):
    """``a / b`` for powers of two ``a``, ``b`` (float32 scalars), exactly, by subtracting exponents."""
    return (a.to(tl.int32, bitcast=True) - b.to(tl.int32, bitcast=True) + (127 << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _softmax_step(m_i, s):
    """One online-softmax step over base-2 logits ``s`` ``[BLOCK_G, BLOCK_N]`` (-inf = masked). Returns the new
    running max, the factor ``alpha`` that rescales earlier accumulators, and the probabilities ``p`` relative to
    the new max. A row that has seen only -inf keeps max -inf and gives p = 0. (Running sums are kept per
    column, ``l = l * alpha + p``, and reduced once at the end: no reduction across warps per tile.)"""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp2(m_i - m_safe), tl.exp2(s - m_safe[:, None])


@triton.jit
def _page_id(table, w, w_hi, CHUNKS: tl.constexpr):
    """Logical page of item ``w`` (page ``w // CHUNKS`` of the request; 0 past ``w_hi``)."""
    return tl.load(table + w // CHUNKS, mask=w < w_hi, other=0).to(tl.int64)


@triton.jit
def _meta(block, at, rank, in_tier, GROUPS: tl.constexpr, MAX_GROUPS: tl.constexpr):
    """(scale, zero) float16 pairs of the tier rows ``rank`` of the meta section at word ``at`` of ``block`` (an
    int32 pointer), one word per pair (scale in the low half): ``[BLOCK_N]`` when no tier of the layer has groups,
    else ``[MAX_GROUPS, BLOCK_N]``, row ``j`` holding the pair of the tier's group covering the columns of group
    ``j`` of MAX_GROUPS (group counts are powers of two, groups contiguous). 0 outside the tier."""
    if MAX_GROUPS == 1:
        words = tl.load(block + at + rank, mask=in_tier, other=0)
    else:
        group = tl.arange(0, MAX_GROUPS)[:, None] // (MAX_GROUPS // GROUPS)
        words = tl.load(block + at + rank[None, :] * GROUPS + group, mask=in_tier[None, :], other=0)
    return words


@triton.jit
def _tier_start(n0, n1, n2, t: tl.constexpr):
    """First row of tier ``t`` among a block's rows ordered by tier (tokens of tier 0, then tier 1, ...)."""
    start = tl.zeros_like(n0)
    if t > 0:
        start += n0
    if t > 1:
        start += n1
    if t > 2:
        start += n2
    return start


@triton.jit
def _fetch_tier(block, n0, n1, n2, n3, row0, t: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr,
                KEY_GROUPS: tl.constexpr, VALUE_GROUPS: tl.constexpr, MAX_KEY_GROUPS: tl.constexpr,
                MAX_VALUE_GROUPS: tl.constexpr, KEY_SEC: tl.constexpr, VALUE_SEC: tl.constexpr,
                KEY_META_SEC: tl.constexpr, VALUE_META_SEC: tl.constexpr, CODE_ALIGN: tl.constexpr,
                D: tl.constexpr, BLOCK_N: tl.constexpr, KEY_CHANNEL: tl.constexpr):
    """Tier ``t``'s part of an item: of the block's rows ordered by tier, rows ``row0 .. row0 + BLOCK_N``
    that belong to tier ``t`` (``block``: the block's start as an int32 pointer). Masked by the tier's row
    range, so nothing is read for other rows or non-sealed pages; 0 there. As int32 words (four bytes to a
    register): packed key and value codes ``[BLOCK_N, row_bytes / 4]`` and key and value (scale, zero) words
    (:func:`_meta`). Sections start at multiples of 4 bytes (code rows do: ``head_dim`` is a multiple of 16).
    With per-channel keys (``KEY_CHANNEL``) the key words are the block's ``[D]`` per-channel (scale, zero)
    pairs instead, read once for the item when it has rows of the tier (0 otherwise)."""
    rank = row0 + tl.arange(0, BLOCK_N) - _tier_start(n0, n1, n2, t)       # row inside the tier's sections
    in_tier = (rank >= 0) & (rank < tier_count(n0, n1, n2, n3, t))
    key_row: tl.constexpr = D * KEY_BITS // 32
    value_row: tl.constexpr = D * VALUE_BITS // 32
    key_at = tl.multiple_of(section_start(n0, n1, n2, n3, KEY_SEC, t) >> 2, CODE_ALIGN // 4)
    value_at = tl.multiple_of(section_start(n0, n1, n2, n3, VALUE_SEC, t) >> 2, CODE_ALIGN // 4)
    key_words = tl.load(block + key_at + rank[:, None] * key_row + tl.arange(0, key_row)[None, :],
                        mask=in_tier[:, None], other=0)
    value_words = tl.load(block + value_at + rank[:, None] * value_row + tl.arange(0, value_row)[None, :],
                          mask=in_tier[:, None], other=0)
    if KEY_CHANNEL:
        first = row0 - _tier_start(n0, n1, n2, t)
        count = tier_count(n0, n1, n2, n3, t)
        # the item has rows of the tier (then the section exists: an empty tier has none, whatever its start)
        has = (count > 0) & (first < count) & (first + BLOCK_N > 0)
        channel = tl.arange(0, D)
        key_meta = tl.load(block + (section_start(n0, n1, n2, n3, KEY_META_SEC, t) >> 2) + channel,
                           mask=channel < tl.where(has, D, 0), other=0)
    else:
        key_meta = _meta(block, section_start(n0, n1, n2, n3, KEY_META_SEC, t) >> 2, rank, in_tier, KEY_GROUPS,
                         MAX_KEY_GROUPS)
    value_meta = _meta(block, section_start(n0, n1, n2, n3, VALUE_META_SEC, t) >> 2, rank, in_tier, VALUE_GROUPS,
                       MAX_VALUE_GROUPS)
    return key_words, value_words, key_meta, value_meta


@triton.jit
def _fetch_item(U32, desc, row0, T: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr,
                KEY_GROUPS: tl.constexpr, VALUE_GROUPS: tl.constexpr, MAX_KEY_GROUPS: tl.constexpr,
                MAX_VALUE_GROUPS: tl.constexpr, KEY_SEC: tl.constexpr, VALUE_SEC: tl.constexpr,
                KEY_META_SEC: tl.constexpr, VALUE_META_SEC: tl.constexpr, META_SCALE_SEC: tl.constexpr,
                CODE_ALIGN: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, KEY_CHANNEL: tl.constexpr):
    """Everything a sealed item needs from its block: the float32 meta scales (keys, values) and, per tier,
    :func:`_fetch_tier` (tiers past T repeat tier 0). For other items nothing is read."""
    state, base, n0, n1, n2, n3 = desc
    block = U32 + tl.multiple_of(base >> 2, 4)            # blocks start at multiples of 16 bytes
    scales_at = meta_scale_start(n0, n1, n2, n3, META_SCALE_SEC) >> 2
    sealed = (n0 + n1 + n2 + n3) > 0
    key_ms = tl.load(block + scales_at, mask=sealed, other=0).to(tl.float32, bitcast=True)
    value_ms = tl.load(block + scales_at + 1, mask=sealed, other=0).to(tl.float32, bitcast=True)
    tiles0 = _fetch_tier(block, n0, n1, n2, n3, row0, 0, KEY_BITS[0], VALUE_BITS[0], KEY_GROUPS[0], VALUE_GROUPS[0],
                         MAX_KEY_GROUPS, MAX_VALUE_GROUPS, KEY_SEC, VALUE_SEC, KEY_META_SEC, VALUE_META_SEC,
                         CODE_ALIGN, D, BLOCK_N, KEY_CHANNEL[0])
    tiles1 = tiles0
    tiles2 = tiles0
    tiles3 = tiles0
    if T > 1:
        tiles1 = _fetch_tier(block, n0, n1, n2, n3, row0, 1, KEY_BITS[1], VALUE_BITS[1], KEY_GROUPS[1],
                             VALUE_GROUPS[1], MAX_KEY_GROUPS, MAX_VALUE_GROUPS, KEY_SEC, VALUE_SEC, KEY_META_SEC,
                             VALUE_META_SEC, CODE_ALIGN, D, BLOCK_N, KEY_CHANNEL[1])
    if T > 2:
        tiles2 = _fetch_tier(block, n0, n1, n2, n3, row0, 2, KEY_BITS[2], VALUE_BITS[2], KEY_GROUPS[2],
                             VALUE_GROUPS[2], MAX_KEY_GROUPS, MAX_VALUE_GROUPS, KEY_SEC, VALUE_SEC, KEY_META_SEC,
                             VALUE_META_SEC, CODE_ALIGN, D, BLOCK_N, KEY_CHANNEL[2])
    if T > 3:
        tiles3 = _fetch_tier(block, n0, n1, n2, n3, row0, 3, KEY_BITS[3], VALUE_BITS[3], KEY_GROUPS[3],
                             VALUE_GROUPS[3], MAX_KEY_GROUPS, MAX_VALUE_GROUPS, KEY_SEC, VALUE_SEC, KEY_META_SEC,
                             VALUE_META_SEC, CODE_ALIGN, D, BLOCK_N, KEY_CHANNEL[3])
    return key_ms, value_ms, tiles0, tiles1, tiles2, tiles3


@triton.jit
def _has_rows(n0, n1, n2, n3, row0, t: tl.constexpr, BLOCK_N: tl.constexpr):
    """Whether the item (rows ``row0 .. row0 + BLOCK_N`` of the block's rows ordered by tier) has rows of tier ``t``."""
    start = _tier_start(n0, n1, n2, t)
    return (start < row0 + BLOCK_N) & (start + tier_count(n0, n1, n2, n3, t) > row0)


@triton.jit
def _tier_keys(prod, k_meta, tiles, q_hi, q_lo, present, KEY_BITS: tl.constexpr, BLOCK_N: tl.constexpr,
               D: tl.constexpr, PARTS: tl.constexpr):
    """Add a tier's part of the key product ``q~ @ codes.T`` and its (scale, zero) words (0 on other tiers'
    rows, so adding is exact) if ``present`` (a branch otherwise)."""
    if present:
        key_words, value_words, key_meta, value_meta = tiles
        codes_t = tl.trans(unpack_codes(key_words, KEY_BITS, BLOCK_N, D))
        prod = _mma(q_hi, codes_t, prod, False)
        if PARTS == 2:
            prod = _mma(q_lo, codes_t, prod, False)
        k_meta = k_meta | key_meta
    return prod, k_meta


@triton.jit
def _channel_keys(s_ch, tiles, q_key, in_tier, present, logit_scale, KEY_BITS: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_N: tl.constexpr, D: tl.constexpr, PARTS: tl.constexpr):
    """Add a per-channel key tier's logits ``logit_scale * ((q o s) . c + q . z)`` to ``s_ch`` ``[BLOCK_G,
    BLOCK_N]`` if ``present`` (a branch otherwise): ``q_key`` ``[BLOCK_G, D]`` float32, ``s``, ``z`` the block's
    ``[D]`` per-channel scale and zero of the tier (``tiles``' key meta words), ``in_tier`` ``[BLOCK_N]`` the
    tier's rows (its codes are 0 on the others, so only the zero term needs the mask). ``q o s`` is scaled per
    row by a power of two putting the row's largest entry in [2^14, 2^15), rounded to float16 (a high part and,
    with ``PARTS == 2``, the rounded remainder) and multiplied with the codes in one product of its own; the
    power of two is undone on the float32 result."""
    if present:
        key_words, value_words, key_meta, value_meta = tiles
        qs = q_key * half_to_float(key_meta)[None, :]                             # [BLOCK_G, D] float32
        biased = (tl.max(tl.abs(qs), 1).to(tl.int32, bitcast=True) >> 23) & 255
        shift = tl.minimum(tl.maximum(141 - biased, -126), 127)                   # 0 rows: 2^127 * 0 = 0
        x = qs * ((shift + 127) << 23).to(tl.float32, bitcast=True)[:, None]
        x_hi = x.to(tl.float16)
        codes_t = tl.trans(unpack_codes(key_words, KEY_BITS, BLOCK_N, D))
        prod = _mma(x_hi, codes_t, tl.zeros([BLOCK_G, BLOCK_N], tl.float32), False)
        if PARTS == 2:
            prod = _mma((x - x_hi.to(tl.float32)).to(tl.float16), codes_t, prod, False)
        unscale = ((127 - shift) << 23).to(tl.float32, bitcast=True) * logit_scale      # 2^-shift (0 for 0 rows)
        q_zero = tl.sum(q_key * half_to_float(key_meta >> 16)[None, :], 1) * logit_scale
        s_ch += prod * unscale[:, None] + tl.where(in_tier[None, :], q_zero[:, None], 0.0)
    return s_ch


@triton.jit
def _tier_keys_any(prod, k_meta, s_ch, tiles, q_hi, q_lo, q_key, rows, n0, n1, n2, n3, present, logit_scale,
                   t: tl.constexpr, KEY_CHANNEL: tl.constexpr, KEY_BITS: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_N: tl.constexpr, D: tl.constexpr, PARTS: tl.constexpr):
    """Tier ``t``'s keys: :func:`_channel_keys` into ``s_ch`` for per-channel keys, else :func:`_tier_keys`."""
    if KEY_CHANNEL:
        rank = rows - _tier_start(n0, n1, n2, t)
        in_tier = (rank >= 0) & (rank < tier_count(n0, n1, n2, n3, t))
        s_ch = _channel_keys(s_ch, tiles, q_key, in_tier, present, logit_scale, KEY_BITS, BLOCK_G, BLOCK_N, D, PARTS)
    else:
        prod, k_meta = _tier_keys(prod, k_meta, tiles, q_hi, q_lo, present, KEY_BITS, BLOCK_N, D, PARTS)
    return prod, k_meta, s_ch


@triton.jit
def _tier_values(acc, v_meta, tiles, w_hi, w_lo, present, VALUE_BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                 D: tl.constexpr, PARTS: tl.constexpr):
    """Add a tier's part of the value product ``w @ codes`` to ``acc`` if ``present`` (a branch otherwise)."""
    if present:
        key_words, value_words, key_meta, value_meta = tiles
        codes = unpack_codes(value_words, VALUE_BITS, BLOCK_N, D)
        acc = _mma(w_hi, codes, acc, False)
        if PARTS == 2:
            acc = _mma(w_lo, codes, acc, False)
    return acc


@triton.jit
def _attend_sealed(m_i, l_i, acc, z_acc, acc_st, unit, item, q_ops, q_key, U8, base, n0, n1, n2, n3, row0, valid,
                   key_qk_scale, qk_scale, T: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr,
                   KG: tl.constexpr, VG: tl.constexpr, INDEX_SEC: tl.constexpr, BLOCK_G: tl.constexpr,
                   D: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr, PARTS: tl.constexpr,
                   VALUE_ROT: tl.constexpr, KEY_CHANNEL: tl.constexpr, CHANNEL_KEYS: tl.constexpr,
                   TOKEN_KEYS: tl.constexpr):
    """A sealed item: its rows (the block's tokens ordered by tier, rows ``row0 .. row0 + BLOCK_N``) as one tile
    whatever their tiers: each tier present adds its part of the key and value products (its codes are 0 on the
    other tiers' rows), and there is one online-softmax step. A row counts unless its token lies past the
    request's end: only a request's last page can hold such tokens (``valid < P``), and only then are the
    tokens' in-page indices read (one contiguous run over the tiers' index sections).

    Logits: ``key_ms * softmax scale * (s * (q~ . c) + z * sum(q~))`` with the float16 query ``q~`` scaled by a
    power of two that ``key_qk_scale`` undoes. Values: ``acc`` is kept in units of ``unit * 2^-16`` (``unit``:
    the values' meta scale of the last sealed item, a power of two), so the value product, of float16 weights
    ``p * s * 2^16`` with the codes, accumulates into it directly; the item switches the unit to its own.
    ``l_i`` and ``z_acc`` (the zero points' share of every output column, units of ``acc``) are ``[BLOCK_G,
    BLOCK_N]`` per-column partial sums. With KG (VG) groups, row block ``j`` of the key (value) product belongs
    to group ``j``.

    Per-channel key tiers (``KEY_CHANNEL``; the layer has some if CHANNEL_KEYS, and token tiers if TOKEN_KEYS)
    go through :func:`_channel_keys` instead, with the float32 ``q_key`` (the query sealed keys see), into
    ``s_ch``, already in logit units: ``key_ms * softmax scale * ((q o s) . c + q . z)``, 0 on other rows."""
    key_ms, value_ms, tiles0, tiles1, tiles2, tiles3 = item
    q_hi, q_lo, q_sum = q_ops
    rows = row0 + tl.arange(0, BLOCK_N)
    live = rows < n0 + n1 + n2 + n3
    if valid < P:
        pos = tl.load(U8 + base + section_start(n0, n1, n2, n3, INDEX_SEC, 0) + rows, mask=live, other=0)
        live = live & (pos.to(tl.int32) < valid)
    has0 = _has_rows(n0, n1, n2, n3, row0, 0, BLOCK_N)
    has1 = _has_rows(n0, n1, n2, n3, row0, 1, BLOCK_N)
    has2 = _has_rows(n0, n1, n2, n3, row0, 2, BLOCK_N)
    has3 = _has_rows(n0, n1, n2, n3, row0, 3, BLOCK_N)
    prod = tl.zeros([KG * BLOCK_G, BLOCK_N], tl.float32)
    if KG == 1:
        k_meta = tl.zeros([BLOCK_N], tl.int32)
    else:
        k_meta = tl.zeros([KG, BLOCK_N], tl.int32)
    if CHANNEL_KEYS:
        s_ch = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
        logit_scale = key_ms * qk_scale
    else:
        s_ch = prod                                   # placeholders, never touched
        logit_scale = qk_scale
    prod, k_meta, s_ch = _tier_keys_any(prod, k_meta, s_ch, tiles0, q_hi, q_lo, q_key, rows, n0, n1, n2, n3, has0,
                                        logit_scale, 0, KEY_CHANNEL[0], KEY_BITS[0], BLOCK_G, BLOCK_N, D, PARTS)
    v_meta = tiles0[3]
    if T > 1:
        prod, k_meta, s_ch = _tier_keys_any(prod, k_meta, s_ch, tiles1, q_hi, q_lo, q_key, rows, n0, n1, n2, n3,
                                            has1, logit_scale, 1, KEY_CHANNEL[1], KEY_BITS[1], BLOCK_G, BLOCK_N, D,
                                            PARTS)
        v_meta = v_meta | tiles1[3]
    if T > 2:
        prod, k_meta, s_ch = _tier_keys_any(prod, k_meta, s_ch, tiles2, q_hi, q_lo, q_key, rows, n0, n1, n2, n3,
                                            has2, logit_scale, 2, KEY_CHANNEL[2], KEY_BITS[2], BLOCK_G, BLOCK_N, D,
                                            PARTS)
        v_meta = v_meta | tiles2[3]
    if T > 3:
        prod, k_meta, s_ch = _tier_keys_any(prod, k_meta, s_ch, tiles3, q_hi, q_lo, q_key, rows, n0, n1, n2, n3,
                                            has3, logit_scale, 3, KEY_CHANNEL[3], KEY_BITS[3], BLOCK_G, BLOCK_N, D,
                                            PARTS)
        v_meta = v_meta | tiles3[3]
    if TOKEN_KEYS:
        if KG == 1:
            k_scale = tl.where(live, half_to_float(k_meta), 0.0)               # no NaN from rows past the request
            k_zero = tl.where(live, half_to_float(k_meta >> 16), 0.0)
            s = prod * k_scale[None, :] + q_sum[:, None] * k_zero[None, :]
        else:
            k_scale = tl.where(live[None, :], half_to_float(k_meta), 0.0)            # [KG, BLOCK_N]
            k_zero = tl.where(live[None, :], half_to_float(k_meta >> 16), 0.0)
            s = tl.sum(prod.reshape(KG, BLOCK_G, BLOCK_N) * k_scale[:, None, :]
                       + q_sum[:, :, None] * k_zero[:, None, :], 0)
        if CHANNEL_KEYS:                              # token tiers' rows of s_ch are 0, channel tiers' of s
            s = tl.where(live[None, :], s * (key_ms * key_qk_scale) + s_ch, float("-inf"))
        else:
            s = tl.where(live[None, :], s * (key_ms * key_qk_scale), float("-inf"))
    else:
        s = tl.where(live[None, :], s_ch, float("-inf"))
    m_i, alpha, p = _softmax_step(m_i, s)
    l_i = tl.fma(l_i, alpha[:, None], p)
    rescale = (alpha * _pow2_ratio(unit, value_ms))[:, None]               # to the item's unit
    if VALUE_ROT:
        acc_st = acc_st * alpha[:, None]
    if VG == 1:
        v_scale = tl.where(live, half_to_float(v_meta), 0.0)
        v_zero = tl.where(live, half_to_float(v_meta >> 16), 0.0)
        w = p * (v_scale * _W_SCALE)[None, :]
        z_acc = tl.fma(z_acc, rescale, p * (v_zero * _W_SCALE)[None, :])
        r = acc * rescale
    else:
        z_acc = z_acc * rescale
        v_scale = tl.where(live[None, :], half_to_float(v_meta), 0.0)            # [VG, BLOCK_N]
        v_zero = tl.where(live[None, :], half_to_float(v_meta >> 16), 0.0)
        w = (p[None, :, :] * (v_scale * _W_SCALE)[:, None, :]).reshape(VG * BLOCK_G, BLOCK_N)
        r = tl.zeros([VG * BLOCK_G, D], tl.float32)
    w_hi = w.to(tl.float16)
    w_lo = w_hi
    if PARTS == 2:
        w_lo = (w - w_hi.to(tl.float32)).to(tl.float16)
    r = _tier_values(r, v_meta, tiles0, w_hi, w_lo, has0, VALUE_BITS[0], BLOCK_N, D, PARTS)
    if T > 1:
        r = _tier_values(r, v_meta, tiles1, w_hi, w_lo, has1, VALUE_BITS[1], BLOCK_N, D, PARTS)
    if T > 2:
        r = _tier_values(r, v_meta, tiles2, w_hi, w_lo, has2, VALUE_BITS[2], BLOCK_N, D, PARTS)
    if T > 3:
        r = _tier_values(r, v_meta, tiles3, w_hi, w_lo, has3, VALUE_BITS[3], BLOCK_N, D, PARTS)
    if VG == 1:
        acc = r
    else:
        z = tl.sum(p[None, :, :] * v_zero[:, None, :], 2) * _W_SCALE          # [VG, BLOCK_G]
        r = r.reshape(VG, BLOCK_G, D) + z[:, :, None]
        group = (tl.arange(0, D) // (D // VG))[None, None, :]
        acc = acc * rescale + tl.sum(tl.where(tl.arange(0, VG)[:, None, None] == group, r, 0.0), 0)
    return m_i, l_i, acc, z_acc, acc_st, value_ms


@triton.jit
def _attend_staged(m_i, l_i, acc, z_acc, acc_st, unit, q, KV, base, row0, valid, srank, LOGITS, staged_cap, qk_scale,
                   G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
                   BLOCK_N: tl.constexpr, KV_ELEMENT_BYTES: tl.constexpr, VALUES_START: tl.constexpr,
                   VALUE_ROT: tl.constexpr, IEEE: tl.constexpr):
    """One staged item: rows ``row0 .. row0 + BLOCK_N`` of a dense block (the first ``valid - row0`` exist).
    ``q`` ``[BLOCK_G, D]`` float32, plain (staged keys are in the model's space). Products in the model dtype
    (``q`` and ``p`` rounded to it), or in float32 with IEEE products. Logits go to ``LOGITS``
    ``[staged_cap, P, G]`` at the page's staged rank; values to ``acc_st`` with value rotation (model space,
    plain units), else to ``acc`` (units ``unit * 2^-16``)."""
    rows = row0 + tl.arange(0, BLOCK_N)
    ok = rows < valid
    at = tl.multiple_of(base // KV_ELEMENT_BYTES, 16 // KV_ELEMENT_BYTES) + rows[:, None] * D + tl.arange(0, D)[None, :]
    k = tl.load(KV + at, mask=ok[:, None], other=0.0)
    v = tl.load(KV + VALUES_START + at, mask=ok[:, None], other=0.0)
    if IEEE:
        s = _mma(q, tl.trans(k.to(tl.float32)), tl.zeros([BLOCK_G, BLOCK_N], tl.float32), True)
    else:
        s = _mma(q.to(k.dtype), tl.trans(k), tl.zeros([BLOCK_G, BLOCK_N], tl.float32), False)
    s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
    g = tl.arange(0, BLOCK_G)
    keep = ok & (srank >= 0) & (srank < staged_cap)
    tl.store(LOGITS + (srank * P + rows)[None, :] * G + g[:, None], s, mask=(g[:, None] < G) & keep[None, :])
    m_i, alpha, p = _softmax_step(m_i, s)
    l_i = tl.fma(l_i, alpha[:, None], p)
    if IEEE:
        r = _mma(p, v.to(tl.float32), tl.zeros([BLOCK_G, D], tl.float32), True)
    else:
        r = _mma(p.to(v.dtype), v, tl.zeros([BLOCK_G, D], tl.float32), False)
    acc = acc * alpha[:, None]
    z_acc = z_acc * alpha[:, None]
    if VALUE_ROT:
        acc_st = tl.fma(acc_st, alpha[:, None], r)
    else:
        acc += r * (_W_SCALE / unit)
    return m_i, l_i, acc, z_acc, acc_st


# ----------------------------------------------------------------------------------------------- kernels
# Runtime integers that vary between calls are not specialized on (Triton would compile one variant for a value of
# 1, one for multiples of 16 and one for the rest): the page-table stride grows with an eager wrapper's capacity,
# and each new class stalled a serving H100 for a 7 s compile (benchmarks/results/serving-h100.json).
@triton.jit(do_not_specialize=["stride_pt", "layer", "staged_cap"])
def _decode_split_kernel(
        Q, stride_qb, stride_qh, Q_ROT, stride_rb, stride_rh,
        U8, U32, KV,
        BLOCK_OFFSET, PAGE_STATE, TIER_COUNTS,
        PAGE_TABLE, STAGED_RANK, stride_pt, SEQ_LENS,
        PART_M, PART_L, PART_ACC, LOGITS,
        layer, staged_cap, qk_scale,
        NUM_LAYERS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
        G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
        BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr, MIN_PAGES: tl.constexpr,
        T: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr,
        KEY_GROUPS: tl.constexpr, VALUE_GROUPS: tl.constexpr, KG: tl.constexpr, VG: tl.constexpr,
        KEY_SEC: tl.constexpr, VALUE_SEC: tl.constexpr, KEY_META_SEC: tl.constexpr,
        VALUE_META_SEC: tl.constexpr, INDEX_SEC: tl.constexpr, META_SCALE_SEC: tl.constexpr,
        CODE_ALIGN: tl.constexpr, KV_ELEMENT_BYTES: tl.constexpr, KV_VALUES_START: tl.constexpr,
        KEY_ROT: tl.constexpr, VALUE_ROT: tl.constexpr, PARTS: tl.constexpr, STAGED_IEEE: tl.constexpr,
        UNROLL: tl.constexpr, KEY_CHANNEL: tl.constexpr, CHANNEL_KEYS: tl.constexpr, TOKEN_KEYS: tl.constexpr):
    """One split of one (request, KV head): online softmax over the split's pages for all G query heads.

    Items (pages, or BLOCK_N-row chunks of pages: CHUNKS per page) are visited in order with a hand-made
    pipeline: page ids three items ahead, descriptors two ahead, a sealed item's tiles one ahead.

    Q ``[B, Hq, D]`` (any float dtype), Q_ROT the same rotated (float32; Q itself without key rotation);
    U8/U32/KV: the arena as uint8 / int32 / model dtype; BLOCK_OFFSET ``[slots]`` int64; PAGE_STATE ``[pages]``
    int8; TIER_COUNTS ``[slots, T]`` int32; PAGE_TABLE / STAGED_RANK ``[B, stride_pt]`` int32; SEQ_LENS ``[B]``
    int32. Writes PART_M / PART_L ``[B * H * S, G]`` float32 (base-2 running max, sum), PART_ACC
    ``[B * H * S, (1 + VALUE_ROT) * G * D]`` float32 (unnormalized output; with value rotation the rotated-space
    part, then the model-space part), LOGITS ``[B, H, staged_cap, P, G]`` float32 (base-2 logits of staged
    tokens). The G query heads are the first of BLOCK_G >= 16 rows (the products' M dimension).
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    seq_len = tl.load(SEQ_LENS + b)
    num_pages = tl.cdiv(seq_len, P)
    per_split = tl.maximum(tl.cdiv(num_pages, num_splits), MIN_PAGES)
    page_lo = split * per_split
    if page_lo < num_pages:                          # splits past the request's last page do nothing
        page_hi = tl.minimum(page_lo + per_split, num_pages)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        g_mask = g < G
        q = tl.load(Q + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
                    mask=g_mask[:, None], other=0.0).to(tl.float32)
        if KEY_ROT:                                  # sealed keys live in the rotated space
            q_key = tl.load(Q_ROT + b * stride_rb + (h * G + g)[:, None] * stride_rh + d[None, :],
                            mask=g_mask[:, None], other=0.0).to(tl.float32)
        else:
            q_key = q
        # power of two putting max |q_key| in [2^14, 2^15): float16 holds the scaled query without overflow
        biased = (tl.max(tl.max(tl.abs(q_key), 1), 0).to(tl.int32, bitcast=True) >> 23) & 255
        shift = tl.minimum(tl.maximum(141 - biased, -126), 127)
        q_pow = ((shift + 127) << 23).to(tl.float32, bitcast=True)
        key_qk_scale = qk_scale * ((127 - shift) << 23).to(tl.float32, bitcast=True)
        q_ops = _query_operands(q_key, q_pow, KG, BLOCK_G, D, PARTS)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)      # per-column partial sums (see _softmax_step)
        acc = tl.zeros([BLOCK_G, D], tl.float32)            # units of unit * 2^-16 (see _attend_sealed)
        z_acc = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)    # zero points' share of every column of acc
        unit = tl.full((), 1.0, tl.float32)
        if VALUE_ROT:
            acc_st = tl.zeros([BLOCK_G, D], tl.float32)
        else:
            acc_st = tl.zeros([1, 1], tl.float32)    # placeholder, never touched
        logits = LOGITS + (b * NUM_KV_HEADS + h) * staged_cap * P * G
        table = PAGE_TABLE + b * stride_pt
        ranks = STAGED_RANK + b * stride_pt
        w_lo = page_lo * CHUNKS
        w_hi = page_hi * CHUNKS
        # pipeline prologue: item w_lo's descriptor and tiles, item w_lo + 1's descriptor, item w_lo + 2's page
        desc = describe_block(_page_id(table, w_lo, w_hi, CHUNKS), w_lo < w_hi, layer, h, PAGE_STATE, BLOCK_OFFSET,
                              TIER_COUNTS, NUM_LAYERS, NUM_KV_HEADS, T)
        desc_1 = describe_block(_page_id(table, w_lo + 1, w_hi, CHUNKS), w_lo + 1 < w_hi, layer, h, PAGE_STATE,
                                BLOCK_OFFSET, TIER_COUNTS, NUM_LAYERS, NUM_KV_HEADS, T)
        page_2 = _page_id(table, w_lo + 2, w_hi, CHUNKS)
        item = _fetch_item(U32, desc, (w_lo % CHUNKS) * BLOCK_N, T, KEY_BITS, VALUE_BITS, KEY_GROUPS, VALUE_GROUPS,
                           KG, VG, KEY_SEC, VALUE_SEC, KEY_META_SEC, VALUE_META_SEC, META_SCALE_SEC, CODE_ALIGN, D,
                           BLOCK_N, KEY_CHANNEL)
        for w in tl.range(w_lo, w_hi, loop_unroll_factor=UNROLL):
            # the next item's tiles (its descriptor came during the previous item), the descriptor two items
            # ahead, the page three ahead: their latencies overlap this item's arithmetic
            item_1 = _fetch_item(U32, desc_1, ((w + 1) % CHUNKS) * BLOCK_N, T, KEY_BITS, VALUE_BITS, KEY_GROUPS,
                                 VALUE_GROUPS, KG, VG, KEY_SEC, VALUE_SEC, KEY_META_SEC, VALUE_META_SEC,
                                 META_SCALE_SEC, CODE_ALIGN, D, BLOCK_N, KEY_CHANNEL)
            desc_2 = describe_block(page_2, w + 2 < w_hi, layer, h, PAGE_STATE, BLOCK_OFFSET, TIER_COUNTS,
                                    NUM_LAYERS, NUM_KV_HEADS, T)
            page_2 = _page_id(table, w + 3, w_hi, CHUNKS)
            state, base, n0, n1, n2, n3 = desc
            row0 = (w % CHUNKS) * BLOCK_N
            valid = tl.minimum(seq_len - (w // CHUNKS) * P, P)
            if state == SEALED:
                if n0 + n1 + n2 + n3 > row0:                 # all-pruned blocks (and chunks past the rows): nothing
                    m_i, l_i, acc, z_acc, acc_st, unit = _attend_sealed(
                        m_i, l_i, acc, z_acc, acc_st, unit, item, q_ops, q_key, U8, base, n0, n1, n2, n3, row0,
                        valid, key_qk_scale, qk_scale, T, KEY_BITS, VALUE_BITS, KG, VG, INDEX_SEC, BLOCK_G, D, P,
                        BLOCK_N, PARTS, VALUE_ROT, KEY_CHANNEL, CHANNEL_KEYS, TOKEN_KEYS)
            elif state == STAGED:
                srank = tl.load(ranks + w // CHUNKS)
                m_i, l_i, acc, z_acc, acc_st = _attend_staged(
                    m_i, l_i, acc, z_acc, acc_st, unit, q, KV, base, row0, valid, srank, logits, staged_cap, qk_scale, G,
                    BLOCK_G, D, P, BLOCK_N, KV_ELEMENT_BYTES, KV_VALUES_START, VALUE_ROT, STAGED_IEEE)
            desc, desc_1, item = desc_1, desc_2, item_1
        acc = (acc + tl.sum(z_acc, 1)[:, None]) * (unit * _W_UNSCALE)
        row = (b * NUM_KV_HEADS + h) * num_splits + split
        tl.store(PART_M + row * G + g, m_i, mask=g_mask)
        tl.store(PART_L + row * G + g, tl.sum(l_i, 1), mask=g_mask)
        acc_ptr = PART_ACC + row * ((1 + VALUE_ROT) * G * D) + g[:, None] * D + d[None, :]
        tl.store(acc_ptr, acc, mask=g_mask[:, None])
        if VALUE_ROT:
            tl.store(acc_ptr + G * D, acc_st, mask=g_mask[:, None])


@triton.jit(do_not_specialize=["stride_pt", "layer", "num_splits", "staged_cap"])
def _decode_merge_kernel(
        OUT, stride_ob, stride_oh, OUT_ST,
        PART_M, PART_L, PART_ACC, LOGITS,
        PAGE_TABLE, stride_pt, STAGED_POS, SEQ_LENS,
        PAGE_STATE, BLOCK_OFFSET, F32,
        layer, num_splits, staged_cap,
        NUM_LAYERS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
        G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, P: tl.constexpr, BLOCK_P: tl.constexpr,
        MIN_PAGES: tl.constexpr, SCORE_START: tl.constexpr, SEEN_START: tl.constexpr,
        VALUE_ROT: tl.constexpr, RECORD: tl.constexpr):
    """Combine the splits of one (request, KV head), write its G outputs, record staged-token importance.

    OUT ``[B, Hq, D]`` (any float dtype; float32 rotated-space output with value rotation, then OUT_ST
    ``[B, Hq, D]`` float32 gets the model-space part); STAGED_POS ``[B, staged_cap]`` int32: request page index
    of the request's k-th staged page (-1: none). Other arguments as in ``_decode_split_kernel``.
    With RECORD, each staged token valid for the request gets ``score_sum += max_g p_g`` and ``seen += 1``
    in its block (staged pages belong to one request, so plain read-modify-write is race free).
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    g_mask = g < G
    seq_len = tl.load(SEQ_LENS + b)
    num_pages = tl.cdiv(seq_len, P)
    per_split = tl.maximum(tl.cdiv(num_pages, num_splits), MIN_PAGES)
    used = tl.cdiv(num_pages, per_split)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    if VALUE_ROT:
        acc_st = tl.zeros([BLOCK_G, D], tl.float32)
    for s in range(0, used):
        row = (b * NUM_KV_HEADS + h) * num_splits + s
        m_s = tl.load(PART_M + row * G + g, mask=g_mask, other=float("-inf"))
        l_s = tl.load(PART_L + row * G + g, mask=g_mask, other=0.0)
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        beta = tl.exp2(m_s - m_safe)
        l = l * alpha + l_s * beta
        acc_ptr = PART_ACC + row * ((1 + VALUE_ROT) * G * D) + g[:, None] * D + d[None, :]
        acc = acc * alpha[:, None] + tl.load(acc_ptr, mask=g_mask[:, None], other=0.0) * beta[:, None]
        if VALUE_ROT:
            acc_st = acc_st * alpha[:, None] + tl.load(acc_ptr + G * D, mask=g_mask[:, None], other=0.0) * beta[:, None]
        m = m_new
    inv_l = tl.where(l > 0, 1.0 / tl.where(l > 0, l, 1.0), 0.0)     # nothing kept: output 0, like the reference
    heads = h * G + g
    tl.store(OUT + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
             (acc * inv_l[:, None]).to(OUT.dtype.element_ty), mask=g_mask[:, None])
    if VALUE_ROT:
        tl.store(OUT_ST + (b * NUM_KV_HEADS * G + heads)[:, None] * D + d[None, :], acc_st * inv_l[:, None],
                 mask=g_mask[:, None])
    if RECORD:
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        rows = tl.arange(0, BLOCK_P)
        for k in range(0, staged_cap):
            i = tl.load(STAGED_POS + b * staged_cap + k)
            page = tl.load(PAGE_TABLE + b * stride_pt + tl.maximum(i, 0)).to(tl.int64)
            ok = (i >= 0) & (tl.load(PAGE_STATE + page) == STAGED)
            base = tl.load(BLOCK_OFFSET + (page * NUM_LAYERS + layer) * NUM_KV_HEADS + h, mask=ok, other=0)
            row_mask = (rows < tl.minimum(seq_len - i * P, P)) & ok
            logits = LOGITS + (((b * NUM_KV_HEADS + h) * staged_cap + k) * P + rows[None, :]) * G + g[:, None]
            lg = tl.load(logits, mask=g_mask[:, None] & row_mask[None, :], other=float("-inf"))
            prob = tl.max(tl.exp2(lg - m_safe[:, None]) * inv_l[:, None], 0)           # max over the group
            score = F32 + (base + SCORE_START) // 4 + rows
            tl.store(score, tl.load(score, mask=row_mask, other=0.0) + prob, mask=row_mask)
            seen = F32 + (base + SEEN_START) // 4 + rows
            tl.store(seen, tl.load(seen, mask=row_mask, other=0.0) + 1.0, mask=row_mask)


# ---------------------------------------------------------------------------------------------- launcher
@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the split kernel.

    Attributes:
        block_n: most token rows per tile. A tile is ``min(block_n, max(MIN_TILE_ROWS, next_pow2(page_size)))``
            rows: one tier's rows of a page (or a chunk of them for pages larger than the tile), or a staged
            page's rows.
        num_warps, maxnreg: Triton launch options (``maxnreg`` caps registers per thread).
        unroll: unroll factor of the item loop (2: the one-item-ahead buffers alternate instead of being
            copied each item).
        min_pages_per_split: fewest pages a split gets (short requests use fewer splits).
        programs_per_sm: split-K aims at this many programs per multiprocessor while the batch has at most
            ``NARROW_PAIRS_PER_SM`` (request, KV head) pairs per multiprocessor ...
        wide_programs_per_sm: ... and at this many above that (more splits then add waves and merge work).
    """

    block_n: int = 64
    num_warps: int = 4
    unroll: int = 2
    min_pages_per_split: int = 2
    maxnreg: int | None = None
    programs_per_sm: int = 16
    wide_programs_per_sm: int = 4


# The visible tuning table: head_dim -> config; benchmarks/kernels_gpu.py --tune times TUNE_CONFIGS on TUNE_CASES
# (Llama-3-8B and SmolLM2 shapes, batch 1-64, all-high and 30/50/20). 16-row tiles with one warp per program were
# the fastest at both head_dims on an H200 (benchmarks/results/decode-tune-h200.json; 30/50/20 at batch 64: 1660
# against 1986 us for 32-row tiles and 2 warps at head_dim 128, 151 against 187 us at 64; all-high about equal),
# since a mixed page then costs the tiles of its rows, not one padded tile per tier. Splits, on an H100
# (benchmarks/results/decode-tune-h100.json): 16 programs per SM beat 4 where the batch has few (request, head)
# pairs (Llama-3-8B batch 16 at 4k: 108 against 140 us all-high; SmolLM2 batch 64 at 4k: 87 against 133 us) and
# lose where it has many (Llama-3-8B batch 64 at 16k, 512 pairs: 1527 against 1340 us), hence two targets.
DECODE_CONFIGS = {
    64: DecodeConfig(block_n=16, num_warps=1),
    128: DecodeConfig(block_n=16, num_warps=1),
}
TUNE_CONFIGS = (
    DecodeConfig(num_warps=4),
    DecodeConfig(num_warps=4, maxnreg=128),
    DecodeConfig(num_warps=8),
    DecodeConfig(num_warps=2),
    DecodeConfig(num_warps=4, min_pages_per_split=4),
    DecodeConfig(block_n=16, num_warps=2),
    DecodeConfig(block_n=16, num_warps=4),
    DecodeConfig(block_n=16, num_warps=4, maxnreg=128),
    DecodeConfig(block_n=16, num_warps=1, programs_per_sm=4),
    DecodeConfig(block_n=16, num_warps=1, programs_per_sm=8),
    DecodeConfig(block_n=16, num_warps=1, programs_per_sm=16, wide_programs_per_sm=16),
)
MAX_SPLITS = 64
NARROW_PAIRS_PER_SM = 2
SPLIT_KERNELS = ("triton", "cuda")      # DecodePlan's split_kernel: this module's, or kernels/cuda_decode.py's


def default_config(head_dim: int) -> DecodeConfig:
    """The tuning table's entry for ``head_dim`` (the closest smaller one otherwise)."""
    known = sorted(DECODE_CONFIGS)
    return DECODE_CONFIGS[max([d for d in known if d <= head_dim], default=known[0])]


class DecodePlan:
    """Per-batch metadata and fixed-capacity workspaces of the Triton decode path; ``run`` only launches.

    Args:
        kv: the store's blocks (arena bytes, descriptor tables, layer formats; ``CompressedKVStore.view``).
        num_q_heads: query heads on this rank (a multiple of ``kv.num_kv_heads``).
        max_batch, max_pages: capacity of the page table (requests, pages per request).
        max_staged_pages: capacity of the staged-logit scratch, in staged pages per request. ``None`` sizes it
            in each :meth:`plan` from the batch (one host sync); give a number for CUDA graphs (``plan`` then
            raises if a request has more, unless ``check=False``).
        num_splits: split-K factor; ``None`` picks ``ceil(target / (batch * H))`` capped by MAX_SPLITS (target:
            ``programs_per_sm`` or ``wide_programs_per_sm`` programs per SM); it depends on the batch size only.
        sm_scale: softmax scale (default ``1 / sqrt(head_dim)``).
        config: launch parameters (default :func:`default_config`).
        record_importance: accumulate staged-token importance (the reference always does).
        split_kernel: ``"triton"`` (default) or ``"cuda"``. With ``"cuda"`` on
            a CUDA store, ``run`` launches the CUDA split kernel (:mod:`.cuda_decode`, built here on first use) for
            the layers whose format it reads and this kernel for the others (same workspace, same merge); if it
            cannot be built, every layer runs this one (one warning).

    Example::

        plan = DecodePlan(store.view, num_q_heads=32, max_batch=64, max_pages=512)
        plan.plan(page_table, seq_lens)          # [B, n] logical pages, [B] tokens incl. the new one
        for layer in range(kv.num_layers):
            out = plan.run(q[layer], layer)     # q [B, Hq, D] -> [B, Hq, D]; importance recorded

    ``run`` allocates nothing when given ``out`` and does no host sync, so it can be captured in a CUDA graph
    once ``plan`` has filled the buffers (re-run ``plan`` outside the graph before each replay).
    """

    def __init__(self, kv: BlockView, num_q_heads: int, max_batch: int, max_pages: int, *,
                 max_staged_pages: int | None = None, num_splits: int | None = None, sm_scale: float | None = None,
                 config: DecodeConfig | None = None, record_importance: bool = True,
                 split_kernel: str = "triton"):
        heads, dim = kv.num_kv_heads, kv.head_dim
        if num_q_heads % heads:
            raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={heads}")
        if max_batch < 1 or max_pages < 1:
            raise ValueError(f"max_batch={max_batch} and max_pages={max_pages} must be >= 1")
        self.kv, self.num_q_heads, self.group = kv, num_q_heads, num_q_heads // heads
        self.max_batch, self.max_pages = max_batch, max_pages
        self.sm_scale = sm_scale if sm_scale is not None else dim ** -0.5
        self.config = config or default_config(dim)
        if self.config.block_n < MIN_TILE_ROWS or self.config.block_n & (self.config.block_n - 1):
            raise ValueError(f"block_n={self.config.block_n} must be a power of two >= {MIN_TILE_ROWS}")
        self.block_n = min(self.config.block_n, max(MIN_TILE_ROWS, triton.next_power_of_2(kv.page_size)))
        self.record_importance = record_importance
        device = kv.device
        self._fixed_splits = num_splits
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        self._sms = sms
        self.page_table = torch.zeros(max_batch, max_pages, dtype=torch.int32, device=device)
        self.staged_rank = torch.full((max_batch, max_pages), -1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        rows = max(b * heads * self._splits_for(b) for b in range(1, max_batch + 1))
        value_rot = kv.formats.config.value_rotation == "hadamard"
        self._part_m = torch.empty(rows, self.group, device=device)
        self._part_l = torch.empty(rows, self.group, device=device)
        self._part_acc = torch.empty(rows, (1 + value_rot) * self.group * dim, device=device)
        self._fixed_staged_cap = max_staged_pages
        self._alloc_staged(max_staged_pages or 1)
        data = kv.data
        self._u8, self._u32, self._f32, self._kv = data, kv.typed(torch.int32), kv.typed(torch.float32), kv.typed(kv.dtype)
        self._had = hadamard_matrix(dim, device)
        key_rot = kv.formats.config.key_rotation == "hadamard"
        vec = lambda: torch.empty(max_batch, num_q_heads, dim, device=device)          # noqa: E731
        self._q32, self._q_rot = (vec(), vec()) if key_rot else (None, None)
        self._o_rot, self._o_st, self._o_fin = (vec(), vec(), vec()) if value_rot else (None, None, None)
        self.batch, self.num_splits = 0, 1
        self.split_kernel = split_kernel
        if self.split_kernel not in SPLIT_KERNELS:
            raise ValueError(f"split_kernel={self.split_kernel!r}; allowed: {', '.join(SPLIT_KERNELS)}")
        self._cuda = None
        if self.split_kernel == "cuda" and device.type == "cuda":
            from diffkv_sglang.kernels.cuda_decode import split_for

            self._cuda = split_for(kv, self.group)

    def _splits_for(self, batch: int) -> int:
        """Split-K factor of a ``batch``-request plan: a function of the batch size and the device only, never of
        the plan's capacities, so a request's splits (hence its float32 summation order) are the same in the
        growing eager wrapper and in a fixed-capacity CUDA-graph wrapper at the same batch size. Splits past a
        short request's last page exit at once."""
        if self._fixed_splits is not None:
            return self._fixed_splits
        pairs = batch * self.kv.num_kv_heads
        per_sm = (self.config.programs_per_sm if pairs <= NARROW_PAIRS_PER_SM * self._sms
                  else self.config.wide_programs_per_sm)
        wanted = triton.cdiv(per_sm * self._sms, pairs)
        return max(1, min(wanted, MAX_SPLITS))

    def _alloc_staged(self, cap: int) -> None:
        kv, device = self.kv, self.kv.device
        self.staged_cap = cap
        self.staged_pos = torch.full((self.max_batch, cap), -1, dtype=torch.int32, device=device)
        self._logits = torch.empty(self.max_batch * kv.num_kv_heads * cap * kv.page_size * self.group,
                                   device=device)

    def plan(self, page_table: torch.Tensor, seq_lens: torch.Tensor, check: bool = True) -> None:
        """Fill the per-batch buffers.

        Args:
            page_table: ``[B, n]`` int logical pages of each request in token order (token ``t`` in column
                ``t // page_size``; columns past a request's last page are ignored).
            seq_lens: ``[B]`` int tokens per request, the new token included.
            check: verify the table covers ``seq_lens`` and the staged-page capacity (host syncs).
        """
        kv, page = self.kv, self.kv.page_size
        batch, cols = page_table.shape
        if batch > self.max_batch or cols > self.max_pages or seq_lens.shape != (batch,):
            raise ValueError(f"plan: page_table {tuple(page_table.shape)} / seq_lens {tuple(seq_lens.shape)} "
                             f"exceed max_batch={self.max_batch}, max_pages={self.max_pages} or disagree")
        page_table = page_table.to(kv.device, torch.int64)
        seq_lens = seq_lens.to(kv.device, torch.int64)
        pages_needed = (seq_lens + page - 1) // page
        if check and bool((pages_needed > cols).any()):
            raise ValueError("plan: some requests have fewer pages than their seq_lens need")
        in_request = torch.arange(cols, device=kv.device)[None, :] < pages_needed[:, None]
        staged = in_request & (kv.page_state[page_table] == PageState.STAGED)
        rank = torch.cumsum(staged, 1, dtype=torch.int64) - 1
        if self._fixed_staged_cap is None:
            most = int(staged.sum(1).max()) if batch else 0
            if most > self.staged_cap:
                self._alloc_staged(most)
        elif check and batch and int(staged.sum(1).max()) > self.staged_cap:
            raise ValueError(f"plan: a request has more than max_staged_pages={self.staged_cap} staged pages")
        cap = self.staged_cap
        rank = torch.where(staged & (rank < cap), rank, -1)
        self.page_table[:batch, :cols].copy_(page_table)
        self.staged_rank[:batch, :cols].copy_(rank)
        self.seq_lens[:batch].copy_(seq_lens)
        positions = torch.full((batch, cap + 1), -1, dtype=torch.int64, device=kv.device)
        column = torch.arange(cols, device=kv.device).expand(batch, cols)
        positions.scatter_(1, torch.where(rank >= 0, rank, cap), column)          # column cap: a dump
        self.staged_pos[:batch].copy_(positions[:, :cap])
        self.batch, self.num_splits = batch, self._splits_for(max(batch, 1))

    def run(self, q: torch.Tensor, layer: int, out: torch.Tensor | None = None,
            sm_scale: float | None = None) -> torch.Tensor:
        """Attention of ``q`` ``[B, Hq, D]`` over the planned batch in ``layer``; returns ``out`` ``[B, Hq, D]``
        (``q.dtype``; allocated only when not given) and accumulates staged-token importance. ``sm_scale``
        overrides the plan's softmax scale for this call (a kernel argument, not a compile-time constant)."""
        out = self.check_run(q, out)
        scale = self.sm_scale if sm_scale is None else sm_scale
        if self._cuda is not None and self._cuda.supports(layer, q):
            self._cuda.split(self, q, layer, scale)
            return self.merge(out, layer, self.num_splits)
        kv, batch, heads, dim = self.kv, self.batch, self.kv.num_kv_heads, self.kv.head_dim
        fmt = kv.formats[layer]
        consts = sealed_format_constants(fmt)
        q_rot = q
        if consts["KEY_ROT"]:
            self._q32[:batch].copy_(q)
            q_rot = self._q_rot[:batch]
            torch.mm(self._q32[:batch].view(-1, dim), self._had, out=q_rot.view(-1, dim))
        staged, cfg = kv.formats.staged, self.config
        group_block = triton.next_power_of_2(self.group)
        parts = 2 if q.dtype == torch.float32 else 1
        _decode_split_kernel[(batch, heads, self.num_splits)](
            q, q.stride(0), q.stride(1), q_rot, q_rot.stride(0), q_rot.stride(1),
            self._u8, self._u32, self._kv,
            kv.block_offset, kv.page_state, kv.tier_counts,
            self.page_table, self.staged_rank, self.max_pages, self.seq_lens,
            self._part_m, self._part_l, self._part_acc, self._logits,
            layer, self.staged_cap, scale * math.log2(math.e),
            BLOCK_G=max(16, group_block), BLOCK_N=self.block_n, CHUNKS=triton.cdiv(kv.page_size, self.block_n),
            KG=max(consts["KEY_GROUPS"]), VG=max(consts["VALUE_GROUPS"]),
            KV_ELEMENT_BYTES=staged.element_bytes, KV_VALUES_START=staged.values_elements,
            PARTS=parts, STAGED_IEEE=parts == 2 or kv.dtype == torch.float32, UNROLL=cfg.unroll,
            CHANNEL_KEYS=any(consts["KEY_CHANNEL"]), TOKEN_KEYS=not all(consts["KEY_CHANNEL"][:consts["T"]]),
            num_warps=cfg.num_warps, **self._shape_constants(), **consts,
            **({} if cfg.maxnreg is None else {"maxnreg": cfg.maxnreg}))
        return self.merge(out, layer, self.num_splits)

    def _shape_constants(self) -> dict:
        """The compile-time shape arguments both kernels share."""
        kv = self.kv
        return dict(NUM_LAYERS=kv.num_layers, NUM_KV_HEADS=kv.num_kv_heads, G=self.group, D=kv.head_dim,
                    P=kv.page_size, MIN_PAGES=self.config.min_pages_per_split)

    def check_run(self, q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """Check ``q`` ``[B, Hq, D]`` against the planned batch; returns ``out`` ``[B, Hq, D]`` (``q.dtype``, allocated
        only when not given)."""
        batch, dim = self.batch, self.kv.head_dim
        if batch == 0:
            raise RuntimeError("call plan() with a non-empty batch before run()")
        if q.shape != (batch, self.num_q_heads, dim) or q.stride(-1) != 1 or q.device != self._u8.device:
            raise ValueError(f"q {tuple(q.shape)} on {q.device}: expected ({batch}, {self.num_q_heads}, {dim}), "
                             f"last dim contiguous, on {self.kv.device}")
        if out is None:
            return torch.empty_like(q)
        if out.shape != q.shape or out.stride(-1) != 1:
            raise ValueError(f"out {tuple(out.shape)}: expected {tuple(q.shape)} with a contiguous last dim")
        return out

    def merge(self, out: torch.Tensor, layer: int, num_splits: int) -> torch.Tensor:
        """Combine the ``num_splits`` splits a split kernel wrote to the workspace into ``out`` ``[B, Hq, D]`` (undoing
        value rotation) and record staged-token importance; returns ``out``. The split kernel must have used this
        plan's split ranges for ``num_splits`` (see ``_decode_split_kernel``)."""
        kv, batch, heads, dim = self.kv, self.batch, self.kv.num_kv_heads, self.kv.head_dim
        value_rot = kv.formats[layer].value_rotation == "hadamard"         # sealed_format_constants' VALUE_ROT
        target = self._o_rot[:batch] if value_rot else out
        staged = kv.formats.staged
        _decode_merge_kernel[(batch, heads)](
            target, target.stride(0), target.stride(1), self._o_st if value_rot else target,
            self._part_m, self._part_l, self._part_acc, self._logits,
            self.page_table, self.max_pages, self.staged_pos, self.seq_lens,
            kv.page_state, kv.block_offset, self._f32,
            layer, num_splits, self.staged_cap,
            BLOCK_G=triton.next_power_of_2(self.group), BLOCK_P=triton.next_power_of_2(kv.page_size),
            SCORE_START=staged.score_start, SEEN_START=staged.seen_start, VALUE_ROT=value_rot,
            RECORD=self.record_importance, num_warps=4, **self._shape_constants())
        if value_rot:
            fin = self._o_fin[:batch].view(-1, dim)
            torch.addmm(self._o_st[:batch].view(-1, dim), self._o_rot[:batch].view(-1, dim), self._had, out=fin)
            out.copy_(self._o_fin[:batch])
        return out
