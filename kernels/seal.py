"""Seal kernel: quantize, pack and write sealed blocks, one launch for every block of one format.

The kernel writes exactly the bytes :func:`diffkv_sglang.quant.write_sealed_blocks` writes (codes, float16
scale/zero with the zero rounded down and the scale rounded up, per token and group or, for the keys of a tier
with per-channel keys, per channel of the block; round-half-even codes with saturation, per-block power-of-two
meta scales over the kept tokens, token indices) and leaves every other byte alone, padding included. It reads
the dense K/V either from ``[n, P, D]`` tensors or straight from the staged blocks in the arena. Launcher:
:func:`seal_blocks`.

One program seals one block (one page, layer and KV head), ``ROWS`` tokens at a time (the whole page when it fits
the tile; else a first pass for the meta scales and per-channel key extremes, and a second for the rest)::

    tier  [P]     int8, -1 = pruned                        -> counts n0..n3, section starts, each token's rank
    K, V  [P, D]  model dtype, from tensors or staged       -> float32, Hadamard-rotated if the format says
    per kind (keys, values):
        m      = quant.meta_scale(max |x| over kept tokens)      (frexp from the float bits)
        q      = x / m                                            (exact: multiplication by a power of two)
        lo, hi = min, max of q over the finest groups of all tiers (once)
        per tier t: zero = fp16_down(lo), scale = fp16_up((hi - zero) / qmax_t) over the tier's groups;
                    store the (scale, zero) words of the tier's tokens
        keys of a per-channel tier t (KEY_CHANNEL[t], quant.quantize_channels), instead:
                    lo, hi = min, max per channel of x over the tier's tokens of the block   [TIERS, D] tile
                             (row t), then divided by m (exact and monotonic, so the extremes of q)
                    zero, scale as above per channel; if n_t > 0, store the D (scale, zero) words at the
                    tier's key meta section
        codes  = round_half_even(min((q - zero) / scale, qmax))   with each token's own tier's zero and scale
        per tier t: pack codes into little-endian int32 words, store the rows of the tier's tokens
    meta scales (float32 keys, values), uint8 token index rows, counts

The per-channel code sits behind ``tl.constexpr`` branches on ``KEY_CHANNEL``: for formats without such tiers
the compiled kernel is the token-only one, instruction for instruction.

Section starts come only from :meth:`BlockFormat.section_coefficients`, as ``tl.constexpr`` tuples through
:mod:`diffkv_sglang.kernels.block_read`, the same encoding the decode and dense-read kernels read.

Exactness. Every float operation is the one the reference does, correctly rounded: divisions use
``tl.math.div_rn`` (Triton's ``/`` is an approximate division on NVIDIA GPUs), the division by the power-of-two
meta scale is an exact multiplication (two, for block maxima below 2^-127), round-half-even adds and subtracts
2^23, and launches pass ``enable_fp_fusion=False`` so no multiply-add is contracted. The reference defines every
byte bit for bit on any device, and the kernel follows the same definitions:

* Hadamard rotation: ``quant.rotate`` is a fast Walsh-Hadamard transform in a fixed butterfly order, then a
  multiplication by ``quant.hadamard_scale(D)`` (``float32(1 / sqrt(D))``); the kernel does the same stages.
* Signed zeros: ``quant.quantize`` and ``quant.quantize_channels`` add ``+0.0`` before the min/max, so a -0.0
  extreme is stored as +0.0; the kernel does the same.
* Scale division: ``quant._minmax_codes`` divides ``(max - zero)`` by a tensor (correctly rounded on CUDA too),
  as the kernel's ``div_rn`` does.

Limits: ``head_dim`` must be a power of two (tiles are ``[ROWS, D]``); code widths 2, 4 or 8 bits.

Speed (H100, Triton 3.6, ``benchmarks/kernels_gpu.py``): the kernel is bound by instruction issue (about 60
instructions per element: the exact divisions, per-tier packing and masked stores), not by memory, so it
reaches a fraction of the copy bandwidth; ``maxnreg=64`` raises occupancy from 3 to 4 programs per SM.
"""


from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffkv_sglang.config import MAX_TIERS
from diffkv_sglang.format import BlockFormat, hadamard_scale
from diffkv_sglang.kernels.block_read import meta_scale_start, section_start, sealed_format_constants, tier_count

__all__ = ["seal_blocks", "SEAL_CONFIG"]

TIERS = tl.constexpr(MAX_TIERS)                 # rows of the per-channel tiles (tier t: row t)
PER_TOKEN = tl.constexpr((False,) * MAX_TIERS)  # values are quantized per token in every tier

