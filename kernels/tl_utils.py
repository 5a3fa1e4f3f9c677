"""Triton helpers shared by the attention kernels."""

import os

import triton
import triton.language as tl

INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
"""Whether kernels run in Triton's interpreter (read when a kernel module is first imported)."""


@triton.jit
def mma(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b`` with float32 accumulation: 16-bit operands on tensor cores, or float32 ones with IEEE
    products (``IEEE``). The interpreter computes in float32 (numpy has no bfloat16 matmul)."""
    if INTERPRET:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif IEEE:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """float32 ``x`` -> ``DTYPE``, rounded to nearest even (the GPU's conversion; the interpreter truncates to
    bfloat16, so there the rounding is done on the bits)."""
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(DTYPE)
    return out
