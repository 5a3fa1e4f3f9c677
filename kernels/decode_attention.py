"""Decode attention over the compressed store: flash-decoding over sealed (compressed) and staged (dense) pages.

The contract is the torch path of :meth:`diffkv_sglang.attention.DecodeAttentionWrapper.run` (the reference; the
wrapper runs this kernel instead when the store uses kernels, see :mod:`diffkv_sglang.backend_select`): for each
request ``b`` and KV head ``h`` the ``G = Hq / H`` query heads of the group attend over every kept token of the
request's pages, with a float32 softmax, and the attention of every staged token is added to its importance
statistics (``score_sum += max over the group of its probability``, ``seen += 1``).

Two kernels per layer:

* ``_decode_split_kernel``, grid ``(B, H, num_splits)``. Request ``b``'s ``n_b = ceil(seq_len / P)`` pages are
  cut into ``num_splits`` contiguous ranges of ``max(ceil(n_b / num_splits), MIN_PAGES)`` pages; a split whose
  range starts past ``n_b`` exits at once, so short requests cost no padding work. A program reads every
  byte of its range once for all ``G`` query heads (GQA), ``PAGES`` pages per step: the step's descriptors
  (block offsets, tier counts, states) are loaded a step ahead, then each tier's tokens of those pages, and
  the staged pages' rows, go through the tensor cores in tiles of ``BLOCK_N`` rows that cross page borders
  (pruned tokens and empty tiers leave no holes). The split's running max, sum and unnormalized output go to
  a workspace, the base-2 logits of staged tokens to a scratch buffer indexed by the page's rank among the
  request's staged pages (from the plan).
* ``_decode_merge_kernel``, grid ``(B, H)``: combines the splits, writes the output, then turns the staged
  tokens' logits into probabilities with the final max and sum and accumulates ``score_sum`` / ``seen``
  directly in the staged blocks of the arena (no host sync, no torch scatter).

Arithmetic. Codes are unpacked in registers and enter the products exactly (integers < 256 are exact in
bfloat16); scale and zero point are applied per row (and group) around the products, the power-of-two meta
scale on the logits and probabilities (exact):
``q . ((c * s + z) * m) = m * (s * (q . c) + z * sum(q))`` and ``sum_n p_n (c_n s_n + z_n) m = m * ((p s) @ c
+ p @ z)``. The float32 operands on the other side (q, p * s) are split into three bfloat16 parts whose sum is
exact to ~2^-24, so every product is float32-accurate on bfloat16 tensor cores with float32 accumulation. This
equals attention over the reference's dequantized values up to float32 rounding (~1e-6 relative on random data),
except where the two factored terms cancel far below the block's scale: e.g. a sealed partially written page,
whose garbage tokens set the meta scale (the store never seals those). The online softmax is float32 (base 2).

Block byte offsets come only from :mod:`diffkv_sglang.format`: the launcher passes each layer's section
coefficients, row sizes, bit widths and groups as ``tl.constexpr`` tuples and the kernel computes section
starts from the block's tier counts. Hadamard rotation: ``q`` is rotated once per layer (torch, into a plan
buffer) for sealed keys while staged keys use the plain ``q``; values of sealed pages are accumulated in the
rotated space and staged ones in the model's space, and ``out = acc_rotated @ H + acc_staged``.

Example::

    plan = DecodePlan(store, num_q_heads=32, max_batch=64, max_pages=512)   # buffers: once
    plan.plan(page_table, seq_lens)                                        # once per batch
    for layer in range(store.num_layers):
        store.write_tokens(layer, new_locs, k[layer], v[layer])
        out = plan.run(q[layer], layer)                                    # [B, Hq, D], launches only
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
import triton
import triton.language as tl

from diffkv_sglang.config import MAX_TIERS
from diffkv_sglang.format import INDEX, KEY_META, KEYS, META_BYTES, VALUE_META, VALUES, BlockFormat
from diffkv_sglang.quant import hadamard_matrix
from diffkv_sglang.store import CompressedKVStore, PageState

# The interpreter keeps bfloat16 as raw bits and multiplies them as integers in tl.dot: there, products run on
# the same bfloat16 parts converted to float32 (exact), so the split arithmetic is still what the tests check.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
_STAGED = tl.constexpr(int(PageState.STAGED))
_SEALED = tl.constexpr(int(PageState.SEALED))
_SUPPORTED_BITS = (2, 4, 8)


# --------------------------------------------------------------------------------------------- helpers
@triton.jit
def _section_start(n0, n1, n2, n3, C: tl.constexpr, t: tl.constexpr):
    """Byte offset of tier ``t``'s section inside a block: ``sum_u n_u * C[5t + u] + C[5t + 4]`` (format.py's
    linear coefficients, padded to four tiers). Counts may be scalars or vectors (one entry per page)."""
    return C[5 * t + 4] + n0 * C[5 * t] + n1 * C[5 * t + 1] + n2 * C[5 * t + 2] + n3 * C[5 * t + 3]


@triton.jit
def _pick(onehot, vec):
    """Gather by one-hot rows: ``onehot`` ``[BLOCK_N, PAGES]`` bool, ``vec`` ``[PAGES]`` -> ``[BLOCK_N]``
    (0 for rows that select nothing)."""
    return tl.sum(tl.where(onehot, vec[None, :], 0), 1)


@triton.jit
def _chunk_rows(r0, counts, PAGES: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows ``r0 .. r0 + BLOCK_N`` of a chunk whose pages contribute ``counts`` ``[PAGES]`` rows each, in page
    order: returns the one-hot page of every row ``[BLOCK_N, PAGES]``, its rank inside its page and the mask
    of rows that exist."""
    ends = tl.cumsum(counts, 0)
    k = r0 + tl.arange(0, BLOCK_N)
    page = tl.sum((k[:, None] >= ends[None, :]).to(tl.int32), 1)
    onehot = page[:, None] == tl.arange(0, PAGES)[None, :]
    rank = k - _pick(onehot, ends - counts)
    return onehot, rank, k < tl.sum(counts, 0)


