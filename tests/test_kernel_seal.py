"""Seal kernel (kernels/seal.py) against the reference ``quant.write_sealed_blocks``, byte for byte.

Every byte of the arena is compared: codes, (scale, zero) float16 words, meta scales, token indices, and the
bytes the reference leaves alone (padding, gaps between blocks, staged blocks), which start out as random
poison. Runs the Triton interpreter on CPU at small sizes, natively on CUDA (more blocks), always against the
reference running on the CPU.

Which bytes may differ, and by how much:

* Unrotated formats, inputs without -0.0: none, against the unchanged reference.
* Rotated formats: ``quant.rotate`` rotates with a float32 matrix product whose summation order belongs to the
  BLAS library, so no kernel (nor the same reference on another device) reproduces it bit for bit. The kernel
  rotates with a butterfly transform in a fixed order (``kernels.seal.hadamard_rotate_reference``). Against
  ``write_sealed_blocks`` with that rotation patched in (``rotate_reference``, the proposed reference): none.
  Against the matmul reference the rotated inputs differ in their last float32 bits (<= 1e-6 * max |x|), so any
  code byte and (scale, zero) word of a rotated block may differ, and a meta scale where the block's max |x|
  sits on a power of two; token indices, counts and untouched bytes are equal, and every element decodes within
  half its stored step (plus that rotation difference) of the matmul-rotated input
  (``test_rotated_blocks_against_matmul_reference``).
* Inputs with -0.0: where a group's minimum (maximum) is a zero and the group holds a -0.0, the unchanged
  reference stores the zero (scale) with a float16 sign bit that depends on torch's reduction order; the kernel
  stores +0.0. Only bit 15 of such a 0x0000 / 0x8000 half-word may differ (same value, same codes), checked by
  ``test_signed_zeros_against_unchanged_reference``; with ``quantize_reference`` patched in: none.
* The same reference run on CUDA differs from its CPU run (torch divides by the Python scalar ``qmax`` with a
  reciprocal there); the kernel matches the CPU run, which these tests use.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")      # before triton is imported

import diffkv_sglang.quant as quant  # noqa: E402
from diffkv_sglang.config import TierSpec  # noqa: E402
from diffkv_sglang.format import INDEX, KEY_META, KEYS, SECTION_NAMES, VALUE_META, BlockFormat, StagedBlockFormat  # noqa: E402
from diffkv_sglang.kernels import seal as seal_module  # noqa: E402
from diffkv_sglang.kernels.seal import (hadamard_rotate_reference, quantize_reference, rotate_reference,  # noqa: E402
                                       seal_blocks)

pytestmark = pytest.mark.triton

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
RANDOM_BLOCKS = 48 if CUDA else 2          # random-mix blocks per case, besides the special ones

T = TierSpec.parse
# (tiers, key_rotation, value_rotation, page_size, dtype): 1 to 4 tiers, groups, each rotation combination
CASES = [
    ((T("k8v4"),), "none", "none", 32, torch.bfloat16),
    ((T("k8v4"), T("k4v2")), "none", "none", 32, torch.bfloat16),
    ((T("k8v4g2x4"), T("k4v2g4x2")), "hadamard", "none", 20, torch.float16),
    ((T("k8v8"), T("k4v4g2"), T("k2v2g4x2")), "none", "hadamard", 16, torch.float32),
    ((T("k8v8g4x1"), T("k8v4"), T("k4v2g2x4"), T("k2v2")), "hadamard", "hadamard", 32, torch.bfloat16),
]


def _case_id(case):
    tiers, key_rot, value_rot, page, dtype = case
    return f"{'-'.join(t.name for t in tiers)}-K{key_rot[0]}V{value_rot[0]}-P{page}-{str(dtype)[6:]}"


def _tier_layouts(num_tiers: int, page: int, random_blocks: int) -> torch.Tensor:
    """``[n, P]`` int8 tiers: one all-pruned block, one block per tier holding every token, random mixes."""
    special = [torch.full((page,), t, dtype=torch.int8) for t in range(-1, num_tiers)]
    mixed = torch.randint(-1, num_tiers, (random_blocks, page), dtype=torch.int8)
    return torch.cat([torch.stack(special), mixed])


def _layout(fmt: BlockFormat, tiers: torch.Tensor, dtype: torch.dtype):
    """Poisoned arena with the sealed destinations (shuffled order, random gaps) and, above them, one staged
    block per sealed block. Returns (arena, dst offsets, staged offsets, data ranges [n, 2] of the blocks)."""
    n = tiers.shape[0]
    sizes = fmt.block_nbytes(quant.tier_counts(tiers, fmt.num_tiers))
    order = torch.randperm(n)
    gaps = torch.randint(0, 3, (n,)) * 16
    ends = torch.cumsum(sizes[order] + gaps, 0)
    dst = torch.empty(n, dtype=torch.int64)
    dst[order] = ends - sizes[order]
    staged = StagedBlockFormat(fmt.head_dim, fmt.page_size, dtype)
    src = int(ends[-1]) + 16 + torch.randperm(n) * staged.nbytes
    capacity = int(ends[-1]) + 16 + n * staged.nbytes + 32
    arena = torch.randint(0, 256, (capacity,), dtype=torch.uint8)
    return arena, dst, src, torch.stack([dst, dst + fmt.data_nbytes(quant.tier_counts(tiers, fmt.num_tiers))], -1)


def _write_staged(arena, src, keys, values):
    n, page, dim = keys.shape
    elements = arena.view(keys.dtype)
    index = (src // keys.element_size())[:, None] + torch.arange(page * dim)
    elements[index] = keys.reshape(n, -1)
    elements[index + page * dim] = values.reshape(n, -1)


def _describe(fmt, counts, dst, diff):
    """Which block and section the first differing byte belongs to."""
    where = int(diff.nonzero()[0])
    inside = ((dst <= where) & (where < dst + fmt.block_nbytes(counts))).nonzero()
    if inside.numel() == 0:
        return f"byte {where} outside every block"
    block = int(inside[0])
    rel = where - int(dst[block])
    starts = fmt.section_starts(counts[block])
    names = [(int(starts[k, t]), f"{SECTION_NAMES[k]}[tier {t}]") for k in range(5) for t in range(fmt.num_tiers)]
    names.append((int(fmt.meta_scale_start(counts[block])), "meta_scale"))
    section = max((s for s in names if s[0] <= rel), key=lambda s: s[0])[1]
    return f"{int(diff.sum())} bytes differ; first: block {block} (tiers {counts[block].tolist()}), byte {rel}, {section}"


def _use_proposed_reference(monkeypatch, rotation=True, signed_zeros=True):
    """Make ``write_sealed_blocks`` rotate with the butterfly and/or canonicalize signed zeros (see the docstring)."""
    if rotation:
        monkeypatch.setattr(quant, "rotate", rotate_reference)
    if signed_zeros:
        monkeypatch.setattr(quant, "quantize", quantize_reference)


def _seal_and_compare(fmt, keys, values, tiers, seed):
    """Seal from tensors and from staged blocks; both arenas must equal the reference's, byte for byte."""
    arena, dst, src, ranges = _layout(fmt, tiers, keys.dtype)
    _write_staged(arena, src, keys, values)
    expected = arena.clone()
    counts = quant.write_sealed_blocks(fmt, expected, dst, keys, values, tiers)
    outside = torch.ones(arena.numel(), dtype=torch.bool)
    for lo, hi in ranges.tolist():
        outside[lo:hi] = False
    assert torch.equal(expected[outside], arena[outside]), "reference wrote outside its blocks"
    dev = {"device": DEVICE}
    for source in ("tensors", "staged"):
        got = arena.to(**dev)
        given = (keys.to(**dev), values.to(**dev)) if source == "tensors" else src.to(**dev)
        got_counts = seal_blocks(fmt, got, given, tiers.to(**dev), dst.to(**dev), staged_dtype=keys.dtype)
        got = got.cpu()
        assert torch.equal(got_counts.cpu(), counts), f"seed {seed}, {source}: counts differ"
        assert torch.equal(got[outside], arena[outside]), f"seed {seed}, {source}: bytes outside the blocks changed"
        assert torch.equal(got, expected), f"seed {seed}, {source}: " + _describe(fmt, counts, dst, got != expected)


