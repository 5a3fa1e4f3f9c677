"""Compaction kernel (kernels/compaction.py) against the torch reference and a per-block copy, on poisoned arenas.

Layouts are random: live blocks (sizes 0 to 2 KiB in 16-byte units) separated by random holes slide down to
packed targets, so most new ranges overlap old ranges of other moved blocks. The whole arena is compared, so
bytes outside the new ranges must keep their poison.
"""

import pytest
import torch

from diffkv_sglang.kernels.compaction import move_blocks, move_blocks_reference
from diffkv_sglang.memory import BlockArena

pytestmark = pytest.mark.triton

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BLOCKS = 4000 if CUDA else 60
MAX_UNITS = 128                      # 2 KiB


def _sliding_layout(n: int, base_units: int = 3):
    """Old offsets with random holes, new offsets packed from ``base_units``; returns (old, new, sizes, end)."""
    sizes = torch.randint(0, MAX_UNITS + 1, (n,)) * 16
    sizes[torch.rand(n) < 0.05] = 0
    holes = torch.randint(0, MAX_UNITS, (n,)) * 16 * (torch.rand(n) < 0.6)
    old = base_units * 16 + torch.cumsum(sizes + holes, 0) - sizes + 16
    new = base_units * 16 + torch.cumsum(sizes, 0) - sizes
    return old, new, sizes, int(old[-1] + sizes[-1])


def _copy_per_block(data, old, new, sizes):
    """The plainest reference: copy every block from a snapshot."""
    snapshot = data.clone()
    for o, d, s in zip(old.tolist(), new.tolist(), sizes.tolist()):
        data[d:d + s] = snapshot[o:o + s]


def _check_move(data, old, new, sizes, **kwargs):
    expected = data.clone()
    _copy_per_block(expected, old, new, sizes)
    reference = data.clone()
    move_blocks_reference(reference, old, new, sizes)
    assert torch.equal(reference, expected)
    got = data.to(DEVICE)
    move_blocks(got, old.to(DEVICE), new.to(DEVICE), sizes.to(DEVICE), **kwargs)
    got = got.cpu()
    diff = (got != expected).nonzero()[:, 0]
    assert diff.numel() == 0, f"{diff.numel()} bytes differ, first at {diff[:8].tolist()}"


def _poisoned(nbytes: int) -> torch.Tensor:
    return torch.randint(0, 256, ((nbytes + 15) // 16 * 16,), dtype=torch.uint8)


def test_blocks_slide_down_over_holes(seeded):
    old, new, sizes, end = _sliding_layout(BLOCKS)
    overlaps = ((new[:, None] < old[None, :] + sizes[None, :]) & (old[None, :] < new[:, None] + sizes[:, None]))
    assert int(overlaps.sum() - overlaps.diagonal().sum()) > 0, "the layout should make new ranges overlap"
    _check_move(_poisoned(end + 64), old, new, sizes)


def test_bounded_prefix_and_given_tmp(seeded):
    """Only a prefix of the misplaced blocks moves (what compact(max_move_bytes) does); tmp given, oversized
    and poisoned."""
    old, new, sizes, end = _sliding_layout(BLOCKS)
    moved = slice(0, BLOCKS // 3)
    tmp = _poisoned(int(sizes.sum()) + 4096).to(DEVICE)
    _check_move(_poisoned(end + 64), old[moved], new[moved], sizes[moved], tmp=tmp)


def test_any_non_overlapping_targets(seeded):
    """Targets in another order and place (the kernel does not assume packed targets)."""
    old, _, sizes, end = _sliding_layout(BLOCKS)
    order = torch.randperm(BLOCKS)
    new = torch.empty_like(old)
    new[order] = 48 + torch.cumsum(sizes[order], 0) - sizes[order]
    _check_move(_poisoned(max(end, int((new + sizes).max())) + 64), old, new, sizes)


def test_empty_and_zero_sized(seeded):
    data = _poisoned(256)
    empty = torch.zeros(0, dtype=torch.int64)
    _check_move(data, empty, empty, empty)
    _check_move(data, torch.tensor([64, 128]), torch.tensor([0, 16]), torch.tensor([0, 32]))


def test_arena_compaction_with_kernel(seeded):
    """BlockArena moving blocks with move_blocks (``kernels=True``): bounded compactions keep every live byte."""
    arena = BlockArena(1 << 16, 64, device=DEVICE, kernels=True)
    arena.data.copy_(_poisoned(1 << 16).to(DEVICE))
    slots = torch.arange(64, device=DEVICE)
    arena.allocate(slots, torch.randint(0, 64, (64,), device=DEVICE) * 16)
    arena.free(slots[torch.randperm(64, device=DEVICE)[:30]])
    live = (arena.block_offset >= 0).nonzero()[:, 0]
    contents = {int(s): arena.data[int(arena.block_offset[s]):int(arena.block_offset[s] + arena.block_nbytes[s])].clone()
                for s in live}
    while arena.compact(max_move_bytes=1024).remaining_misplaced_blocks:
        arena.check_invariants()
    arena.check_invariants()
    assert arena.top == arena.used_bytes
    for s, before in contents.items():
        offset, size = int(arena.block_offset[s]), int(arena.block_nbytes[s])
        assert torch.equal(arena.data[offset:offset + size], before), f"slot {s} changed"


def test_move_blocks_rejects_bad_arguments():
    data = torch.zeros(256, dtype=torch.uint8, device=DEVICE)
    offsets = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="new_offsets"):
        move_blocks(data, offsets, offsets[:1], offsets)
    with pytest.raises(ValueError, match="nbytes"):
        move_blocks(data, offsets, offsets, offsets.int())
    with pytest.raises(ValueError, match="data"):
        move_blocks(data[:100], offsets, offsets, offsets)
    with pytest.raises(ValueError, match="tmp"):
        move_blocks(data, offsets, offsets, offsets, tmp=torch.zeros(16, device=DEVICE))
