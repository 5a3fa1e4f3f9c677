import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffkv_sglang.config import TierSpec
from diffkv_sglang.format import BlockFormat
from diffkv_sglang.quant import (dequantize, demote, gather_rows, hadamard_matrix, meta_scale, pack_codes, quantize,
                                 read_sealed_blocks, rotate, tier_counts, unpack_codes, unpack_codes_into, unrotate,
                                 write_sealed_blocks)

# float32 arithmetic in (x - zero) / scale and code * scale + zero adds a few ulps on top of scale / 2.
FP32_SLACK = 1e-5


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (5, 7, 64), dtype=torch.int32)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 7, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpacking_into_a_strided_float_buffer(bits):
    """Into a slice of a larger float32 buffer (as the CPU decode path unpacks each tier into its token span):
    exactly the codes, nothing written outside the slice."""
    codes = torch.randint(0, 1 << bits, (3, 5, 64), dtype=torch.int32)
    buffer = torch.full((3, 9, 64), float("nan"))
    unpack_codes_into(buffer[:, 2:7], pack_codes(codes, bits), bits)
    assert torch.equal(buffer[:, 2:7], codes.float())
    assert buffer[:, :2].isnan().all() and buffer[:, 7:].isnan().all()


def test_gather_rows_reads_overlapping_rows():
    data = torch.randint(0, 256, (100,), dtype=torch.uint8)
    starts = torch.tensor([[0, 3], [90, 3]])
    assert torch.equal(gather_rows(data, starts, 10), data[starts[..., None] + torch.arange(10)])
    assert gather_rows(data, starts[:0], 10).shape == (0, 2, 10)


def test_packing_is_little_endian():
    assert pack_codes(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    assert pack_codes(torch.tensor([[0xA, 0x5]]), 4).tolist() == [[0x5A]]
    assert pack_codes(torch.tensor([[0x1234]]), 16).tolist() == [[0x34, 0x12]]


def test_round_half_even_and_exact_grid():
    # zero = 0, scale = 1 (max 3 over 2 bits): 0.5 -> 0 and 1.5 -> 2 (half to even), 3 stays 3.
    codes, scale, zero = quantize(torch.tensor([[0.0, 0.5, 1.5, 3.0]]), bits=2, groups=1)
    assert scale.item() == 1.0 and zero.item() == 0.0
    assert codes.tolist() == [[0, 0, 2, 3]]
    x = torch.arange(16.0)[None].flip(-1) - 4          # zero -4, scale 1: every element on the grid
    codes, scale, zero = quantize(x, bits=4, groups=1)
    assert torch.equal(dequantize(codes, scale, zero), x)
    # saturation: codes never leave [0, 2^b - 1]
    assert quantize(torch.randn(3, 32) * 1e4, bits=2, groups=2)[0].max() <= 3


def _check_bound(x, bits, groups):
    m = meta_scale(x.abs().amax(-1))
    codes, scale, zero = quantize(x / m[..., None], bits, groups)
    assert codes.min() >= 0 and codes.max() <= (1 << bits) - 1
    x_hat = dequantize(codes, scale, zero) * m[..., None]
    dim = x.shape[-1]
    bound = (scale.float() * m[..., None] / 2).repeat_interleave(dim // groups, -1)
    err = (x_hat - x).abs()
    assert torch.all(err <= bound + FP32_SLACK * x.abs().amax(-1, keepdim=True).clamp_min(1e-30)), \
        float((err - bound).max())


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 4, 8, 16]), groups=st.sampled_from([1, 2, 4]),
       log_mag=st.floats(-20, 20), offset=st.floats(-1e3, 1e3), constant=st.booleans(), seed=st.integers(0, 2**31))
def test_error_within_half_scale(bits, groups, log_mag, offset, constant, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 64, generator=gen) * 2.0 ** log_mag + offset * 2.0 ** log_mag
    if constant:
        x = x[:, :1].expand(6, 64).contiguous()
    _check_bound(x, bits, groups)