@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_seal_matches_reference_bytes(case, head_dim, monkeypatch, seeded):
    _check_case(case, head_dim, monkeypatch, seeded)


@pytest.mark.parametrize("case", [CASES[2], CASES[4]], ids=_case_id)
def test_seal_in_chunks(case, monkeypatch, seeded):
    """Pages larger than the tile: two passes over chunks of 16 tokens (ranks carried across chunks)."""
    monkeypatch.setitem(seal_module.SEAL_CONFIG, "tile_elements", 16 * 32)
    _check_case(case, 32, monkeypatch, seeded)


def _check_case(case, head_dim, monkeypatch, seeded):
    tiers_spec, key_rot, value_rot, page, dtype = case
    fmt = BlockFormat(tiers_spec, head_dim, page, key_rot, value_rot)
    tiers = _tier_layouts(fmt.num_tiers, page, RANDOM_BLOCKS)
    n = tiers.shape[0]
    scale = torch.exp(torch.randn(n, 1, 1) * 2)                  # per-block magnitudes
    keys = (torch.randn(n, page, head_dim) * scale + torch.randn(n, 1, head_dim)).to(dtype)
    values = (torch.randn(n, page, head_dim) * scale).to(dtype)
    # no zeros in these inputs: unrotated formats are compared with the unchanged reference
    _use_proposed_reference(monkeypatch, rotation=(key_rot, value_rot) != ("none", "none"), signed_zeros=False)
    _seal_and_compare(fmt, keys, values, tiers, seeded)


