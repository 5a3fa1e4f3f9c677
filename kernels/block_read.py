"""Reading and addressing sealed and staged blocks in Triton: the one kernel-side encoding of the block format.

Every kernel that touches blocks (seal, decode attention, dense read) takes the format through
:func:`sealed_format_constants` and computes section starts with :func:`section_start`, so the byte layout has
one source (:mod:`diffkv_sglang.format`) and one device-side reading of it. Page-state codes come from
:class:`diffkv_sglang.format.PageState`.

* :func:`sealed_format_constants`: a layer's format as ``tl.constexpr`` tuples (bit widths, groups, per-tier
  section coefficients padded to four tiers, rotations, code alignment).
* :func:`section_start`, :func:`meta_scale_start`: byte offsets inside a block from its tier counts.
* :func:`describe_block`: a block's descriptor (state, byte offset, tier counts) from the tables.
* :func:`unpack_codes`, :func:`half_to_float`: packed code words and float16 halves to arithmetic values.
"""

from __future__ import annotations

import functools
import math

import triton
import triton.language as tl

from diffkv_sglang.config import MAX_TIERS
from diffkv_sglang.format import INDEX, KEY_META, KEYS, META_BYTES, VALUE_META, VALUES, BlockFormat, PageState
from diffkv_sglang.kernels.tl_utils import INTERPRET as _INTERPRET

__all__ = ["EMPTY", "STAGED", "SEALED", "SUPPORTED_BITS", "describe_block", "half_to_float", "meta_scale_start",
           "section_start", "sealed_format_constants", "tier_count", "unpack_codes"]

EMPTY = tl.constexpr(int(PageState.EMPTY))
STAGED = tl.constexpr(int(PageState.STAGED))
SEALED = tl.constexpr(int(PageState.SEALED))
SUPPORTED_BITS = (2, 4, 8)


@triton.jit
def _if_present(n, bytes_if_nonempty: tl.constexpr):
    """``bytes_if_nonempty`` where the tier count ``n`` is not 0, else 0 (no instruction when the constant is 0)."""
    if bytes_if_nonempty != 0:
        out = tl.where(n > 0, bytes_if_nonempty, 0)
    else:
        out = 0
    return out


@triton.jit
def section_start(n0, n1, n2, n3, C: tl.constexpr, t: tl.constexpr):
    """Byte offset of tier ``t``'s section inside a block: ``sum_u (n_u * C[9t + u] + (n_u > 0) * C[9t + 4 + u])
    + C[9t + 8]`` (format.py's coefficients, presence coefficients and constant, padded to four tiers)."""
    start = C[9 * t + 8] + n0 * C[9 * t] + n1 * C[9 * t + 1] + n2 * C[9 * t + 2] + n3 * C[9 * t + 3]
    return (start + _if_present(n0, C[9 * t + 4]) + _if_present(n1, C[9 * t + 5]) + _if_present(n2, C[9 * t + 6])
            + _if_present(n3, C[9 * t + 7]))


@triton.jit
def _field(words, k: tl.constexpr, BITS: tl.constexpr):
    """Field ``k`` (``BITS`` wide, little endian) of int32 ``words``."""
    return (words >> (k * BITS)) & ((1 << BITS) - 1)


@triton.jit
def _fields4(words, k0: tl.constexpr, step: tl.constexpr, BITS: tl.constexpr):
    """Fields ``k0 + i * step`` (i = 0..3) of ``words`` as ``[..., 2, 2]`` whose flattened index is ``i``."""
    return tl.join(tl.join(_field(words, k0, BITS), _field(words, k0 + 2 * step, BITS)),
                   tl.join(_field(words, k0 + step, BITS), _field(words, k0 + 3 * step, BITS)))