SEAL_CONFIG = {"tile_elements": 4096, "elements_per_warp": 512, "max_warps": 8, "max_registers": 64}
"""A program quantizes ``ROWS = tile_elements / head_dim`` tokens at a time (at most ``next_pow2(P)``; a page that
fits is loaded once, a larger one in two passes), with one warp per ``elements_per_warp`` tile elements (1 to
``max_warps``), and ``max_registers`` (Triton's ``maxnreg``; None leaves it to the compiler). Measured on an H100
(Triton 3.6, 16384 blocks, 30/50/20 mix): whole 32-token pages beat 8- and 16-row chunks, 8 warps beat 4 and 16
at head_dim 128, and 64 registers beat the compiler's 80 (760 vs 683 GB/s; rotated 604 vs 441)."""



# ------------------------------------------------------------------------------------- device helpers
@triton.jit
def _fp16_round_down(x):
    """float32 ``x`` -> (float16 bits as int32 in [0, 0xFFFF], that float16 value as float32): the largest
    float16 <= x (``quant._fp16_round_down``)."""
    h = x.to(tl.float16)
    bits = h.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    step = tl.where((bits & 0x7FFF) == 0, 0x8001, tl.where((bits & 0x8000) == 0, bits - 1, bits + 1))
    bits = tl.where(h.to(tl.float32) > x, step, bits)
    return bits, bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _fp16_round_up(x):
    """float32 ``x`` -> (bits, value) of the smallest float16 >= x (``quant._fp16_round_up``)."""
    h = x.to(tl.float16)
    bits = h.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    step = tl.where((bits & 0x7FFF) == 0, 0x0001, tl.where((bits & 0x8000) == 0, bits + 1, bits - 1))
    bits = tl.where(h.to(tl.float32) < x, step, bits)
    return bits, bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _pow2(e):
    """Exact float32 ``2^e`` for int32 ``e`` in [-149, 127] (subnormal below -126)."""
    normal = (tl.maximum(e, -126) + 127) << 23
    subnormal = 1 << (tl.minimum(tl.maximum(e, -149), -127) + 149)
    return tl.where(e >= -126, normal, subnormal).to(tl.float32, bitcast=True)