def test_seal_extreme_magnitudes(monkeypatch, seeded):
    """Tiny (subnormal max), huge (near float32 max), constant, zero and power-of-two blocks stay byte-exact."""
    fmt = BlockFormat((T("k8v4"), T("k2v4g2x4")), 32, 16)
    base = torch.randn(9, 16, 32)
    magnitudes = torch.tensor([2.0 ** -140, 1e-38, 1e-30, 1.0, 1e30, 3e38 / 8, 0.0, 1.0, 1.0])
    keys = base * magnitudes[:, None, None]
    keys[7] = 0.75                                               # constant block
    keys[8, 0, 0] = 4.0                                          # max exactly a power of two
    values = base.flip(0) * magnitudes[:, None, None]
    tiers = torch.randint(-1, 2, (9, 16), dtype=torch.int8)
    tiers[:, 0] = 0
    _use_proposed_reference(monkeypatch)                       # keys * 0.0 holds -0.0
    _seal_and_compare(fmt, keys, values, tiers, seeded)


def test_signed_zeros_against_unchanged_reference(monkeypatch, seeded):
    """With -0.0 in the input, the unchanged reference may differ from the kernel only in the float16 sign bit
    of a stored zero or scale that is itself a zero (0x0000 vs 0x8000): same values, same codes."""
    fmt = BlockFormat((T("k8v4g2x2"), T("k4v2g4x4")), 32, 16)
    n = 6
    keys = torch.randn(n, 16, 32).relu() * torch.randint(0, 2, (n, 16, 32)) * torch.where(
        torch.rand(n, 16, 32) < 0.5, -1.0, 1.0)                  # many +0.0 and -0.0, positive values
    keys[:, :, :8] = torch.where(torch.rand(n, 16, 8) < 0.5, -0.0, 0.0)   # groups of zeros only
    values = -keys
    tiers = torch.randint(0, 2, (n, 16), dtype=torch.int8)
    arena, dst, _, _ = _layout(fmt, tiers, keys.dtype)
    expected = arena.clone()
    quant.write_sealed_blocks(fmt, expected, dst, keys, values, tiers)
    got = arena.to(DEVICE)
    seal_blocks(fmt, got, (keys.to(DEVICE), values.to(DEVICE)), tiers.to(DEVICE), dst.to(DEVICE))
    got = got.cpu()
    diff = (got != expected).nonzero()[:, 0]
    assert torch.all((got[diff] ^ expected[diff]) == 0x80), "only float16 sign bits may differ"
    assert torch.all(diff % 2 == 1), "float16 words start at even offsets: the sign bit is in the odd byte"
    for data in (got, expected):
        assert torch.all(data[diff - 1] == 0) and torch.all((data[diff] & 0x7F) == 0), "differing halves are zeros"
    counts = quant.tier_counts(tiers, 2)
    meta = torch.zeros(got.numel(), dtype=torch.bool)
    for b in range(n):
        lo = int(dst[b] + fmt.section_starts(counts[b])[KEY_META, 0])
        meta[lo:int(dst[b] + fmt.meta_scale_start(counts[b]))] = True
    assert torch.all(meta[diff]), "differences only in (scale, zero) rows"
    _use_proposed_reference(monkeypatch, rotation=False)
    proposed = arena.clone()
    quant.write_sealed_blocks(fmt, proposed, dst, keys, values, tiers)
    assert torch.equal(got, proposed)


def test_hadamard_reference_is_the_rotation(seeded):
    x = torch.randn(7, 64)
    y = hadamard_rotate_reference(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, quant.rotate(x, "hadamard"), rtol=0, atol=1e-6 * float(x.abs().max()) * 8)
    torch.testing.assert_close(hadamard_rotate_reference(y), x, rtol=0, atol=1e-5)