def test_bf16_range_is_safe():
    """Values far beyond float16's 65504 (possible in bf16 models) quantize without overflow."""
    x = torch.randn(4, 128) * 3e6
    x[0, 0] = 2.5e38
    _check_bound(x, 8, 1)
    _check_bound(torch.full((2, 64), 1e-30), 4, 2)


def test_demote_bound():
    x = torch.randn(16, 128)
    codes, scale, zero = quantize(x, 8, 1)
    high = dequantize(codes, scale, zero)
    low_codes, low_scale, low_zero = demote(codes, scale, zero, 4, 2)
    low = dequantize(low_codes, low_scale, low_zero)
    bound = (low_scale.float() / 2).repeat_interleave(64, -1)
    assert torch.all((low - high).abs() <= bound + FP32_SLACK)


def test_hadamard_orthonormal():
    for dim in (16, 64, 128):
        h = hadamard_matrix(dim)
        assert torch.allclose(h @ h.T, torch.eye(dim), atol=1e-6) and torch.equal(h, h.T)
    x = torch.randn(3, 64)
    assert torch.allclose(unrotate(rotate(x, "hadamard"), "hadamard"), x, atol=1e-5)
    with pytest.raises(ValueError):
        hadamard_matrix(48)


@pytest.mark.parametrize("value_rotation", ["none", "hadamard"])
def test_rotation_keeps_attention_exact_with_16_bit_codes(value_rotation):
    """Rotated q.k and rotated-back outputs equal the unrotated computation up to 16-bit code error."""
    torch.manual_seed(0)
    q, k, v = torch.randn(4, 64), torch.randn(40, 64), torch.randn(40, 64)

    def attend(rot_k, rot_v):
        def roundtrip(x, rotation):
            xr = rotate(x, rotation)
            m = meta_scale(xr.abs().amax(-1))[..., None]
            codes, s, z = quantize(xr / m, 16, 1)
            return dequantize(codes, s, z) * m
        kq, vq = roundtrip(k, rot_k), roundtrip(v, rot_v)
        p = torch.softmax(rotate(q, rot_k) @ kq.T / 8, -1)
        return unrotate(p @ vq, rot_v)

    dense = torch.softmax(q @ k.T / 8, -1) @ v
    plain, rotated = attend("none", "none"), attend("hadamard", value_rotation)
    assert torch.allclose(plain, dense, atol=1e-4, rtol=0)   # 16-bit codes: error ~ range / 2^17
    assert torch.allclose(rotated, dense, atol=1e-4, rtol=0)
    assert torch.allclose(rotated, plain, atol=1e-4, rtol=0)


LAYOUTS = [
    ((TierSpec(8, 4), TierSpec(4, 2)), "none", "none"),
    ((TierSpec(8, 4, 1, 2), TierSpec(4, 2, 2, 4)), "hadamard", "none"),
    ((TierSpec(8, 8), TierSpec(4, 4), TierSpec(2, 2, 4, 4)), "hadamard", "hadamard"),
    ((TierSpec(4, 2),), "none", "hadamard"),
    ((TierSpec(8, 4), TierSpec(4, 2, key_mode="channel")), "none", "none"),
    ((TierSpec(8, 8), TierSpec(4, 4, key_mode="channel"), TierSpec(2, 2, 1, 4, key_mode="channel")), "hadamard",
     "hadamard"),
]