@triton.jit
def _split3(x):
    """``x`` (float32) as three bfloat16 tensors whose sum is ``x`` to ~2^-24 relative (exact products on
    tensor cores, float32 accumulation: a float32-accurate ``tl.dot`` against operands exact in bfloat16)."""
    a = x.to(tl.bfloat16)
    r = x - a.to(tl.float32)
    b = r.to(tl.bfloat16)
    c = (r - b.to(tl.float32)).to(tl.bfloat16)
    return a, b, c


@triton.jit
def _mma(a, b, acc):
    """``acc + a @ b`` for bfloat16 operands, float32 accumulation (tensor cores)."""
    if _INTERPRET:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _dot3(a1, a2, a3, b, acc):
    """``acc + (a1 + a2 + a3) @ b`` in float32 (smallest terms first); ``b`` bfloat16."""
    return _mma(a1, b, _mma(a2, b, _mma(a3, b, acc)))


@triton.jit
def _column(x, i: tl.constexpr, GROUPS: tl.constexpr):
    """Column ``i`` of ``x`` ``[rows, GROUPS]`` as ``[rows]``."""
    return tl.sum(tl.where(tl.arange(0, GROUPS)[None, :] == i, x, 0.0), 1)


@triton.jit
def _codes(U8, code_at, row_mask, BITS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
           CODE_ALIGN: tl.constexpr):
    """Codes of ``BLOCK_N`` token rows as ``[BLOCK_N, D]`` bfloat16 (exact: codes < 256). ``code_at``:
    ``[BLOCK_N]`` int64 byte offset of each row's packed codes (multiples of CODE_ALIGN), read as contiguous
    bytes (vector loads) and unpacked in registers (little endian: element ``j`` in byte ``j * BITS // 8`` at bit
    ``j * BITS % 8``). Masked rows give 0."""
    col = tl.arange(0, D * BITS // 8)
    rows = tl.multiple_of(code_at, CODE_ALIGN)
    raw = tl.load(U8 + rows[:, None] + col[None, :], mask=row_mask[:, None], other=0)
    if BITS == 8:
        codes = raw
    elif BITS == 4:           # byte r holds elements 2r (low nibble) and 2r + 1
        codes = tl.join(raw & 15, raw >> 4).reshape(BLOCK_N, D)
    else:                     # 2 bits: byte r holds 4r .. 4r + 3, join(join(c0, c2), join(c1, c3))[r, i, k] = c_2i+k
        codes = tl.join(tl.join(raw & 3, (raw >> 4) & 3), tl.join((raw >> 2) & 3, raw >> 6)).reshape(BLOCK_N, D)
    return codes.to(tl.float32).to(tl.bfloat16)


@triton.jit
def _meta(F16, meta_at, row_mask, GROUPS: tl.constexpr):
    """Float32 (scale, zero) of ``BLOCK_N`` token rows whose float16 pairs start at byte ``meta_at`` ``[BLOCK_N]``:
    ``[BLOCK_N]`` each with one group, ``[BLOCK_N, GROUPS]`` otherwise."""
    meta = F16 + meta_at // 2                            # meta sections are 4-byte aligned
    if GROUPS == 1:
        scale = tl.load(meta, mask=row_mask, other=0.0).to(tl.float32)
        zero = tl.load(meta + 1, mask=row_mask, other=0.0).to(tl.float32)
    else:
        pair = meta[:, None] + 2 * tl.arange(0, GROUPS)[None, :]
        scale = tl.load(pair, mask=row_mask[:, None], other=0.0).to(tl.float32)
        zero = tl.load(pair + 1, mask=row_mask[:, None], other=0.0).to(tl.float32)
    return scale, zero


@triton.jit
def _group_sums(q1, q2, q3, GROUPS: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr):
    """Sums of q over each quantization group of the head dimension: ``[BLOCK_G]`` or ``[BLOCK_G, GROUPS]``."""
    q = q1.to(tl.float32) + q2.to(tl.float32) + q3.to(tl.float32)
    if GROUPS == 1:
        sums = tl.sum(q, 1)
    else:
        sums = tl.sum(q.reshape(BLOCK_G, GROUPS, D // GROUPS), 2)
    return sums


@triton.jit
def _code_scores(q1, q2, q3, q_sums, codes, scale, zero, GROUPS: tl.constexpr, D: tl.constexpr):
    """``sum_d q[g, d] * (codes[n, d] * scale + zero)`` for ``[BLOCK_G, BLOCK_N]``: the dequantized keys'
    logits before the meta scale, as ``scale * (q @ codes.T) + zero * sum(q)`` per group."""
    codes_t = tl.trans(codes)
    if GROUPS == 1:
        s = _dot3(q1, q2, q3, codes_t, tl.zeros([q1.shape[0], codes.shape[0]], tl.float32))
        s = s * scale[None, :] + q_sums[:, None] * zero[None, :]
    else:
        group = tl.arange(0, D) // (D // GROUPS)
        s = tl.zeros([q1.shape[0], codes.shape[0]], tl.float32)
        for i in tl.static_range(GROUPS):
            mine = tl.where(group[:, None] == i, codes_t, tl.zeros_like(codes_t))
            part = _dot3(q1, q2, q3, mine, tl.zeros([q1.shape[0], codes.shape[0]], tl.float32))
            offset = _column(q_sums, i, GROUPS)[:, None] * _column(zero, i, GROUPS)[None, :]
            s += part * _column(scale, i, GROUPS)[None, :] + offset
    return s


@triton.jit
def _code_values(acc, p, codes, scale, zero, row_scale, GROUPS: tl.constexpr, D: tl.constexpr):
    """``acc + sum_n p[g, n] * row_scale[n] * (codes[n, d] * scale + zero)``: the dequantized values weighted by
    ``p`` ``[BLOCK_G, BLOCK_N]`` (0 on dead rows), as ``(p * scale) @ codes + p @ zero`` per group."""
    if GROUPS == 1:
        w1, w2, w3 = _split3(p * (row_scale * scale)[None, :])
        acc = _dot3(w1, w2, w3, codes, acc + tl.sum(p * (row_scale * zero)[None, :], 1)[:, None])
    else:
        group = tl.arange(0, D) // (D // GROUPS)
        for i in tl.static_range(GROUPS):
            w1, w2, w3 = _split3(p * (row_scale * _column(scale, i, GROUPS))[None, :])
            mine = tl.where(group[None, :] == i, codes, tl.zeros_like(codes))
            z = tl.sum(p * (row_scale * _column(zero, i, GROUPS))[None, :], 1)
            acc = _dot3(w1, w2, w3, mine, acc + tl.where(group[None, :] == i, z[:, None], 0.0))
    return acc


@triton.jit
def _dense_scores(q1, q2, q3, k):
    """``q @ k.T`` in float32 for dense model-dtype rows ``k`` ``[BLOCK_N, D]`` (bfloat16 rows are exact operands;
    other dtypes are split too, keeping the six largest partial products)."""
    if k.dtype == tl.bfloat16:
        s = _dot3(q1, q2, q3, tl.trans(k), tl.zeros([q1.shape[0], k.shape[0]], tl.float32))
    else:
        k1, k2, k3 = _split3(k.to(tl.float32))
        k1, k2, k3 = tl.trans(k1), tl.trans(k2), tl.trans(k3)
        s = _mma(q3, k1, _mma(q2, k2, _mma(q1, k3, tl.zeros([q1.shape[0], k.shape[0]], tl.float32))))
        s = _mma(q1, k1, _mma(q1, k2, _mma(q2, k1, s)))
    return s


@triton.jit
def _dense_values(acc, p, v):
    """``acc + p @ v`` in float32 for dense model-dtype rows ``v`` ``[BLOCK_N, D]``."""
    p1, p2, p3 = _split3(p)
    if v.dtype == tl.bfloat16:
        acc = _dot3(p1, p2, p3, v, acc)
    else:
        v1, v2, v3 = _split3(v.to(tl.float32))
        acc = _mma(p3, v1, _mma(p2, v2, _mma(p1, v3, acc)))
        acc = _mma(p1, v1, _mma(p1, v2, _mma(p2, v1, acc)))
    return acc


@triton.jit
def _softmax_step(m_i, l_i, s):
    """One online-softmax step over base-2 logits ``s`` ``[BLOCK_G, BLOCK_N]`` (-inf = masked). Returns the new
    running max and sum, the factor ``alpha`` that rescales earlier accumulators, and the probabilities ``p``
    relative to the new max. A row that has seen only -inf keeps max -inf, sum 0 and gives p = 0."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), alpha, p


@triton.jit
def _chunk_descriptors(ids, idx, in_range, seq_len, layer, PAGE_STATE, BLOCK_OFFSET, TIER_COUNTS, STAGED_RANK,
                       h, NUM_LAYERS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, P: tl.constexpr, T: tl.constexpr):
    """Descriptors of a chunk of pages (``ids`` ``[PAGES]`` logical pages at request positions ``idx``): block
    offsets, tier counts (0 unless sealed), rows of staged pages (their valid tokens, else 0), staged ranks,
    and valid tokens per page."""
    state = tl.load(PAGE_STATE + ids, mask=in_range, other=0)
    slot = (ids * NUM_LAYERS + layer) * NUM_KV_HEADS + h
    base = tl.load(BLOCK_OFFSET + slot, mask=in_range, other=0)
    sealed = in_range & (state == _SEALED)
    n0 = tl.load(TIER_COUNTS + slot * T, mask=sealed, other=0)
    n1 = tl.zeros_like(n0)
    n2 = tl.zeros_like(n0)
    n3 = tl.zeros_like(n0)
    if T > 1:
        n1 = tl.load(TIER_COUNTS + slot * T + 1, mask=sealed, other=0)
    if T > 2:
        n2 = tl.load(TIER_COUNTS + slot * T + 2, mask=sealed, other=0)
    if T > 3:
        n3 = tl.load(TIER_COUNTS + slot * T + 3, mask=sealed, other=0)
    valid = tl.minimum(seq_len - idx * P, P)
    staged = in_range & (state == _STAGED)
    staged_rows = tl.where(staged, valid, 0)
    staged_rank = tl.load(STAGED_RANK + idx, mask=staged, other=-1)
    return base, n0, n1, n2, n3, staged_rows, staged_rank, valid


@triton.jit
def _attend_tier(m_i, l_i, acc, acc_st, q1, q2, q3, U8, F16, base, n0, n1, n2, n3, n_t, valid, key_scale,
                 value_scale, t: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr,
                 KEY_GROUPS: tl.constexpr, VALUE_GROUPS: tl.constexpr, KEY_ROW: tl.constexpr,
                 VALUE_ROW: tl.constexpr, KEY_META_ROW: tl.constexpr, VALUE_META_ROW: tl.constexpr,
                 KEY_SEC: tl.constexpr,
                 VALUE_SEC: tl.constexpr, KEY_META_SEC: tl.constexpr, VALUE_META_SEC: tl.constexpr,
                 INDEX_SEC: tl.constexpr, CODE_ALIGN: tl.constexpr, PAGES: tl.constexpr, D: tl.constexpr,
                 BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, VALUE_ROT: tl.constexpr):
    """Attend over tier ``t``'s tokens of a chunk of sealed pages, ``BLOCK_N`` rows at a time across pages.
    ``q1..q3``: bfloat16 parts of the (rotated) query. Per-page vectors ``[PAGES]``: block offsets ``base``,
    counts ``n0..n3`` (``n_t`` this tier's), ``valid`` tokens, ``key_scale`` (meta scale times the softmax
    scale) and ``value_scale``. Codes enter the products exactly; scales and zero points are applied per row
    (and group), so the result is attention over ``(code * scale + zero) * meta_scale`` in float32."""
    key_at = base + _section_start(n0, n1, n2, n3, KEY_SEC, t)
    value_at = base + _section_start(n0, n1, n2, n3, VALUE_SEC, t)
    key_meta_at = base + _section_start(n0, n1, n2, n3, KEY_META_SEC, t)
    value_meta_at = base + _section_start(n0, n1, n2, n3, VALUE_META_SEC, t)
    index_at = base + _section_start(n0, n1, n2, n3, INDEX_SEC, t)
    q_sums = _group_sums(q1, q2, q3, KEY_GROUPS, D, BLOCK_G)
    for r0 in range(0, tl.sum(n_t, 0), BLOCK_N):
        onehot, rank, row_mask = _chunk_rows(r0, n_t, PAGES, BLOCK_N)
        pos = tl.load(U8 + _pick(onehot, index_at) + rank, mask=row_mask, other=0).to(tl.int32)
        k = _codes(U8, _pick(onehot, key_at) + rank * KEY_ROW, row_mask, KEY_BITS, D, BLOCK_N, CODE_ALIGN)
        v = _codes(U8, _pick(onehot, value_at) + rank * VALUE_ROW, row_mask, VALUE_BITS, D, BLOCK_N, CODE_ALIGN)
        k_scale, k_zero = _meta(F16, _pick(onehot, key_meta_at) + rank * KEY_META_ROW, row_mask, KEY_GROUPS)
        v_scale, v_zero = _meta(F16, _pick(onehot, value_meta_at) + rank * VALUE_META_ROW, row_mask, VALUE_GROUPS)
        live = row_mask & (pos < _pick(onehot, valid))    # only a request's last page can hold later tokens
        s = _code_scores(q1, q2, q3, q_sums, k, k_scale, k_zero, KEY_GROUPS, D)
        s = tl.where(live[None, :], s * _pick(onehot, key_scale)[None, :], float("-inf"))
        m_i, l_i, alpha, p = _softmax_step(m_i, l_i, s)
        acc = acc * alpha[:, None]
        if VALUE_ROT:
            acc_st = acc_st * alpha[:, None]
        dead = (~live)[:, None] if VALUE_GROUPS > 1 else ~live          # dead rows: no NaN from stale metadata
        v_scale = tl.where(dead, 0.0, v_scale)
        v_zero = tl.where(dead, 0.0, v_zero)
        row_scale = tl.where(live, _pick(onehot, value_scale), 0.0)
        acc = _code_values(acc, p, v, v_scale, v_zero, row_scale, VALUE_GROUPS, D)
    return m_i, l_i, acc, acc_st


@triton.jit
def _attend_staged(m_i, l_i, acc, acc_st, q1, q2, q3, KV, base, staged_rows, staged_rank, LOGITS, staged_cap,
                   qk_scale, G: tl.constexpr, BLOCK_G: tl.constexpr, P: tl.constexpr, PAGES: tl.constexpr,
                   D: tl.constexpr, BLOCK_N: tl.constexpr, KV_ELEMENT_BYTES: tl.constexpr,
                   VALUES_START: tl.constexpr, VALUE_ROT: tl.constexpr):
    """Attend over the valid rows of a chunk's staged pages (``staged_rows`` ``[PAGES]``, 0 for other pages),
    ``BLOCK_N`` rows at a time. Logits go to ``LOGITS`` ``[staged_cap, P, G]`` at the page's staged rank.
    Values add to ``acc_st`` with value rotation (model space; sealed ones are in the rotated space)."""
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    element = base // KV_ELEMENT_BYTES
    for r0 in range(0, tl.sum(staged_rows, 0), BLOCK_N):
        onehot, rank, row_mask = _chunk_rows(r0, staged_rows, PAGES, BLOCK_N)
        rows = tl.multiple_of(_pick(onehot, element) + rank * D, 16 // KV_ELEMENT_BYTES)[:, None] + d[None, :]
        k = tl.load(KV + rows, mask=row_mask[:, None], other=0.0)
        v = tl.load(KV + VALUES_START + rows, mask=row_mask[:, None], other=0.0)
        s = tl.where(row_mask[None, :], _dense_scores(q1, q2, q3, k) * qk_scale, float("-inf"))
        srank = _pick(onehot, staged_rank)
        keep = row_mask & (srank >= 0) & (srank < staged_cap)
        tl.store(LOGITS + (srank * P + rank)[None, :] * G + g[:, None], s, mask=(g[:, None] < G) & keep[None, :])
        m_i, l_i, alpha, p = _softmax_step(m_i, l_i, s)
        acc = acc * alpha[:, None]
        if VALUE_ROT:
            acc_st = _dense_values(acc_st * alpha[:, None], p, v)
        else:
            acc = _dense_values(acc, p, v)
    return m_i, l_i, acc, acc_st


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _decode_split_kernel(
        Q, stride_qb, stride_qh, Q_ROT, stride_rb, stride_rh,
        U8, F16, F32, KV,
        BLOCK_OFFSET, PAGE_STATE, TIER_COUNTS,
        PAGE_TABLE, STAGED_RANK, stride_pt, SEQ_LENS,
        PART_M, PART_L, PART_ACC, LOGITS,
        layer, staged_cap, qk_scale,
        NUM_LAYERS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
        G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
        PAGES: tl.constexpr, BLOCK_N: tl.constexpr, MIN_PAGES: tl.constexpr,
        T: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr,
        KEY_GROUPS: tl.constexpr, VALUE_GROUPS: tl.constexpr, ROW_BYTES: tl.constexpr,
        KEY_SEC: tl.constexpr, VALUE_SEC: tl.constexpr, KEY_META_SEC: tl.constexpr,
        VALUE_META_SEC: tl.constexpr, INDEX_SEC: tl.constexpr, META_SCALE_SEC: tl.constexpr,
        CODE_ALIGN: tl.constexpr, KV_ELEMENT_BYTES: tl.constexpr, KV_VALUES_START: tl.constexpr,
        KEY_ROT: tl.constexpr, VALUE_ROT: tl.constexpr):
    """One split of one (request, KV head): online softmax over the split's pages for all G query heads.

    Pages are visited in chunks of PAGES: the chunk's descriptors are loaded one chunk ahead (its page ids two
    chunks ahead), then each tier's tokens of the whole chunk, and its staged rows, are processed in tiles of
    BLOCK_N rows that cross page boundaries (so short tiers and pruned tokens do not leave tiles empty).

    Q ``[B, Hq, D]`` (any float dtype), Q_ROT the same rotated (float32; Q itself without key rotation);
    U8/F16/F32/KV: the arena as uint8 / float16 / float32 / model dtype; BLOCK_OFFSET ``[slots]`` int64;
    PAGE_STATE ``[pages]`` int8; TIER_COUNTS ``[slots, T]`` int32; PAGE_TABLE / STAGED_RANK ``[B, stride_pt]``
    int32; SEQ_LENS ``[B]`` int32. Writes PART_M / PART_L ``[B * H * S, G]`` float32 (base-2 running max, sum),
    PART_ACC ``[B * H * S, (1 + VALUE_ROT) * G * D]`` float32 (unnormalized output; with value rotation the
    rotated-space part, then the model-space part), LOGITS ``[B, H, staged_cap, P, G]`` float32 (base-2 logits
    of staged tokens).
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
        q1, q2, q3 = _split3(q)                      # staged keys are in the model's space
        if KEY_ROT:                                  # sealed keys in the rotated space
            r1, r2, r3 = _split3(tl.load(Q_ROT + b * stride_rb + (h * G + g)[:, None] * stride_rh + d[None, :],
                                         mask=g_mask[:, None], other=0.0).to(tl.float32))
        else:
            r1, r2, r3 = q1, q2, q3
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        if VALUE_ROT:
            acc_st = tl.zeros([BLOCK_G, D], tl.float32)
        else:
            acc_st = tl.zeros([1, 1], tl.float32)    # placeholder, never touched
        logits = LOGITS + (b * NUM_KV_HEADS + h) * staged_cap * P * G
        table = PAGE_TABLE + b * stride_pt
        ranks = STAGED_RANK + b * stride_pt
        j = tl.arange(0, PAGES)
        idx = page_lo + j
        ids = tl.load(table + idx, mask=idx < page_hi, other=0).to(tl.int64)
        base, n0, n1, n2, n3, staged_rows, staged_rank, valid = _chunk_descriptors(
            ids, idx, idx < page_hi, seq_len, layer, PAGE_STATE, BLOCK_OFFSET, TIER_COUNTS, ranks, h,
            NUM_LAYERS, NUM_KV_HEADS, P, T)
        ids = tl.load(table + idx + PAGES, mask=idx + PAGES < page_hi, other=0).to(tl.int64)
        for i0 in range(page_lo, page_hi, PAGES):
            idx = i0 + j
            # prefetch: page ids two chunks ahead, descriptors one chunk ahead
            ids_after = tl.load(table + idx + 2 * PAGES, mask=idx + 2 * PAGES < page_hi, other=0).to(tl.int64)
            nxt = _chunk_descriptors(ids, idx + PAGES, idx + PAGES < page_hi, seq_len, layer, PAGE_STATE,
                                     BLOCK_OFFSET, TIER_COUNTS, ranks, h, NUM_LAYERS, NUM_KV_HEADS, P, T)
            scales_at = (base + n0 * META_SCALE_SEC[0] + n1 * META_SCALE_SEC[1] + n2 * META_SCALE_SEC[2]
                         + n3 * META_SCALE_SEC[3]) // 4
            sealed = (n0 + n1 + n2 + n3) > 0
            key_scale = tl.load(F32 + scales_at, mask=sealed, other=0.0) * qk_scale
            value_scale = tl.load(F32 + scales_at + 1, mask=sealed, other=0.0)
            for t in tl.static_range(T):
                if t == 0:
                    n_t = n0
                elif t == 1:
                    n_t = n1
                elif t == 2:
                    n_t = n2
                else:
                    n_t = n3
                m_i, l_i, acc, acc_st = _attend_tier(
                    m_i, l_i, acc, acc_st, r1, r2, r3, U8, F16, base, n0, n1, n2, n3, n_t, valid, key_scale,
                    value_scale, t, KEY_BITS[t], VALUE_BITS[t], KEY_GROUPS[t], VALUE_GROUPS[t], ROW_BYTES[4 * t],
                    ROW_BYTES[4 * t + 1], ROW_BYTES[4 * t + 2], ROW_BYTES[4 * t + 3], KEY_SEC,
                    VALUE_SEC, KEY_META_SEC, VALUE_META_SEC, INDEX_SEC, CODE_ALIGN, PAGES, D, BLOCK_G, BLOCK_N,
                    VALUE_ROT)
            m_i, l_i, acc, acc_st = _attend_staged(
                m_i, l_i, acc, acc_st, q1, q2, q3, KV, base, staged_rows, staged_rank, logits, staged_cap,
                qk_scale, G, BLOCK_G, P, PAGES, D, BLOCK_N, KV_ELEMENT_BYTES, KV_VALUES_START, VALUE_ROT)
            base, n0, n1, n2, n3, staged_rows, staged_rank, valid = nxt
            ids = ids_after
        row = (b * NUM_KV_HEADS + h) * num_splits + split
        tl.store(PART_M + row * G + g, m_i, mask=g_mask)
        tl.store(PART_L + row * G + g, l_i, mask=g_mask)
        acc_ptr = PART_ACC + row * ((1 + VALUE_ROT) * G * D) + g[:, None] * D + d[None, :]
        tl.store(acc_ptr, acc, mask=g_mask[:, None])
        if VALUE_ROT:
            tl.store(acc_ptr + G * D, acc_st, mask=g_mask[:, None])


@triton.jit
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
            ok = (i >= 0) & (tl.load(PAGE_STATE + page) == _STAGED)
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
        block_n: token rows per inner step (one tier's rows, or staged rows, across the pages of a step),
            >= 32.
        pages_per_step: pages whose descriptors are loaded together (and one step ahead); a power of two.
        num_warps, num_stages, maxnreg: Triton launch options (``maxnreg`` caps registers per thread).
        min_pages_per_split: fewest pages a split gets (short requests use fewer splits).
    """

    block_n: int = 32
    pages_per_step: int = 4
    num_warps: int = 4
    num_stages: int = 1
    min_pages_per_split: int = 2
    maxnreg: int | None = None


# The visible tuning table: head_dim -> config, the fastest of TUNE_CONFIGS on an H100 (Triton 3.6) for
# Llama-3-8B-shaped (128) and SmolLM2-shaped (64) batches; benchmarks/kernels_gpu.py --tune re-times them.
DECODE_CONFIGS = {
    64: DecodeConfig(block_n=32, pages_per_step=4, num_warps=4, maxnreg=96),
    128: DecodeConfig(block_n=32, pages_per_step=4, num_warps=4, maxnreg=128),
}
TUNE_CONFIGS = (
    DecodeConfig(block_n=32, pages_per_step=2, num_warps=2),
    DecodeConfig(block_n=32, pages_per_step=1, num_warps=4, maxnreg=128),
    DecodeConfig(block_n=32, pages_per_step=2, num_warps=4, maxnreg=128),
    DecodeConfig(block_n=32, pages_per_step=4, num_warps=4, maxnreg=128),
    DecodeConfig(block_n=32, pages_per_step=4, num_warps=4, maxnreg=96),
    DecodeConfig(block_n=32, pages_per_step=4, num_warps=8),
    DecodeConfig(block_n=64, pages_per_step=4, num_warps=8),
)
MAX_SPLITS = 64


def sealed_format_constants(fmt: BlockFormat) -> dict:
    """A layer's sealed-block format as the split kernel's ``tl.constexpr`` arguments, tiers padded to MAX_TIERS.

    Section tuples hold, per tier ``t``, the five numbers ``(c_0, c_1, c_2, c_3, const)`` with
    ``start = sum_u counts[u] * c_u + const`` (from :meth:`BlockFormat.section_coefficients`); META_SCALE_SEC the
    four coefficients of :meth:`BlockFormat.meta_scale_start`.
    """
    num_tiers = fmt.num_tiers
    coeffs, const = fmt.section_coefficients()
    pad = [0] * (MAX_TIERS - num_tiers)

    def section(kind: int) -> tuple[int, ...]:
        flat: list[int] = []
        for t in range(MAX_TIERS):
            row = coeffs[kind][t] if t < num_tiers else [0] * num_tiers
            flat += [*row, *pad, const[kind]]
        return tuple(flat)

    specs = [layout.spec for layout in fmt.tiers]
    for spec in specs:
        if spec.key_bits not in _SUPPORTED_BITS or spec.value_bits not in _SUPPORTED_BITS:
            raise ValueError(f"decode kernel: tier {spec.name} has bits outside {_SUPPORTED_BITS}")
    row_bytes = [layout.row_bytes(kind) for layout in fmt.tiers for kind in (KEYS, VALUES, KEY_META, VALUE_META)]
    packed = [n for spec in specs for n in (fmt.head_dim * spec.key_bits // 8, fmt.head_dim * spec.value_bits // 8,
                                            META_BYTES * spec.key_groups, META_BYTES * spec.value_groups)]
    if row_bytes != packed:             # the kernel unpacks dense little-endian codes and (scale, zero) pairs
        raise ValueError(f"decode kernel: {fmt} rows {row_bytes} are not the packed layout it reads ({packed})")
    for name in ("key_rotation", "value_rotation"):
        if getattr(fmt, name) not in ("none", "hadamard"):
            raise ValueError(f"decode kernel: {name}={getattr(fmt, name)!r}; allowed: 'none', 'hadamard'")

    def per_tier(field: str, fill: int) -> tuple[int, ...]:
        return tuple(getattr(spec, field) for spec in specs) + (fill,) * (MAX_TIERS - num_tiers)

    unit = torch.eye(num_tiers, dtype=torch.int64)
    code_rows = [layout.row_bytes(kind) for layout in fmt.tiers for kind in (KEYS, VALUES)]
    return dict(
        T=num_tiers,
        KEY_BITS=per_tier("key_bits", 8), VALUE_BITS=per_tier("value_bits", 8),
        KEY_GROUPS=per_tier("key_groups", 1), VALUE_GROUPS=per_tier("value_groups", 1),
        ROW_BYTES=tuple(row_bytes) + (0,) * (4 * len(pad)),     # per tier: key, value, key meta, value meta
        KEY_SEC=section(KEYS), VALUE_SEC=section(VALUES), KEY_META_SEC=section(KEY_META),
        VALUE_META_SEC=section(VALUE_META), INDEX_SEC=section(INDEX),
        META_SCALE_SEC=tuple(fmt.meta_scale_start(unit).tolist()) + tuple(pad),
        CODE_ALIGN=math.gcd(16, *code_rows),      # code sections come first: rows start at multiples of this
        KEY_ROT=fmt.key_rotation == "hadamard", VALUE_ROT=fmt.value_rotation == "hadamard",
    )


def default_config(head_dim: int) -> DecodeConfig:
    """The tuning table's entry for ``head_dim`` (the closest smaller one otherwise)."""
    known = sorted(DECODE_CONFIGS)
    return DECODE_CONFIGS[max([d for d in known if d <= head_dim], default=known[0])]


class DecodePlan:
    """Per-batch metadata and fixed-capacity workspaces of the Triton decode path; ``run`` only launches.

    Args:
        store: the compressed store (arena, descriptor tables, layer formats).
        num_q_heads: query heads on this rank (a multiple of ``store.num_kv_heads``).
        max_batch, max_pages: capacity of the page table (requests, pages per request).
        max_staged_pages: capacity of the staged-logit scratch, in staged pages per request. ``None`` sizes it
            in each :meth:`plan` from the batch (one host sync); give a number for CUDA graphs (``plan`` then
            raises if a request has more, unless ``check=False``).
        num_splits: split-K factor; ``None`` picks ``ceil(target / (batch * H))`` capped by
            ``ceil(max_pages / min_pages_per_split)`` and MAX_SPLITS (target: 4 programs per SM on CUDA).
        sm_scale: softmax scale (default ``1 / sqrt(head_dim)``).
        config: launch parameters (default :func:`default_config`).
        record_importance: accumulate staged-token importance (the reference always does).

    Example::

        plan = DecodePlan(store, num_q_heads=32, max_batch=64, max_pages=512)
        plan.plan(page_table, seq_lens)          # [B, n] logical pages, [B] tokens incl. the new one
        for layer in range(store.num_layers):
            out = plan.run(q[layer], layer)     # q [B, Hq, D] -> [B, Hq, D]; importance recorded

    ``run`` allocates nothing when given ``out`` and does no host sync, so it can be captured in a CUDA graph
    once ``plan`` has filled the buffers (re-run ``plan`` outside the graph before each replay).
    """

    def __init__(self, store: CompressedKVStore, num_q_heads: int, max_batch: int, max_pages: int, *,
                 max_staged_pages: int | None = None, num_splits: int | None = None, sm_scale: float | None = None,
                 config: DecodeConfig | None = None, record_importance: bool = True):
        heads, dim = store.num_kv_heads, store.head_dim
        if num_q_heads % heads:
            raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={heads}")
        if max_batch < 1 or max_pages < 1:
            raise ValueError(f"max_batch={max_batch} and max_pages={max_pages} must be >= 1")
        self.store, self.num_q_heads, self.group = store, num_q_heads, num_q_heads // heads
        self.max_batch, self.max_pages = max_batch, max_pages
        self.sm_scale = sm_scale if sm_scale is not None else dim ** -0.5
        self.config = config or default_config(dim)
        if self.config.block_n < 32:       # 16-row tiles computed wrong outputs on an H100 (Triton 3.6); not diagnosed
            raise ValueError(f"block_n={self.config.block_n} must be >= 32")
        self.record_importance = record_importance
        device = store.device
        self._fixed_splits = num_splits
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        self._target_programs = 4 * sms
        self.page_table = torch.zeros(max_batch, max_pages, dtype=torch.int32, device=device)
        self.staged_rank = torch.full((max_batch, max_pages), -1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        rows = max(b * heads * self._splits_for(b) for b in range(1, max_batch + 1))
        value_rot = store.config.value_rotation == "hadamard"
        self._part_m = torch.empty(rows, self.group, device=device)
        self._part_l = torch.empty(rows, self.group, device=device)
        self._part_acc = torch.empty(rows, (1 + value_rot) * self.group * dim, device=device)
        self._fixed_staged_cap = max_staged_pages
        self._alloc_staged(max_staged_pages or 1)
        data = store.arena.data
        self._u8, self._f16, self._f32, self._kv = (data, data.view(torch.float16), data.view(torch.float32),
                                                    data.view(store.dtype))
        self._had = hadamard_matrix(dim, device)
        key_rot = store.config.key_rotation == "hadamard"
        vec = lambda: torch.empty(max_batch, num_q_heads, dim, device=device)          # noqa: E731
        self._q32, self._q_rot = (vec(), vec()) if key_rot else (None, None)
        self._o_rot, self._o_st, self._o_fin = (vec(), vec(), vec()) if value_rot else (None, None, None)
        self._constants: dict[int, dict] = {}
        self.batch, self.num_splits = 0, 1

    def _splits_for(self, batch: int) -> int:
        if self._fixed_splits is not None:
            return self._fixed_splits
        most = triton.cdiv(self.max_pages, self.config.min_pages_per_split)
        wanted = triton.cdiv(self._target_programs, batch * self.store.num_kv_heads)
        return max(1, min(wanted, most, MAX_SPLITS))

    def _alloc_staged(self, cap: int) -> None:
        store, device = self.store, self.store.device
        self.staged_cap = cap
        self.staged_pos = torch.full((self.max_batch, cap), -1, dtype=torch.int32, device=device)
        self._logits = torch.empty(self.max_batch * store.num_kv_heads * cap * store.page_size * self.group,
                                   device=device)

    def plan(self, page_table: torch.Tensor, seq_lens: torch.Tensor, check: bool = True) -> None:
        """Fill the per-batch buffers.

        Args:
            page_table: ``[B, n]`` int logical pages of each request in token order (token ``t`` in column
                ``t // page_size``; columns past a request's last page are ignored).
            seq_lens: ``[B]`` int tokens per request, the new token included.
            check: verify the table covers ``seq_lens`` and the staged-page capacity (host syncs).
        """
        store, page = self.store, self.store.page_size
        batch, cols = page_table.shape
        if batch > self.max_batch or cols > self.max_pages or seq_lens.shape != (batch,):
            raise ValueError(f"plan: page_table {tuple(page_table.shape)} / seq_lens {tuple(seq_lens.shape)} "
                             f"exceed max_batch={self.max_batch}, max_pages={self.max_pages} or disagree")
        page_table = page_table.to(store.device, torch.int64)
        seq_lens = seq_lens.to(store.device, torch.int64)
        pages_needed = (seq_lens + page - 1) // page
        if check and bool((pages_needed > cols).any()):
            raise ValueError("plan: some requests have fewer pages than their seq_lens need")
        in_request = torch.arange(cols, device=store.device)[None, :] < pages_needed[:, None]
        staged = in_request & (store.page_state[page_table] == PageState.STAGED)
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
        positions = torch.full((batch, cap + 1), -1, dtype=torch.int64, device=store.device)
        column = torch.arange(cols, device=store.device).expand(batch, cols)
        positions.scatter_(1, torch.where(rank >= 0, rank, cap), column)          # column cap: a dump
        self.staged_pos[:batch].copy_(positions[:, :cap])
        self.batch, self.num_splits = batch, self._splits_for(max(batch, 1))

    def run(self, q: torch.Tensor, layer: int, out: torch.Tensor | None = None,
            sm_scale: float | None = None) -> torch.Tensor:
        """Attention of ``q`` ``[B, Hq, D]`` over the planned batch in ``layer``; returns ``out`` ``[B, Hq, D]``
        (``q.dtype``; allocated only when not given) and accumulates staged-token importance. ``sm_scale``
        overrides the plan's softmax scale for this call (a kernel argument, not a compile-time constant)."""
        store, batch, heads, dim = self.store, self.batch, self.store.num_kv_heads, self.store.head_dim
        if batch == 0:
            raise RuntimeError("call plan() with a non-empty batch before run()")
        if q.shape != (batch, self.num_q_heads, dim) or q.stride(-1) != 1 or q.device != self._u8.device:
            raise ValueError(f"q {tuple(q.shape)} on {q.device}: expected ({batch}, {self.num_q_heads}, {dim}), "
                             f"last dim contiguous, on {store.device}")
        if out is None:
            out = torch.empty_like(q)
        elif out.shape != q.shape or out.stride(-1) != 1:
            raise ValueError(f"out {tuple(out.shape)}: expected {tuple(q.shape)} with a contiguous last dim")
        fmt = store.formats[layer]
        consts = self._constants.get(id(fmt))
        if consts is None:
            consts = self._constants[id(fmt)] = sealed_format_constants(fmt)
        q_rot = q
        if consts["KEY_ROT"]:
            self._q32[:batch].copy_(q)
            q_rot = self._q_rot[:batch]
            torch.mm(self._q32[:batch].view(-1, dim), self._had, out=q_rot.view(-1, dim))
        value_rot = consts["VALUE_ROT"]
        target = self._o_rot[:batch] if value_rot else out
        staged, cfg = store.formats.staged, self.config
        common = dict(NUM_LAYERS=store.num_layers, NUM_KV_HEADS=heads, G=self.group, D=dim, P=store.page_size,
                      MIN_PAGES=cfg.min_pages_per_split)
        group_block = triton.next_power_of_2(self.group)
        _decode_split_kernel[(batch, heads, self.num_splits)](
            q, q.stride(0), q.stride(1), q_rot, q_rot.stride(0), q_rot.stride(1),
            self._u8, self._f16, self._f32, self._kv,
            store.arena.block_offset, store.page_state, store.tier_counts,
            self.page_table, self.staged_rank, self.max_pages, self.seq_lens,
            self._part_m, self._part_l, self._part_acc, self._logits,
            layer, self.staged_cap, (self.sm_scale if sm_scale is None else sm_scale) * math.log2(math.e),
            BLOCK_G=max(16, group_block), PAGES=cfg.pages_per_step, BLOCK_N=cfg.block_n,
            KV_ELEMENT_BYTES=staged.element_bytes, KV_VALUES_START=staged.values_start // staged.element_bytes,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common, **consts,
            **({} if cfg.maxnreg is None else {"maxnreg": cfg.maxnreg}))
        _decode_merge_kernel[(batch, heads)](
            target, target.stride(0), target.stride(1), self._o_st if value_rot else target,
            self._part_m, self._part_l, self._part_acc, self._logits,
            self.page_table, self.max_pages, self.staged_pos, self.seq_lens,
            store.page_state, store.arena.block_offset, self._f32,
            layer, self.num_splits, self.staged_cap,
            BLOCK_G=group_block, BLOCK_P=triton.next_power_of_2(store.page_size), SCORE_START=staged.score_start,
            SEEN_START=staged.seen_start, VALUE_ROT=value_rot, RECORD=self.record_importance, num_warps=4,
            **common)
        if value_rot:
            fin = self._o_fin[:batch].view(-1, dim)
            torch.addmm(self._o_st[:batch].view(-1, dim), self._o_rot[:batch].view(-1, dim), self._had, out=fin)
            out.copy_(self._o_fin[:batch])
        return out