def _element_steps(fmt, data, offsets, counts):
    """Stored quantization step ``scale * meta_scale`` of every element: keys, values ``[n, P, D]`` float32 (0 where
    pruned), read from the blocks' (scale, zero) rows."""
    n, page, dim = offsets.shape[0], fmt.page_size, fmt.head_dim
    starts = offsets[:, None, None] + fmt.section_starts(counts)
    meta_scales = data[(offsets + fmt.meta_scale_start(counts))[:, None] + torch.arange(8)].view(torch.float32)
    _, _, tier_of = quant.read_sealed_blocks(fmt, data, offsets, counts, undo_rotation=False)
    steps = [torch.zeros(n, page, dim), torch.zeros(n, page, dim)]
    for t, layout in enumerate(fmt.tiers):
        for col, kind, groups in ((0, KEY_META, layout.spec.key_groups), (1, VALUE_META, layout.spec.value_groups)):
            for b in range(n):
                pos = (tier_of[b] == t).nonzero()[:, 0]
                rows = starts[b, kind, t] + torch.arange(pos.numel())[:, None] * 4 * groups + torch.arange(4 * groups)
                scale = data[rows].view(torch.float16).reshape(pos.numel(), groups, 2)[..., 0].float()
                steps[col][b, pos] = scale.repeat_interleave(dim // groups, -1) * meta_scales[b, col]
    return steps


def test_rotated_blocks_against_matmul_reference(seeded):
    """Against the unchanged (matmul) reference: indices, counts and untouched bytes equal; every element within
    half a stored step of the matmul-rotated input (plus the float32 difference of the two rotations)."""
    fmt = BlockFormat((T("k8v4"), T("k4v2g2x2")), 64, 16, "hadamard", "hadamard")
    tiers = _tier_layouts(2, 16, RANDOM_BLOCKS + 2)
    n = tiers.shape[0]
    keys, values = torch.randn(2, n, 16, 64).to(torch.bfloat16)
    arena, dst, _, ranges = _layout(fmt, tiers, keys.dtype)
    expected = arena.clone()
    counts = quant.write_sealed_blocks(fmt, expected, dst, keys, values, tiers)
    got = arena.to(DEVICE)
    seal_blocks(fmt, got, (keys.to(DEVICE), values.to(DEVICE)), tiers.to(DEVICE), dst.to(DEVICE))
    got = got.cpu()
    starts = dst[:, None] + fmt.section_starts(counts)[:, INDEX]
    index_rows = starts[:, :, None] + torch.arange(16)
    index_mask = torch.arange(16) < counts[:, :, None]
    assert torch.equal(got[index_rows[index_mask]], expected[index_rows[index_mask]])
    outside = torch.ones(arena.numel(), dtype=torch.bool)
    for lo, hi in ranges.tolist():
        outside[lo:hi] = False
    assert torch.equal(got[outside], arena[outside])
    deq_keys, deq_values, tier_of = quant.read_sealed_blocks(fmt, got, dst, counts, undo_rotation=False)
    steps = _element_steps(fmt, got, dst, counts)
    kept = (tier_of >= 0)[..., None]
    for deq, x, step in ((deq_keys, keys, steps[0]), (deq_values, values, steps[1])):
        target = quant.rotate(x, "hadamard")
        slack = 1e-5 * target.abs().amax(dim=(1, 2), keepdim=True)
        err = torch.where(kept, (deq - target).abs() - step / 2, torch.zeros_like(deq))
        assert float((err - slack).max()) <= 0, f"seed {seeded}: {float(err.max())}"
    # codes are generally equal too: the butterfly and the matmul round alike for most elements
    assert float((got != expected).float().mean()) < 0.05


def test_seal_rejects_bad_arguments():
    fmt = BlockFormat((T("k8v4"),), 32, 8)
    data = torch.zeros(1024, dtype=torch.uint8, device=DEVICE)
    tiers = torch.zeros(2, 8, dtype=torch.int8, device=DEVICE)
    dst = torch.tensor([0, 512], device=DEVICE)
    kv = torch.zeros(2, 8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="tiers"):
        seal_blocks(fmt, data, (kv, kv), tiers[:, :4], dst)
    with pytest.raises(ValueError, match="keys"):
        seal_blocks(fmt, data, (kv[:, :, :16], kv), tiers, dst)
    with pytest.raises(ValueError, match="staged offsets"):
        seal_blocks(fmt, data, dst.int(), tiers, dst)
    with pytest.raises(ValueError, match="data"):
        seal_blocks(fmt, data.view(torch.int32), (kv, kv), tiers, dst)
    with pytest.raises(NotImplementedError, match="power-of-two"):
        seal_blocks(BlockFormat((T("k8v4"),), 48, 8), data, (kv, kv), tiers, dst)
    assert seal_blocks(fmt, data, (kv[:0], kv[:0]), tiers[:0], dst[:0]).shape == (0, 1)