@triton.jit
def _frexp_exponent(a):
    """``torch.frexp(a)[1]`` for finite float32 ``a > 0``: ``a = f * 2^e`` with ``f`` in [0.5, 1)."""
    biased = (a.to(tl.int32, bitcast=True) >> 23) & 0xFF
    scaled = tl.where(biased == 0, a, 0.0) * 18446744073709551616.0      # subnormals: exact a * 2^64
    scaled = (scaled.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return tl.where(biased == 0, scaled - 126 - 64, biased - 126)


@triton.jit
def _chunk_ranks(tier, seen, t: tl.constexpr):
    """Ranks of a chunk's tokens of tier ``t`` (``seen`` of them in earlier chunks) and the new ``seen``."""
    member = (tier == t).to(tl.int32)
    return seen + tl.cumsum(member, axis=0) - member, seen + tl.sum(member, axis=0)


@triton.jit
def _hadamard(x, ROWS: tl.constexpr, D: tl.constexpr, LOG2_D: tl.constexpr, SCALE: tl.constexpr):
    """Fast Walsh-Hadamard transform of each row of ``x`` ``[ROWS, D]`` float32, butterfly order of
    ``quant.rotate``, then times ``SCALE``. Stage ``h`` views a row as ``[D / 2h, 2, h]`` and
    replaces the pair axis ``(a, b)`` by ``(a + b, a - b)``: sums over that axis of ``x`` and of ``x * (1, -1)``
    (exact: one addition each), so no stage moves data between threads beyond the pair it adds."""
    for s in tl.static_range(LOG2_D):
        pairs = tl.reshape(x, (ROWS, D // (2 << s), 2, 1 << s))
        second = tl.arange(0, 2)[None, None, :, None] == 1
        total = tl.sum(pairs, axis=2)[:, :, None, :]
        difference = tl.sum(tl.where(second, -pairs, pairs), axis=2)[:, :, None, :]
        x = tl.reshape(tl.where(second, difference, total), (ROWS, D))
    return x * SCALE


@triton.jit
def _load_rows(src, p, P: tl.constexpr, D: tl.constexpr, ROTATE: tl.constexpr, LOG2_D: tl.constexpr,
               HAD_SCALE: tl.constexpr, ROWS: tl.constexpr):
    """Tokens ``p`` ``[ROWS]`` of one block's keys or values (``src`` points at token 0) as float32
    ``[ROWS, D]``, rotated if ``ROTATE``."""
    d = tl.arange(0, D)
    x = tl.load(src + p[:, None] * D + d[None, :], mask=(p < P)[:, None], other=0.0).to(tl.float32)
    if ROTATE:
        x = _hadamard(x, ROWS, D, LOG2_D, HAD_SCALE)
    return x


@triton.jit
def _meta_scale(amax):
    """``quant.meta_scale(amax)`` and the two factors that divide by it exactly: ``x / m == (x * pre) * inv``
    (``inv = 2^-e``, or ``2^-e-64`` after a lossless ``pre = 2^64`` where ``2^-e`` would overflow)."""
    e = tl.minimum(_frexp_exponent(amax), 127)
    m = tl.where(amax > 0, _pow2(e), 1.0)
    tiny = (amax > 0) & (e < -127)
    inv = _pow2(-tl.where(amax > 0, tl.where(tiny, e + 64, e), 0))
    return m, tl.where(tiny, 18446744073709551616.0, 1.0), inv


@triton.jit
def _minmax_params(lo, hi, qmax):
    """Zero point (rounded down) and scale (rounded up) of the grids spanning ``[lo, hi]`` with ``qmax`` steps
    (float32 tensors of one shape, signed zeros already made positive; ``quant._minmax_codes``). Returns the
    stored words ``scale | zero << 16`` (int32), the zero and the divisor (the scale, or 1 where it is 0)."""
    zero_bits, zero = _fp16_round_down(lo)
    scale_bits, scale = _fp16_round_up(tl.math.div_rn(hi - zero, qmax))
    divisor = tl.where(scale > 0, scale, 1.0)
    return scale_bits | (zero_bits << 16), zero, divisor


@triton.jit
def _tier_params(lo, hi, ROWS: tl.constexpr, GF: tl.constexpr, G: tl.constexpr, QMAX: tl.constexpr):
    """Zero point (rounded down) and scale (rounded up) of a tier with ``G`` groups (``quant.quantize``), from the
    min/max ``lo``, ``hi`` ``[ROWS, GF]`` of the ``GF >= G`` finest groups. Returns the stored words
    ``scale | zero << 16`` ``[ROWS, G]`` and zero and divisor (the scale, or 1 where it is 0) per fine group."""
    lo = tl.min(tl.reshape(lo, (ROWS, G, GF // G)), axis=2) + 0.0      # + 0.0: a -0.0 extreme becomes +0.0
    hi = tl.max(tl.reshape(hi, (ROWS, G, GF // G)), axis=2) + 0.0
    words, zero, divisor = _minmax_params(lo, hi, tl.full((ROWS, G), QMAX, tl.float32))
    zero = tl.reshape(tl.broadcast_to(zero[:, :, None], (ROWS, G, GF // G)), (ROWS, GF))
    divisor = tl.reshape(tl.broadcast_to(divisor[:, :, None], (ROWS, G, GF // G)), (ROWS, GF))
    return words, zero, divisor


@triton.jit
def _channel_extremes(x, tier, lo, hi, CHANNEL: tl.constexpr, NUM_TIERS: tl.constexpr):
    """``lo``, ``hi`` ``[TIERS, D]`` (row ``t``: tier ``t``) updated with the per-channel min and max of the rows of
    ``x`` ``[ROWS, D]`` (tokens' tiers ``tier`` ``[ROWS]``) of each tier whose keys are per channel (``CHANNEL``);
    the other rows are kept."""
    row = tl.arange(0, TIERS)[:, None]
    for t in tl.static_range(NUM_TIERS):
        if CHANNEL[t]:
            member = (tier == t)[:, None]
            lo = tl.where(row == t, tl.minimum(lo, tl.min(tl.where(member, x, float("inf")), axis=0)[None, :]), lo)
            hi = tl.where(row == t, tl.maximum(hi, tl.max(tl.where(member, x, float("-inf")), axis=0)[None, :]), hi)
    return lo, hi


@triton.jit
def _channel_params(lo, hi, pre, inv, n0, n1, n2, n3, block_i32, BITS: tl.constexpr, META_SEC: tl.constexpr,
                    CHANNEL: tl.constexpr, NUM_TIERS: tl.constexpr, D: tl.constexpr):
    """Per-channel zero points and scales of the tiers with per-channel keys (``quant.quantize_channels``), from
    the extremes ``lo``, ``hi`` ``[TIERS, D]`` of each tier's keys over the block (:func:`_channel_extremes`,
    before the division by the meta scale ``x / m == (x * pre) * inv``). Stores the ``D`` (scale, zero) words of
    each such non-empty tier at its key meta section; returns zero and divisor ``[TIERS, D]`` (rows of the other
    tiers are meaningless)."""
    row = tl.arange(0, TIERS)
    qmax = tl.full((TIERS,), 1.0, tl.float32)
    meta_word = tl.zeros((TIERS,), tl.int32)
    store = tl.zeros((TIERS,), dtype=tl.int1)
    for t in tl.static_range(NUM_TIERS):
        if CHANNEL[t]:
            qmax = tl.where(row == t, (1 << BITS[t]) - 1, qmax)
            meta_word = tl.where(row == t, section_start(n0, n1, n2, n3, META_SEC, t) // 4, meta_word)
            store = store | ((row == t) & (tier_count(n0, n1, n2, n3, t) > 0))
    # the division by m is exact and monotonic: the extremes of x / m are those of x, divided. + 0.0: -0.0 -> +0.0
    lo = (lo * pre) * inv + 0.0
    hi = (hi * pre) * inv + 0.0
    words, zero, divisor = _minmax_params(lo, hi, tl.broadcast_to(qmax[:, None], (TIERS, D)))
    tl.store(block_i32 + meta_word[:, None] + tl.arange(0, D)[None, :], words, mask=store[:, None])
    return zero, divisor


@triton.jit
def _tier_row(x, t: tl.constexpr):
    """Row ``t`` of ``x`` ``[TIERS, D]`` float32 as ``[D]`` (exact: a max against -inf)."""
    return tl.max(tl.where(tl.arange(0, TIERS)[:, None] == t, x, float("-inf")), axis=0)


@triton.jit
def _pack(codes, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """``[ROWS, D]`` int32 codes -> ``[ROWS, D * BITS / 32]`` little-endian int32 words (``pack_codes``)."""
    shifts = tl.arange(0, 32 // BITS) * BITS
    fields = tl.reshape(codes, (ROWS, D * BITS // 32, 32 // BITS)).to(tl.uint32) << shifts[None, None, :].to(tl.uint32)
    return tl.sum(fields, axis=2).to(tl.int32, bitcast=True)      # disjoint bit fields: their sum is their OR


@triton.jit
def _store_rows(block_i32, first_word, rank, member, rows, WORDS: tl.constexpr):
    """Store ``rows`` ``[ROWS, WORDS]`` int32 of the member tokens at word ``first_word + rank * WORDS`` of the
    block (int32 offsets from the block's start)."""
    w = tl.arange(0, WORDS)
    tl.store(block_i32 + first_word + rank[:, None] * WORDS + w[None, :], rows, mask=member[:, None])


@triton.jit
def _seal_rows(q, tier, rank, n0, n1, n2, n3, block_i32, channel_zero, channel_divisor,
               CODE_SEC: tl.constexpr, META_SEC: tl.constexpr, BITS: tl.constexpr, GROUPS: tl.constexpr,
               GF: tl.constexpr, CHANNEL: tl.constexpr, NUM_TIERS: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr):
    """Quantize rows ``q`` ``[ROWS, D]`` (already divided by the meta scale) with each token's tier and write their
    code rows and (scale, zero) rows at the tokens' ``rank`` within their tier (``quant.quantize`` +
    ``pack_codes``). Min and max are taken once over the ``GF`` finest groups of all tiers; per tier only the
    group parameters are computed, and each element is divided once, by its own tier's scale. The tiers flagged
    in ``CHANNEL`` take the block's per-channel zero and divisor instead (``channel_zero``, ``channel_divisor``
    ``[TIERS, D]`` from :func:`_channel_params`, which stores their words; unused without such tiers)."""
    fine = tl.reshape(q, (ROWS, GF, D // GF))
    lo = tl.min(fine, axis=2)
    hi = tl.max(fine, axis=2)
    zero = tl.zeros((ROWS, GF), dtype=tl.float32)
    divisor = tl.full((ROWS, GF), 1.0, tl.float32)       # rows of no tier (pruned) divide by 1
    qmax = tl.zeros((ROWS, 1), dtype=tl.float32)
    for t in tl.static_range(NUM_TIERS):
        member = tier == t
        if not CHANNEL[t]:
            words, zero_t, divisor_t = _tier_params(lo, hi, ROWS, GF, GROUPS[t], (1 << BITS[t]) - 1)
            meta_word = section_start(n0, n1, n2, n3, META_SEC, t) // 4
            _store_rows(block_i32, meta_word, rank, member, words, GROUPS[t])
            zero = tl.where(member[:, None], zero_t, zero)
            divisor = tl.where(member[:, None], divisor_t, divisor)
        qmax = tl.where(member[:, None], (1 << BITS[t]) - 1, qmax)
    zero = tl.reshape(tl.broadcast_to(zero[:, :, None], (ROWS, GF, D // GF)), (ROWS, D))
    divisor = tl.reshape(tl.broadcast_to(divisor[:, :, None], (ROWS, GF, D // GF)), (ROWS, D))
    for t in tl.static_range(NUM_TIERS):
        if CHANNEL[t]:
            member = (tier == t)[:, None]
            zero = tl.where(member, _tier_row(channel_zero, t)[None, :], zero)
            divisor = tl.where(member, _tier_row(channel_divisor, t)[None, :], divisor)
    # q >= zero, so y >= 0; where the scale is 0 the group is constant and y = 0. Round half to even: adding and
    # subtracting 2^23 rounds y (< 2^23) to an integer in round-to-nearest-even float32 arithmetic.
    y = tl.minimum(tl.math.div_rn(q - zero, divisor), qmax)
    codes = ((y + 8388608.0) - 8388608.0).to(tl.int32)
    for t in tl.static_range(NUM_TIERS):
        code_word = section_start(n0, n1, n2, n3, CODE_SEC, t) // 4
        _store_rows(block_i32, code_word, rank, tier == t, _pack(codes, ROWS, D, BITS[t]), D * BITS[t] // 32)


@triton.jit
def _kept_max(x, kept):
    """max |x| over the rows where ``kept``."""
    return tl.max(tl.max(tl.where(kept[:, None], tl.abs(x), 0.0), axis=1), axis=0)


@triton.jit
def _seal_chunk(keys, values, tier, p, seen0, seen1, seen2, seen3, key_pre, key_inv, value_pre, value_inv,
                channel_zero, channel_divisor, n0, n1, n2, n3, block_i32, block_u8,
                KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, KEY_GROUPS: tl.constexpr, VALUE_GROUPS: tl.constexpr,
                KEY_GF: tl.constexpr, VALUE_GF: tl.constexpr, KEY_CHANNEL: tl.constexpr, KEY_SEC: tl.constexpr,
                VALUE_SEC: tl.constexpr, KEY_META_SEC: tl.constexpr, VALUE_META_SEC: tl.constexpr,
                INDEX_SEC: tl.constexpr, NUM_TIERS: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr):
    """Quantize and write the rows of tokens ``p`` (tiers ``tier``, K/V ``[ROWS, D]`` float32, rotated): codes,
    (scale, zero) rows and token indices; the keys of the ``KEY_CHANNEL`` tiers with the block's per-channel
    ``channel_zero``, ``channel_divisor`` ``[TIERS, D]``. ``seen0..3`` count each tier's tokens in earlier chunks;
    returns them updated."""
    rank, seen0 = _chunk_ranks(tier, seen0, 0)                 # each token's row within its tier
    if NUM_TIERS > 1:
        rank_t, seen1 = _chunk_ranks(tier, seen1, 1)
        rank = tl.where(tier == 1, rank_t, rank)
    if NUM_TIERS > 2:
        rank_t, seen2 = _chunk_ranks(tier, seen2, 2)
        rank = tl.where(tier == 2, rank_t, rank)
    if NUM_TIERS > 3:
        rank_t, seen3 = _chunk_ranks(tier, seen3, 3)
        rank = tl.where(tier == 3, rank_t, rank)
    kept = (tier >= 0)[:, None]
    q = tl.where(kept, (keys * key_pre) * key_inv, 0.0)        # x / m exactly
    _seal_rows(q, tier, rank, n0, n1, n2, n3, block_i32, channel_zero, channel_divisor, KEY_SEC, KEY_META_SEC,
               KEY_BITS, KEY_GROUPS, KEY_GF, KEY_CHANNEL, NUM_TIERS, ROWS, D)
    q = tl.where(kept, (values * value_pre) * value_inv, 0.0)
    _seal_rows(q, tier, rank, n0, n1, n2, n3, block_i32, None, None, VALUE_SEC, VALUE_META_SEC, VALUE_BITS,
               VALUE_GROUPS, VALUE_GF, PER_TOKEN, NUM_TIERS, ROWS, D)
    for t in tl.static_range(NUM_TIERS):
        index = section_start(n0, n1, n2, n3, INDEX_SEC, t)
        tl.store(block_u8 + index + rank, p.to(tl.uint8), mask=tier == t)
    return seen0, seen1, seen2, seen3


# --------------------------------------------------------------------------------------------- kernel
@triton.jit
def _seal_kernel(
    data_u8, data_i32,                      # the arena: uint8 and int32 views of the same bytes
    K, V,                                   # key / value sources (tensors [n, P, D], or the arena in the model dtype)
    src_offsets,                            # [n] int64 staged block byte offsets (used when STAGED)
    tiers,                                  # [n, P] int8
    dst_offsets,                            # [n] int64 sealed block byte offsets
    counts_out,                             # [n, T] int64
    P: tl.constexpr, BLOCK_P: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, LOG2_D: tl.constexpr,
    T: tl.constexpr,                        # the format (block_read.sealed_format_constants), tiers padded to 4
    KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, KEY_GROUPS: tl.constexpr, VALUE_GROUPS: tl.constexpr,
    KEY_SEC: tl.constexpr, VALUE_SEC: tl.constexpr, KEY_META_SEC: tl.constexpr, VALUE_META_SEC: tl.constexpr,
    INDEX_SEC: tl.constexpr, META_SCALE_SEC: tl.constexpr, KEY_CHANNEL: tl.constexpr, CODE_ALIGN: tl.constexpr,
    KEY_ROT: tl.constexpr, VALUE_ROT: tl.constexpr,
    KEY_GF: tl.constexpr, VALUE_GF: tl.constexpr,           # finest group count over the tiers
    HAD_SCALE: tl.constexpr, STAGED: tl.constexpr, ELEMENT_BYTES: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    p_all = tl.arange(0, BLOCK_P)
    tier_all = tl.load(tiers + b * P + p_all, mask=p_all < P, other=-1).to(tl.int32)     # tier counts n0..n3
    n0 = tl.sum((tier_all == 0).to(tl.int32), axis=0)
    n1 = tl.sum((tier_all == 1).to(tl.int32), axis=0)
    n2 = tl.sum((tier_all == 2).to(tl.int32), axis=0)
    n3 = tl.sum((tier_all == 3).to(tl.int32), axis=0)
    dst = tl.load(dst_offsets + b)                             # a multiple of 16
    block_u8 = data_u8 + dst
    block_i32 = data_i32 + dst // 4
    if STAGED:
        key_src = K + tl.multiple_of(tl.load(src_offsets + b) // ELEMENT_BYTES, 16 // ELEMENT_BYTES)  # 16 B aligned
        value_src = key_src + P * D
    else:
        key_src = K + b * (P * D)
        value_src = V + b * (P * D)
    seen0 = n0 * 0                                             # tokens of each tier in earlier chunks
    seen1 = n0 * 0
    seen2 = n0 * 0
    seen3 = n0 * 0
    key_lo = tl.full((TIERS, D), float("inf"), tl.float32)     # per-channel key extremes of the KEY_CHANNEL tiers
    key_hi = tl.full((TIERS, D), float("-inf"), tl.float32)
    if ROWS >= BLOCK_P:
        # the whole page in registers: one load, max |x| over the kept tokens -> meta scales, quantize
        p = tl.arange(0, ROWS)
        tier = tl.load(tiers + b * P + p, mask=p < P, other=-1).to(tl.int32)
        keys = _load_rows(key_src, p, P, D, KEY_ROT, LOG2_D, HAD_SCALE, ROWS)
        values = _load_rows(value_src, p, P, D, VALUE_ROT, LOG2_D, HAD_SCALE, ROWS)
        key_scale, key_pre, key_inv = _meta_scale(_kept_max(keys, tier >= 0))
        value_scale, value_pre, value_inv = _meta_scale(_kept_max(values, tier >= 0))
        key_lo, key_hi = _channel_extremes(keys, tier, key_lo, key_hi, KEY_CHANNEL, T)
        channel_zero, channel_divisor = _channel_params(key_lo, key_hi, key_pre, key_inv, n0, n1, n2, n3, block_i32,
                                                        KEY_BITS, KEY_META_SEC, KEY_CHANNEL, T, D)
        _seal_chunk(keys, values, tier, p, seen0, seen1, seen2, seen3, key_pre, key_inv, value_pre, value_inv,
                    channel_zero, channel_divisor, n0, n1, n2, n3, block_i32, block_u8, KEY_BITS, VALUE_BITS,
                    KEY_GROUPS, VALUE_GROUPS, KEY_GF, VALUE_GF, KEY_CHANNEL, KEY_SEC, VALUE_SEC, KEY_META_SEC,
                    VALUE_META_SEC, INDEX_SEC, T, ROWS, D)
    else:
        # pass 1: max |x| over the kept tokens, ROWS tokens at a time -> meta scales; per-channel key extremes
        key_max = tl.zeros((ROWS, D), dtype=tl.float32)
        value_max = tl.zeros((ROWS, D), dtype=tl.float32)
        for c in range(0, BLOCK_P, ROWS):
            p = c + tl.arange(0, ROWS)
            tier = tl.load(tiers + b * P + p, mask=p < P, other=-1)
            kept = (tier >= 0)[:, None]
            x = _load_rows(key_src, p, P, D, KEY_ROT, LOG2_D, HAD_SCALE, ROWS)
            key_max = tl.maximum(key_max, tl.where(kept, tl.abs(x), 0.0))
            key_lo, key_hi = _channel_extremes(x, tier, key_lo, key_hi, KEY_CHANNEL, T)
            x = _load_rows(value_src, p, P, D, VALUE_ROT, LOG2_D, HAD_SCALE, ROWS)
            value_max = tl.maximum(value_max, tl.where(kept, tl.abs(x), 0.0))
        key_scale, key_pre, key_inv = _meta_scale(tl.max(tl.max(key_max, axis=1), axis=0))
        value_scale, value_pre, value_inv = _meta_scale(tl.max(tl.max(value_max, axis=1), axis=0))
        channel_zero, channel_divisor = _channel_params(key_lo, key_hi, key_pre, key_inv, n0, n1, n2, n3, block_i32,
                                                        KEY_BITS, KEY_META_SEC, KEY_CHANNEL, T, D)
        # pass 2: load again (from L1/L2 by now), quantize and write
        for c in range(0, BLOCK_P, ROWS):
            p = c + tl.arange(0, ROWS)
            tier = tl.load(tiers + b * P + p, mask=p < P, other=-1).to(tl.int32)
            keys = _load_rows(key_src, p, P, D, KEY_ROT, LOG2_D, HAD_SCALE, ROWS)
            values = _load_rows(value_src, p, P, D, VALUE_ROT, LOG2_D, HAD_SCALE, ROWS)
            seen0, seen1, seen2, seen3 = _seal_chunk(
                keys, values, tier, p, seen0, seen1, seen2, seen3, key_pre, key_inv, value_pre, value_inv,
                channel_zero, channel_divisor, n0, n1, n2, n3, block_i32, block_u8, KEY_BITS, VALUE_BITS, KEY_GROUPS,
                VALUE_GROUPS, KEY_GF, VALUE_GF, KEY_CHANNEL, KEY_SEC, VALUE_SEC, KEY_META_SEC, VALUE_META_SEC,
                INDEX_SEC, T, ROWS, D)

    # meta scales: float32 (keys, values) right before the index section
    meta_word = meta_scale_start(n0, n1, n2, n3, META_SCALE_SEC) // 4
    pair = tl.arange(0, 2)
    tl.store(block_i32 + meta_word + pair, tl.where(pair == 0, key_scale, value_scale).to(tl.int32, bitcast=True))
    tl.store(counts_out + b * T, n0.to(tl.int64))
    if T > 1:
        tl.store(counts_out + b * T + 1, n1.to(tl.int64))
    if T > 2:
        tl.store(counts_out + b * T + 2, n2.to(tl.int64))
    if T > 3:
        tl.store(counts_out + b * T + 3, n3.to(tl.int64))


# ------------------------------------------------------------------------------------------- launcher
def _format_constants(fmt: BlockFormat) -> dict:
    """The format as ``tl.constexpr`` kernel arguments: :func:`~.block_read.sealed_format_constants` (shared with the
    readers) plus the finest group counts and the Hadamard scale."""
    consts = sealed_format_constants(fmt)
    return dict(consts, KEY_GF=max(consts["KEY_GROUPS"]), VALUE_GF=max(consts["VALUE_GROUPS"]),
                HAD_SCALE=hadamard_scale(fmt.head_dim))


def seal_blocks(fmt: BlockFormat, data: torch.Tensor, source, tiers: torch.Tensor, dst_offsets: torch.Tensor,
                *, staged_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Quantize, pack and write ``n`` sealed blocks of one format in one launch (``quant.write_sealed_blocks``).

    Args:
        fmt: the blocks' format (one layer format; seal several layers sharing it in one call).
        data: the arena, flat uint8 ``[capacity]`` (capacity a multiple of 4), on the kernel's device.
        source: where the dense K/V are, either
            * ``(keys, values)``: two ``[n, P, D]`` tensors (float32, float16 or bfloat16, unrotated), or
            * ``[n]`` int64 byte offsets of staged blocks in ``data`` (``StagedBlockFormat`` layout in
              ``staged_dtype``: keys ``[P, D]`` then values ``[P, D]``). The staged bytes must not overlap any
              destination block: blocks are sealed in parallel.
        tiers: ``[n, P]`` integer tier per token (-1 = pruned); int8 avoids a conversion.
        dst_offsets: ``[n]`` int64 byte offsets of the sealed blocks, allocated with ``fmt.block_nbytes(counts)``
            (multiples of 16).
        staged_dtype: model dtype of staged blocks (only with offsets as ``source``).
    Returns:
        ``[n, T]`` int64 tier counts (what the descriptor table records), computed by the kernel.

    Only the blocks' data bytes are written; padding and every byte outside the blocks keep their values.

    Example (``CompressedKVStore._seal_chunk`` per format group, from its dense copy)::

        counts = tier_counts(tiers, fmt.num_tiers)                            # [n, T]
        dst = arena.allocate(slots, fmt.block_nbytes(counts))
        seal_blocks(fmt, arena.data, (keys, values), tiers, dst)             # == write_sealed_blocks(...)

    Reading staged blocks in place saves that copy, but the store frees them before it allocates (so sealing
    never runs out of memory) and a new block, or a compaction, may then land on their bytes: pass staged offsets
    only for destinations known not to overlap them (for instance allocated while the staged blocks are live).
    """
    device = data.device
    n, page, dim = dst_offsets.shape[0] if dst_offsets.dim() == 1 else -1, fmt.page_size, fmt.head_dim
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() % 4 or not data.is_contiguous():
        raise ValueError(f"data must be a contiguous 1-D uint8 tensor of a multiple of 4 bytes, got "
                         f"{data.dtype} {tuple(data.shape)}")
    if dst_offsets.dtype != torch.int64 or n < 0:
        raise ValueError(f"dst_offsets must be a 1-D int64 tensor, got {dst_offsets.dtype} {tuple(dst_offsets.shape)}")
    if tuple(tiers.shape) != (n, page) or tiers.is_floating_point():
        raise ValueError(f"tiers must be an integer [n={n}, page_size={page}] tensor, got {tiers.dtype} "
                         f"{tuple(tiers.shape)}")
    if dim & (dim - 1):
        raise NotImplementedError(f"the seal kernel needs a power-of-two head_dim, got {dim}")
    for name, tensor in (("dst_offsets", dst_offsets), ("tiers", tiers)):
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device}, the arena on {device}")
    if isinstance(source, torch.Tensor):
        if source.dtype != torch.int64 or tuple(source.shape) != (n,) or source.device != device:
            raise ValueError(f"staged offsets must be int64 [{n}] on {device}, got {source.dtype} "
                             f"{tuple(source.shape)} on {source.device}")
        if staged_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"staged_dtype must be float32, float16 or bfloat16, got {staged_dtype}")
        keys = values = data.view(staged_dtype)
        src_offsets, staged, element_bytes = source, True, keys.element_size()
    else:
        keys, values = source
        for name, x in (("keys", keys), ("values", values)):
            if tuple(x.shape) != (n, page, dim) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16) \
                    or x.device != device:
                raise ValueError(f"{name} must be float [n={n}, P={page}, D={dim}] on {device}, got {x.dtype} "
                                 f"{tuple(x.shape)} on {x.device}")
        keys, values = keys.contiguous(), values.contiguous()
        src_offsets, staged, element_bytes = dst_offsets, False, keys.element_size()
    counts = torch.empty(n, fmt.num_tiers, dtype=torch.int64, device=device)
    if n == 0:
        return counts
    block_p = triton.next_power_of_2(page)
    rows = min(block_p, max(1, SEAL_CONFIG["tile_elements"] // dim))
    warps = min(SEAL_CONFIG["max_warps"], max(1, rows * dim // SEAL_CONFIG["elements_per_warp"]))
    _seal_kernel[(n,)](
        data, data.view(torch.int32), keys, values, src_offsets, tiers.to(torch.int8).contiguous(), dst_offsets,
        counts,
        P=page, BLOCK_P=block_p, ROWS=rows, D=dim,
        LOG2_D=dim.bit_length() - 1, STAGED=staged, ELEMENT_BYTES=element_bytes,
        **_format_constants(fmt),
        num_warps=warps, maxnreg=SEAL_CONFIG["max_registers"], enable_fp_fusion=False,
    )
    return counts