@triton.jit
def _exact_f16(x):
    """Integers ``0 <= x < 1024`` (int32) -> float16, exactly and without a conversion instruction: the bits
    ``0x6400 | x`` are the float16 ``1024 + x``."""
    return (x | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0


# PTX for one int32 word of packed codes -> its 32 / BITS codes as float16 (outputs $0.. in element order):
# each instruction pair builds two float16 ``1024 + code`` (0x64 above the code byte, or 0x6400 | code) and
# subtracts 1024 from both; ``prmt`` moves bytes, ``lop3`` does ``(x & mask) | 0x64006400`` in one step.
_UNPACK_PTX = {
    8: """{ .reg .b32 m, t0, t1;
    mov.b32 m, 0x64646464;
    prmt.b32 t0, $4, m, 0x4140;
    prmt.b32 t1, $4, m, 0x4342;
    mov.b32 m, 0x64006400;
    sub.f16x2 t0, t0, m;
    sub.f16x2 t1, t1, m;
    mov.b32 {$0, $1}, t0;
    mov.b32 {$2, $3}, t1; }""",
}


def _lop3_unpack_ptx(bits: int) -> str:
    """PTX unpacking one word of ``bits``-wide codes (4 or 2): ``n = 16 / bits`` steps, step ``i`` masks the
    fields ``i`` and ``i + n`` (one per 16-bit half) into two float16 ``1024 + code``, output ``$i`` and ``$(i + n)``;
    the word is operand ``$(2 n)``."""
    n, word = 16 // bits, 32 // bits
    temps = ", ".join(f"t{i}" for i in range(n))
    mask = f"0x{(1 << bits) - 1:04x}{(1 << bits) - 1:04x}"
    lines = [f"{{ .reg .b32 m, w, {temps};", "mov.b32 m, 0x64006400;", f"lop3.b32 t0, ${word}, {mask}, m, 0xea;"]
    for i in range(1, n):
        lines += [f"shr.b32 w, ${word}, {i * bits};", f"lop3.b32 t{i}, w, {mask}, m, 0xea;"]
    lines += [f"sub.f16x2 t{i}, t{i}, m;" for i in range(n)]
    lines += [f"mov.b32 {{${i}, ${i + n}}}, t{i};" for i in range(n)]
    return "\n    ".join(lines) + " }"


_UNPACK_PTX.update({bits: _lop3_unpack_ptx(bits) for bits in (4, 2)})
_UNPACK_PTX = {bits: tl.constexpr(asm) for bits, asm in _UNPACK_PTX.items()}
_UNPACK_CONSTRAINTS = {bits: tl.constexpr(",".join(["=h"] * (32 // bits) + ["r"])) for bits in (2, 4, 8)}
_ASM8, _ASM4, _ASM2 = _UNPACK_PTX[8], _UNPACK_PTX[4], _UNPACK_PTX[2]
_CON8, _CON4, _CON2 = _UNPACK_CONSTRAINTS[8], _UNPACK_CONSTRAINTS[4], _UNPACK_CONSTRAINTS[2]


@triton.jit
def _tree4(c0, c1, c2, c3):
    """Four tensors as ``[..., 2, 2]`` whose flattened last dims index them in order (join puts its pair in a
    new minor dimension, so the pairs are (c0, c2) and (c1, c3))."""
    return tl.join(tl.join(c0, c2), tl.join(c1, c3))


@triton.jit
def unpack_codes(words, BITS: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Packed rows as int32 words ``[BLOCK_N, D * BITS / 32]`` -> codes ``[BLOCK_N, D]`` float16 (exact). Little
    endian: element ``j`` of a row is field ``j % (32 / BITS)`` of word ``j // (32 / BITS)``. On the GPU each
    word is unpacked by a few instructions of PTX (:data:`_UNPACK_PTX`, about one per code); the interpreter
    computes the same with shifts and masks. The fields are joined in bit-reversed order (``join(evens,
    odds)``, recursively), so the reshape puts them in element order."""
    if _INTERPRET:
        if BITS == 8:
            codes = _fields4(words, 0, 1, 8)
        elif BITS == 4:
            codes = tl.join(_fields4(words, 0, 2, 4), _fields4(words, 1, 2, 4))
        else:
            codes = tl.join(tl.join(_fields4(words, 0, 4, 2), _fields4(words, 2, 4, 2)),
                            tl.join(_fields4(words, 1, 4, 2), _fields4(words, 3, 4, 2)))
        codes = _exact_f16(codes)
    elif BITS == 8:
        c0, c1, c2, c3 = tl.inline_asm_elementwise(_ASM8, _CON8, [words], (tl.float16,) * 4, True, 1)
        codes = _tree4(c0, c1, c2, c3)
    elif BITS == 4:
        c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(_ASM4, _CON4, [words], (tl.float16,) * 8, True, 1)
        codes = tl.join(_tree4(c0, c2, c4, c6), _tree4(c1, c3, c5, c7))
    else:
        c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15 = tl.inline_asm_elementwise(
            _ASM2, _CON2, [words], (tl.float16,) * 16, True, 1)
        codes = tl.join(tl.join(_tree4(c0, c4, c8, c12), _tree4(c2, c6, c10, c14)),
                        tl.join(_tree4(c1, c5, c9, c13), _tree4(c3, c7, c11, c15)))
    return codes.reshape(BLOCK_N, D)


@triton.jit
def half_to_float(bits):
    """The float16 in the low 16 bits of int32 ``bits``, as float32."""
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def tier_count(n0, n1, n2, n3, t: tl.constexpr):
    if t == 0:
        n = n0
    elif t == 1:
        n = n1
    elif t == 2:
        n = n2
    else:
        n = n3
    return n


@triton.jit
def describe_block(page, ok, layer, h, PAGE_STATE, BLOCK_OFFSET, TIER_COUNTS, NUM_LAYERS: tl.constexpr,
                   NUM_KV_HEADS: tl.constexpr, T: tl.constexpr):
    """Descriptor of ``page`` in (layer, head ``h``): ``(state, block offset, n0, n1, n2, n3)``, state -1 unless
    ``ok``, tier counts 0 unless sealed. The loads are independent of each other (no chain)."""
    state = tl.load(PAGE_STATE + page, mask=ok, other=-1).to(tl.int32)
    slot = (page * NUM_LAYERS + layer) * NUM_KV_HEADS + h
    base = tl.load(BLOCK_OFFSET + slot, mask=ok, other=0)
    sealed = state == SEALED
    n0 = tl.where(sealed, tl.load(TIER_COUNTS + slot * T, mask=ok, other=0), 0)
    n1 = tl.zeros_like(n0)
    n2 = tl.zeros_like(n0)
    n3 = tl.zeros_like(n0)
    if T > 1:
        n1 = tl.where(sealed, tl.load(TIER_COUNTS + slot * T + 1, mask=ok, other=0), 0)
    if T > 2:
        n2 = tl.where(sealed, tl.load(TIER_COUNTS + slot * T + 2, mask=ok, other=0), 0)
    if T > 3:
        n3 = tl.where(sealed, tl.load(TIER_COUNTS + slot * T + 3, mask=ok, other=0), 0)
    return state, base, n0, n1, n2, n3


@triton.jit
def meta_scale_start(n0, n1, n2, n3, META_SCALE_SEC: tl.constexpr):
    """Byte offset of a block's two float32 meta scales (keys, values): ``sum_u (n_u * M[u] + (n_u > 0) *
    M[4 + u])``."""
    start = n0 * META_SCALE_SEC[0] + n1 * META_SCALE_SEC[1] + n2 * META_SCALE_SEC[2] + n3 * META_SCALE_SEC[3]
    return (start + _if_present(n0, META_SCALE_SEC[4]) + _if_present(n1, META_SCALE_SEC[5])
            + _if_present(n2, META_SCALE_SEC[6]) + _if_present(n3, META_SCALE_SEC[7]))


# ------------------------------------------------------------------------------------------- host side
@functools.lru_cache(maxsize=None)
def sealed_format_constants(fmt: BlockFormat) -> dict:
    """A layer's sealed-block format as ``tl.constexpr`` kernel arguments, tiers padded to MAX_TIERS (cached: one
    dict per format, so launches pay nothing and equal formats compile once).

    Section tuples hold, per tier ``t``, the nine numbers ``(c_0, c_1, c_2, c_3, p_0, p_1, p_2, p_3, const)`` with
    ``start = sum_u (counts[u] * c_u + (counts[u] > 0) * p_u) + const`` (from
    :meth:`BlockFormat.section_coefficients`); META_SCALE_SEC the four per-token and four presence coefficients of
    :meth:`BlockFormat.meta_scale_coefficients`. KEY_CHANNEL flags the tiers whose keys are per channel: their key
    meta section is ``head_dim`` (scale, zero) words, one per channel.
    """
    num_tiers = fmt.num_tiers
    coeffs, presence, const = fmt.section_coefficients()
    pad = [0] * (MAX_TIERS - num_tiers)

    def section(kind: int) -> tuple[int, ...]:
        flat: list[int] = []
        for t in range(MAX_TIERS):
            row = coeffs[kind][t] if t < num_tiers else [0] * num_tiers
            fixed = presence[kind][t] if t < num_tiers else [0] * num_tiers
            flat += [*row, *pad, *fixed, *pad, const[kind]]
        return tuple(flat)

    specs = [layout.spec for layout in fmt.tiers]
    for spec in specs:
        if spec.key_bits not in SUPPORTED_BITS or spec.value_bits not in SUPPORTED_BITS:
            raise ValueError(f"the kernels read {SUPPORTED_BITS}-bit codes; tier {spec.name} has "
                             f"{spec.key_bits}/{spec.value_bits}")
    row_bytes = [layout.row_bytes(kind) for layout in fmt.tiers for kind in (KEYS, VALUES, KEY_META, VALUE_META)]
    packed = [n for spec in specs for n in (fmt.head_dim * spec.key_bits // 8, fmt.head_dim * spec.value_bits // 8,
                                            META_BYTES * spec.key_groups * (spec.key_mode == "token"),
                                            META_BYTES * spec.value_groups)]
    if row_bytes != packed:             # the kernel unpacks dense little-endian codes and (scale, zero) pairs
        raise ValueError(f"kernels: {fmt} rows {row_bytes} are not the packed layout it reads ({packed})")
    for name in ("key_rotation", "value_rotation"):
        if getattr(fmt, name) not in ("none", "hadamard"):
            raise ValueError(f"kernels: {name}={getattr(fmt, name)!r}; allowed: 'none', 'hadamard'")

    def per_tier(field: str, fill: int) -> tuple[int, ...]:
        return tuple(getattr(spec, field) for spec in specs) + (fill,) * (MAX_TIERS - num_tiers)

    per_token, fixed = fmt.meta_scale_coefficients()
    code_rows = [layout.row_bytes(kind) for layout in fmt.tiers for kind in (KEYS, VALUES)]
    return dict(
        T=num_tiers,
        KEY_BITS=per_tier("key_bits", 8), VALUE_BITS=per_tier("value_bits", 8),
        KEY_GROUPS=per_tier("key_groups", 1), VALUE_GROUPS=per_tier("value_groups", 1),
        KEY_SEC=section(KEYS), VALUE_SEC=section(VALUES), KEY_META_SEC=section(KEY_META),
        VALUE_META_SEC=section(VALUE_META), INDEX_SEC=section(INDEX),
        META_SCALE_SEC=(*per_token, *pad, *fixed, *pad),
        KEY_CHANNEL=tuple(layout.channel_keys for layout in fmt.tiers) + (False,) * (MAX_TIERS - num_tiers),
        CODE_ALIGN=math.gcd(16, *code_rows),      # code sections come first: rows start at multiples of this
        KEY_ROT=fmt.key_rotation == "hadamard", VALUE_ROT=fmt.value_rotation == "hadamard",
    )