@pytest.mark.parametrize("tiers, key_rot, value_rot", LAYOUTS)
@pytest.mark.parametrize("head_dim", [32, 64])
def test_sealed_blocks_round_trip(tiers, key_rot, value_rot, head_dim):
    """Write random blocks (every tier mix, all-pruned and full blocks included) into a poisoned arena,
    read them back: each element within its tier's bound, pruned tokens absent, no byte outside the blocks touched."""
    page, n = 16, 6
    fmt = BlockFormat(tiers, head_dim, page, key_rot, value_rot)
    keys = torch.randn(n, page, head_dim, dtype=torch.bfloat16) * 4
    values = torch.randn(n, page, head_dim, dtype=torch.bfloat16)
    tier_of = torch.randint(-1, len(tiers), (n, page), dtype=torch.int8)
    tier_of[0] = -1                                    # all pruned
    tier_of[1] = 0                                     # all in the best tier
    tier_of[2] = len(tiers) - 1                        # all in the last tier
    counts = tier_counts(tier_of, len(tiers))
    sizes = fmt.block_nbytes(counts)
    gaps = torch.randint(0, 4, (n,)) * 16
    offsets = torch.cumsum(sizes + gaps, 0) - sizes - gaps + gaps
    data = torch.randint(0, 256, (int(offsets[-1] + sizes[-1]) + 64,), dtype=torch.uint8)
    before = data.clone()
    written = write_sealed_blocks(fmt, data, offsets, keys, values, tier_of)
    assert torch.equal(written, counts)
    inside = torch.zeros_like(data, dtype=torch.bool)
    for o, s in zip(offsets.tolist(), sizes.tolist()):
        inside[o:o + s] = True
    assert torch.equal(data[~inside], before[~inside])

    k_hat, v_hat, tier_read = read_sealed_blocks(fmt, data, offsets, counts)
    assert torch.equal(tier_read, tier_of)
    kept = tier_of >= 0
    assert torch.all(k_hat[~kept] == 0) and torch.all(v_hat[~kept] == 0)
    for name, x, x_hat, rot in (("key", keys, k_hat, key_rot), ("value", values, v_hat, value_rot)):
        # Error per element <= scale/2 in the rotated space; a rotation spreads it: bound the L2 norm per token.
        xr = rotate(x, rot)
        m = meta_scale(torch.where(kept[..., None], xr.abs(), torch.zeros_like(xr)).amax((1, 2)))
        for t, layout in enumerate(fmt.tiers):
            sel = tier_of == t
            if not sel.any():
                continue
            bits = getattr(layout.spec, f"{name}_bits")
            groups = getattr(layout.spec, f"{name}_groups")
            scaled = xr / m[:, None, None]
            if name == "key" and layout.channel_keys:
                # one (scale, zero) per channel over the tier's tokens of each block: [n, D] range per channel
                inside = sel[..., None]
                high = torch.where(inside, scaled, -torch.inf).amax(1)
                low = torch.where(inside, scaled, torch.inf).amin(1)
                span, magnitude = (high - low)[:, None], torch.maximum(high.abs(), low.abs())[:, None]
                span, magnitude = span.expand(n, page, head_dim)[sel], magnitude.expand(n, page, head_dim)[sel]
                per_element = 1
            else:
                xg = scaled[sel].reshape(-1, groups, head_dim // groups)
                span, magnitude = xg.amax(-1) - xg.amin(-1), xg.abs().amax(-1)
                per_element = head_dim // groups
            # stored scale <= range / qmax rounded up in float16 (+ the zero's rounding), so scale/2 is bounded by:
            half_scale = (span + magnitude * 2 ** -10) / ((1 << bits) - 1) / 2 * (1 + 2 ** -9)
            bound_sq = (half_scale ** 2).sum(-1) * per_element
            err_sq = ((x_hat[sel] - x[sel].float()) / m.expand(page, n).T[sel][:, None]).pow(2).sum(-1)
            assert torch.all(err_sq <= bound_sq * (1 + 1e-4) + 1e-10), (name, t)


def test_butterfly_rotation_equals_the_hadamard_matrix(seeded):
    """quant.rotate uses a fixed-order butterfly (bit-identical across devices and with the seal kernel);
    it is the same linear map as x @ H up to float32 rounding."""
    x = torch.randn(7, 64) * 3
    assert torch.allclose(rotate(x, "hadamard"), x @ hadamard_matrix(64), atol=1e-5 * float(x.abs().max()) * 8)
    assert torch.allclose(rotate(rotate(x, "hadamard"), "hadamard"), x, atol=1e-5)


def test_signed_zero_does_not_leak_into_metadata():
    x = torch.tensor([[-0.0, 0.0, 1.0, 2.0] * 4])
    _, scale, zero = quantize(x, 4, 1)
    assert zero.view(torch.int16).item() == 0            # +0.0, whatever the order of the reduction
