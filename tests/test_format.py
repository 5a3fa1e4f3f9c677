import itertools

import pytest
import torch

from diffkv_sglang.config import DiffKVConfig, TierSpec
from diffkv_sglang.format import (BLOCK_ALIGN, INDEX, KEY_META, KEYS, META_SCALE_BYTES, VALUE_META, VALUES,
                                  BlockFormat, LayerFormats, StagedBlockFormat)

DEFAULT = (TierSpec(8, 4), TierSpec(4, 2))


def test_hand_computed_layout_default_tiers_head_dim_128():
    fmt = BlockFormat(DEFAULT, head_dim=128, page_size=32)
    assert [fmt.bytes_per_token(t) for t in range(2)] == [128 + 64 + 4 + 4 + 1, 64 + 32 + 4 + 4 + 1]
    counts = torch.tensor([3, 5])
    starts = fmt.section_starts(counts)
    assert starts[KEYS].tolist() == [0, 384]
    assert starts[VALUES].tolist() == [704, 896]
    assert starts[KEY_META].tolist() == [1056, 1068]
    assert starts[VALUE_META].tolist() == [1088, 1100]
    assert int(fmt.meta_scale_start(counts)) == 1120
    assert starts[INDEX].tolist() == [1128, 1131]
    assert int(fmt.block_nbytes(counts)) == 1136
    assert fmt.max_block_nbytes == 32 * 201 + 16          # 6440 rounded up to 16


@pytest.mark.parametrize("tiers", [DEFAULT, (TierSpec(8, 8),), (TierSpec(8, 4), TierSpec(4, 2, 2, 4), TierSpec(2, 2, 4, 4))])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_sections_tile_the_block(tiers, head_dim):
    """For any counts, sections are contiguous, disjoint and end exactly at the unpadded size."""
    fmt = BlockFormat(tiers, head_dim=head_dim, page_size=32)
    for counts in itertools.product(range(0, 33, 7), repeat=len(tiers)):
        counts = torch.tensor(counts)
        starts = fmt.section_starts(counts)
        cursor = 0
        for kind in (KEYS, VALUES, KEY_META, VALUE_META):
            for t in range(len(tiers)):
                assert int(starts[kind, t]) == cursor
                cursor += int(counts[t]) * fmt.row_bytes(kind, t)
        assert int(fmt.meta_scale_start(counts)) == cursor
        cursor += META_SCALE_BYTES
        for t in range(len(tiers)):
            assert int(starts[INDEX, t]) == cursor
            cursor += int(counts[t])
        assert int(fmt.data_nbytes(counts)) == cursor
        nbytes = int(fmt.block_nbytes(counts))
        assert nbytes % BLOCK_ALIGN == 0 and 0 <= nbytes - cursor < BLOCK_ALIGN
        assert int(fmt.meta_scale_start(counts)) % 4 == 0                         # float32 meta scales aligned


def test_batched_offsets_match_single():
    fmt = BlockFormat(DEFAULT, head_dim=64, page_size=32)
    counts = torch.randint(0, 17, (7, 3, 2))
    batched = fmt.section_starts(counts)
    assert batched.shape == (7, 3, 5, 2)
    for idx in itertools.product(range(7), range(3)):
        assert torch.equal(batched[idx], fmt.section_starts(counts[idx]))
    coeffs, const = fmt.section_coefficients()
    n = counts[2, 1].tolist()
    for kind, t in itertools.product(range(5), range(2)):
        assert sum(a * b for a, b in zip(n, coeffs[kind][t])) + const[kind] == int(batched[2, 1, kind, t])


def test_staged_layout():
    staged = StagedBlockFormat(head_dim=64, page_size=32, dtype=torch.bfloat16)
    assert staged.values_start == 32 * 64 * 2
    assert staged.score_start == 2 * 32 * 64 * 2
    assert staged.seen_start == staged.score_start + 128
    assert staged.nbytes == 2 * 32 * 64 * 2 + 2 * 128


def test_layer_formats_share_identical_layers():
    cfg = DiffKVConfig.from_dict({"layer_tiers": {"1": ["k8v8", "k8v4"]}})
    formats = LayerFormats(cfg, num_layers=3, head_dim=64, dtype=torch.float16)
    assert formats[0] is formats[2] and formats[1] is not formats[0]
    assert formats[1].tiers[0].spec == TierSpec(8, 8)
    assert formats.max_sealed_block_nbytes == formats[1].max_block_nbytes
