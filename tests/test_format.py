import itertools

import pytest
import torch

from diffkv_sglang.config import DiffKVConfig, TierSpec
from diffkv_sglang.format import (BLOCK_ALIGN, INDEX, KEY_META, KEYS, META_SCALE_BYTES, VALUE_META, VALUES,
                                  BlockFormat, LayerFormats, StagedBlockFormat)

DEFAULT = (TierSpec(8, 4), TierSpec(4, 2))
CHANNEL = TierSpec(4, 2, key_mode="channel")        # k4v2+kc


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


def test_hand_computed_layout_channel_keys_head_dim_64():
    """k8v4,k4v2+kc: the low tier's key meta is 64 (scale, zero) pairs when it holds a token, nothing otherwise."""
    fmt = BlockFormat((TierSpec(8, 4), CHANNEL), head_dim=64, page_size=32)
    assert fmt.row_bytes(KEY_META, 1) == 0 and fmt.tiers[1].block_fixed_bytes == 256
    assert fmt.bytes_per_token(1) == 32 + 16 + 4 + 1 + 256 / 32
    starts = fmt.section_starts(torch.tensor([3, 5]))
    assert starts[KEYS].tolist() == [0, 192] and starts[VALUES].tolist() == [352, 448]
    assert starts[KEY_META].tolist() == [528, 540] and starts[VALUE_META].tolist() == [796, 808]
    assert int(fmt.meta_scale_start(torch.tensor([3, 5]))) == 828
    assert starts[INDEX].tolist() == [836, 839] and int(fmt.block_nbytes(torch.tensor([3, 5]))) == 848
    empty_low = torch.tensor([4, 0])
    assert int(fmt.data_nbytes(empty_low)) == 4 * (64 + 32 + 4 + 4 + 1) + META_SCALE_BYTES     # no per-channel bytes
    # the largest block: 31 tokens high and one low (k8v4 costs 105 per token, one k4v2+kc token 53 + 256)
    assert fmt.max_block_nbytes == 3584                   # 31 * 105 + 53 + 256 + 8 = 3572, rounded up to 16


@pytest.mark.parametrize("tiers", [(TierSpec(8, 8),), (TierSpec(8, 4), CHANNEL)])
def test_max_block_nbytes_is_the_largest_block(tiers):
    fmt = BlockFormat(tiers, head_dim=64, page_size=8)
    largest = max(int(fmt.block_nbytes(torch.tensor(c))) for c in itertools.product(range(9), repeat=len(tiers))
                  if sum(c) <= 8)
    assert fmt.max_block_nbytes == largest


@pytest.mark.parametrize("tiers", [DEFAULT, (TierSpec(8, 8),), (TierSpec(8, 4), TierSpec(4, 2, 2, 4), TierSpec(2, 2, 4, 4)),
                                   (TierSpec(8, 4), CHANNEL, TierSpec(2, 2, key_mode="channel"))])
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
                cursor += int(counts[t]) * fmt.row_bytes(kind, t) + (int(counts[t]) > 0) * fmt.tiers[t].fixed_bytes(kind)
        assert int(fmt.meta_scale_start(counts)) == cursor
        cursor += META_SCALE_BYTES
        for t in range(len(tiers)):
            assert int(starts[INDEX, t]) == cursor
            cursor += int(counts[t])
        assert int(fmt.data_nbytes(counts)) == cursor
        nbytes = int(fmt.block_nbytes(counts))
        assert nbytes % BLOCK_ALIGN == 0 and 0 <= nbytes - cursor < BLOCK_ALIGN
        assert int(fmt.meta_scale_start(counts)) % 4 == 0                         # float32 meta scales aligned


@pytest.mark.parametrize("tiers", [DEFAULT, (TierSpec(8, 4), CHANNEL)])
def test_batched_offsets_match_single(tiers):
    fmt = BlockFormat(tiers, head_dim=64, page_size=32)
    counts = torch.randint(0, 3, (7, 3, 2))
    batched = fmt.section_starts(counts)
    assert batched.shape == (7, 3, 5, 2)
    for idx in itertools.product(range(7), range(3)):
        assert torch.equal(batched[idx], fmt.section_starts(counts[idx]))
    coeffs, presence, const = fmt.section_coefficients()
    per_token, fixed = fmt.meta_scale_coefficients()
    for idx in itertools.product(range(7), range(3)):
        n = counts[idx].tolist()
        for kind, t in itertools.product(range(5), range(2)):
            expected = sum(a * b + (a > 0) * c for a, b, c in zip(n, coeffs[kind][t], presence[kind][t])) + const[kind]
            assert expected == int(batched[idx][kind, t])
        assert sum(a * b + (a > 0) * c for a, b, c in zip(n, per_token, fixed)) == int(fmt.meta_scale_start(counts[idx]))


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
