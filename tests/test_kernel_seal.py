"""Seal kernel (kernels/seal.py) against the reference ``quant.write_sealed_blocks``, byte for byte.

Every byte of the arena is compared: codes, (scale, zero) float16 words, meta scales, token indices, and the
bytes the reference leaves alone (padding, gaps between blocks, staged blocks), which start out as random
poison. Runs the Triton interpreter on CPU at small sizes, natively on CUDA (more blocks), always against the
reference running on the CPU. The reference defines every byte on any device (fixed-order butterfly Hadamard,
signed zeros made positive, correctly rounded divisions), so no byte may differ, for every format: 1 to 4
tiers, groups, rotated keys and/or values, per-channel key tiers (``+kc``), inputs with -0.0 and extreme
magnitudes.
"""

import pytest
import torch

import diffkv_sglang.quant as quant
from diffkv_sglang.config import TierSpec
from diffkv_sglang.format import SECTION_NAMES, BlockFormat, StagedBlockFormat
from diffkv_sglang.kernels import seal as seal_module
from diffkv_sglang.kernels.seal import seal_blocks

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
# formats with per-channel key tiers: one (scale, zero) per channel over the tier's tokens of a block
CHANNEL_CASES = [
    ((T("k8v4"), T("k4v2+kc")), "none", "none", 20, torch.bfloat16),
    ((T("k8v8"), T("k4v4+kc"), T("k2v2+kc")), "hadamard", "none", 32, torch.float16),
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


@pytest.mark.parametrize("case, head_dim", [(case, dim) for case in CASES for dim in (32, 64)]
                         + [(case, dim) for case in CHANNEL_CASES for dim in (64, 128)],
                         ids=lambda x: _case_id(x) if isinstance(x, tuple) else f"D{x}")
def test_seal_matches_reference_bytes(case, head_dim, seeded):
    _check_case(case, head_dim, seeded)


@pytest.mark.parametrize("case", [CASES[2], CASES[4], *CHANNEL_CASES], ids=_case_id)
def test_seal_in_chunks(case, monkeypatch, seeded):
    """Pages larger than the tile: two passes over chunks of 16 tokens (ranks carried across chunks)."""
    monkeypatch.setitem(seal_module.SEAL_CONFIG, "tile_elements", 16 * 32)
    _check_case(case, 32, seeded)


def _check_case(case, head_dim, seeded):
    tiers_spec, key_rot, value_rot, page, dtype = case
    fmt = BlockFormat(tiers_spec, head_dim, page, key_rot, value_rot)
    tiers = _tier_layouts(fmt.num_tiers, page, RANDOM_BLOCKS)
    n = tiers.shape[0]
    scale = torch.exp(torch.randn(n, 1, 1) * 2)                  # per-block magnitudes
    keys = (torch.randn(n, page, head_dim) * scale + torch.randn(n, 1, head_dim)).to(dtype)
    values = (torch.randn(n, page, head_dim) * scale).to(dtype)
    _seal_and_compare(fmt, keys, values, tiers, seeded)


@pytest.mark.parametrize("chunked", [False, True], ids=["page", "chunks"])
@pytest.mark.parametrize("case", CHANNEL_CASES, ids=_case_id)
def test_seal_channel_key_tiers(case, chunked, monkeypatch, seeded):
    """Per-channel key tiers that are empty, hold one token or the whole page, constant channels (a single token,
    equal key vectors, constant input channels, zeros of both signs): byte-exact, with the page in one tile or in
    chunks of 8 tokens (per-channel extremes carried across chunks)."""
    if chunked:
        monkeypatch.setitem(seal_module.SEAL_CONFIG, "tile_elements", 8 * 64)
    tiers_spec, key_rot, value_rot, page, dtype = case
    fmt = BlockFormat(tiers_spec, 64, page, key_rot, value_rot)
    last = fmt.num_tiers - 1
    layouts = [torch.zeros(page), torch.full((page,), last)]                    # channel tiers empty / full
    for t in range(1, fmt.num_tiers):                                           # one token in channel tier t
        layouts += [torch.zeros(page).index_fill(0, torch.tensor([3]), t),
                    torch.full((page,), -1).index_fill(0, torch.tensor([page - 1]), t)]
    layouts += [torch.arange(page) % fmt.num_tiers,                             # one token of every tier
                torch.full((page,), -1).index_copy(0, torch.arange(fmt.num_tiers), torch.arange(fmt.num_tiers)),
                torch.arange(page) % (fmt.num_tiers + 1) - 1]                  # with pruned tokens
    layouts += [torch.randint(-1, fmt.num_tiers, (page,)) for _ in range(3)]
    tiers = torch.stack(layouts).to(torch.int8)
    n = tiers.shape[0]
    keys = torch.randn(n, page, 64) * torch.exp(torch.randn(n, 1, 1) * 2)
    keys[:, :, :4] = torch.randn(n, 1, 4)                                       # constant input channels
    keys[:, :, 4] = torch.where(torch.rand(n, page) < 0.5, -0.0, 0.0)           # zeros of both signs
    keys[:, :, 5] += 40.0                                                       # a large constant offset
    for b in range(0, n, 2):                                                    # equal key vectors per tier
        for t in range(fmt.num_tiers):
            member = (tiers[b] == t).nonzero()[:, 0]
            keys[b, member] = keys[b, member[:1]]
    values = torch.randn(n, page, 64)
    _seal_and_compare(fmt, keys.to(dtype), values.to(dtype), tiers, seeded)


def test_seal_extreme_magnitudes(seeded):
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
    assert bool(((keys == 0) & torch.signbit(keys)).any())      # keys * 0.0 holds -0.0
    _seal_and_compare(fmt, keys, values, tiers, seeded)


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_seal_signed_zeros(rotation, seeded):
    """Groups whose minimum or maximum is a zero, some of them -0.0: the stored zero point or scale is +0.0 on
    both sides (``quant.quantize`` canonicalises signed zeros), so the blocks are byte-exact as well."""
    fmt = BlockFormat((T("k8v4g2x2"), T("k4v2g4x4")), 32, 16, rotation, rotation)
    n = 6
    keys = torch.randn(n, 16, 32).relu() * torch.randint(0, 2, (n, 16, 32)) * torch.where(
        torch.rand(n, 16, 32) < 0.5, -1.0, 1.0)                  # many +0.0 and -0.0, positive values
    keys[:, :, :8] = torch.where(torch.rand(n, 16, 8) < 0.5, -0.0, 0.0)   # groups of zeros only
    values = -keys
    tiers = torch.randint(0, 2, (n, 16), dtype=torch.int8)
    _seal_and_compare(fmt, keys, values, tiers, seeded)


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
