"""Tests for diffkv_sglang.memory.BlockArena: allocation, free, bounded compaction, invariants.

Every arena is poisoned with random bytes at construction, and every block is filled with fresh
random bytes after allocation, so no test can pass by reading zero-filled memory.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from diffkv_sglang.memory import ARENA_ALIGN, ArenaOutOfMemory, BlockArena, CompactionStats

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def aligned(n: int) -> int:
    return -(-n // ARENA_ALIGN) * ARENA_ALIGN


def i64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def make_arena(capacity: int, num_slots: int, device: str, seed: int = 0) -> BlockArena:
    """An arena whose bytes are poisoned with random values."""
    arena = BlockArena(capacity, num_slots, device)
    gen = torch.Generator().manual_seed(seed)
    arena.data.copy_(torch.randint(0, 256, (arena.capacity_bytes,), dtype=torch.uint8, generator=gen))
    return arena


def block(arena: BlockArena, slot: int) -> torch.Tensor:
    """The bytes of one slot's block, copied to the CPU."""
    offset, nbytes = int(arena.block_offset[slot]), int(arena.block_nbytes[slot])
    return arena.data[offset : offset + nbytes].cpu().clone()


def write_random(arena: BlockArena, slots, gen: torch.Generator) -> dict[int, torch.Tensor]:
    """Fill each slot's whole (aligned) block with fresh random bytes; return what was written."""
    written = {}
    for slot in slots:
        offset, nbytes = int(arena.block_offset[slot]), int(arena.block_nbytes[slot])
        content = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
        arena.data[offset : offset + nbytes] = content.to(arena.device)
        written[slot] = content
    return written


def assert_contents(arena: BlockArena, expected: dict[int, torch.Tensor]) -> None:
    for slot, content in expected.items():
        assert torch.equal(block(arena, slot), content), f"bytes of slot {slot} changed"


def snapshot(arena: BlockArena):
    return (
        arena.data.clone(),
        arena.block_offset.clone(),
        arena.block_nbytes.clone(),
        (arena.used_bytes, arena.top, arena.num_blocks),
    )


def assert_unchanged(arena: BlockArena, before) -> None:
    data, offsets, sizes, counters = before
    assert torch.equal(arena.data, data)
    assert torch.equal(arena.block_offset, offsets)
    assert torch.equal(arena.block_nbytes, sizes)
    assert (arena.used_bytes, arena.top, arena.num_blocks) == counters


def fragmented_arena(device: str, seed: int, num_slots: int = 48, capacity: int = 8192):
    """An arena with random-size blocks (some of size 0), a random third of them freed."""
    gen = torch.Generator().manual_seed(seed)
    arena = make_arena(capacity, num_slots, device, seed)
    sizes = torch.randint(0, 200, (num_slots,), generator=gen)
    sizes[torch.randperm(num_slots, generator=gen)[:4]] = 0
    arena.allocate(torch.arange(num_slots), sizes)
    expected = write_random(arena, range(num_slots), gen)
    freed = torch.randperm(num_slots, generator=gen)[: num_slots // 3]
    arena.free(freed)
    for slot in freed.tolist():
        del expected[slot]
    arena.check_invariants()
    return arena, expected


# ---------------------------------------------------------------- construction


def test_construction_rounds_capacity_down(device):
    arena = BlockArena(100, 5, device)
    assert arena.capacity_bytes == 96
    assert arena.data.shape == (96,) and arena.data.dtype == torch.uint8
    assert arena.block_offset.tolist() == [-1] * 5 and arena.block_offset.dtype == torch.int64
    assert arena.block_nbytes.tolist() == [0] * 5 and arena.block_nbytes.dtype == torch.int64
    assert (arena.used_bytes, arena.free_bytes, arena.top, arena.tail_free_bytes) == (0, 96, 0, 96)
    assert (arena.fragmented_bytes, arena.num_blocks) == (0, 0)
    arena.check_invariants()


@pytest.mark.parametrize(
    ("capacity", "num_slots", "name"),
    [(0, 4, "capacity_bytes"), (-16, 4, "capacity_bytes"), (15, 4, "capacity_bytes"), (64, 0, "num_slots")],
)
def test_construction_rejects_bad_sizes(capacity, num_slots, name):
    with pytest.raises(ValueError, match=name):
        BlockArena(capacity, num_slots)


# ---------------------------------------------------------------- allocate / free


def test_allocate_aligns_and_uses_prefix_sum(device):
    arena = make_arena(1024, 10, device)
    offsets = arena.allocate(i64([3, 0, 7]), i64([1, 16, 33]))
    assert offsets.device.type == torch.device(device).type
    assert offsets.tolist() == [0, 16, 32]
    assert arena.block_offset[[3, 0, 7]].tolist() == [0, 16, 32]
    assert arena.block_nbytes[[3, 0, 7]].tolist() == [16, 16, 48]
    assert (arena.used_bytes, arena.top, arena.num_blocks) == (80, 80, 3)
    assert arena.allocate(i64([1]), i64([17])).tolist() == [80]
    assert (arena.used_bytes, arena.top, arena.tail_free_bytes) == (112, 112, 1024 - 112)
    arena.check_invariants()


def test_rebind_hands_blocks_over_without_moving_bytes(device):
    arena = make_arena(1024, 10, device)
    offsets = arena.allocate(i64([8, 9]), i64([16, 48]))
    arena.data[offsets[1]:offsets[1] + 48] = 7
    state = (arena.used_bytes, arena.top, arena.num_blocks)
    arena.rebind(i64([9, 8]), i64([2, 3]))
    assert arena.block_offset[[2, 3, 8, 9]].tolist() == [16, 0, -1, -1]
    assert arena.block_nbytes[[2, 3, 8, 9]].tolist() == [48, 16, 0, 0]
    assert (arena.used_bytes, arena.top, arena.num_blocks) == state
    assert bool((arena.data[16:64] == 7).all())
    arena.check_invariants()
    for sources, targets, match in (([2], [3], "no target"), ([8], [4], "every source"), ([2], [2], "distinct"),
                                    ([2], [10], r"\[0, 10\)")):
        with pytest.raises(ValueError, match=match):
            arena.rebind(i64(sources), i64(targets))
    assert arena.block_offset[[2, 3]].tolist() == [16, 0]


def test_empty_batches_are_noops(device):
    arena = make_arena(256, 4, device)
    arena.allocate(i64([0]), i64([20]))
    before = snapshot(arena)
    assert arena.allocate(i64([]), i64([])).numel() == 0
    arena.free(i64([]))
    assert_unchanged(arena, before)


def test_zero_size_block_is_a_real_block(device):
    arena = make_arena(64, 4, device)
    arena.allocate(i64([0, 1, 2]), i64([16, 0, 16]))
    assert arena.block_offset[[0, 1, 2]].tolist() == [0, 16, 16]
    assert arena.block_nbytes[1].item() == 0
    assert (arena.num_blocks, arena.used_bytes, arena.top) == (3, 32, 32)
    with pytest.raises(ValueError, match="already hold"):
        arena.allocate(i64([1]), i64([0]))
    arena.check_invariants()
    # A full arena still accepts a size-0 block, at offset == capacity.
    arena.allocate(i64([3]), i64([32]))
    arena.free(i64([1]))
    assert arena.allocate(i64([1]), i64([0])).tolist() == [64]
    arena.check_invariants()
    arena.free(i64([0, 1]))
    assert (arena.num_blocks, arena.used_bytes, arena.top) == (2, 48, 64)
    stats = arena.compact()
    assert arena.block_offset[[2, 3]].tolist() == [0, 16]
    assert stats.remaining_misplaced_blocks == 0 and arena.top == 48
    arena.check_invariants()


def test_free_marks_dead_lowers_top_and_keeps_bytes(device):
    arena = make_arena(1024, 8, device)
    arena.allocate(torch.arange(4), i64([16, 32, 16, 48]))
    data = arena.data.clone()
    arena.free(i64([1]))  # a hole in the middle: top stays
    assert arena.block_offset[1].item() == -1 and arena.block_nbytes[1].item() == 0
    assert (arena.used_bytes, arena.top, arena.fragmented_bytes, arena.num_blocks) == (80, 112, 32, 3)
    arena.free(i64([3, 3, 1, 5]))  # topmost block, a repeat, an already-free slot, a never-used slot
    assert (arena.used_bytes, arena.top, arena.fragmented_bytes, arena.num_blocks) == (32, 64, 32, 2)
    arena.free(i64([2]))  # top falls through the hole to the end of block 0
    assert (arena.used_bytes, arena.top, arena.num_blocks) == (16, 16, 1)
    assert torch.equal(arena.data, data)
    arena.check_invariants()
    arena.free(torch.arange(8))
    assert (arena.used_bytes, arena.top, arena.num_blocks) == (0, 0, 0)
    arena.check_invariants()


def test_clear(device):
    arena, _ = fragmented_arena(device, seed=1)
    arena.clear()
    assert (arena.used_bytes, arena.top, arena.num_blocks) == (0, 0, 0)
    assert (arena.block_offset == -1).all() and (arena.block_nbytes == 0).all()
    arena.check_invariants()


# ---------------------------------------------------------------- out of memory


def test_out_of_memory_raises_before_any_change(device):
    arena = make_arena(256, 8, device)
    arena.allocate(torch.arange(4), i64([64, 32, 64, 64]))
    arena.free(i64([0, 2]))  # 160 free: two holes of 64 and a tail of 32
    before = snapshot(arena)
    with pytest.raises(ArenaOutOfMemory) as err:
        arena.allocate(i64([4, 5]), i64([100, 50]))  # 112 + 64 = 176 > 160
    assert (err.value.requested_bytes, err.value.free_bytes, err.value.capacity_bytes) == (176, 160, 256)
    assert isinstance(err.value, RuntimeError)
    assert_unchanged(arena, before)
    arena.check_invariants()


def test_allocate_compacts_when_tail_is_too_small(device):
    gen = torch.Generator().manual_seed(7)
    arena = make_arena(256, 8, device)
    arena.allocate(torch.arange(4), i64([64, 48, 64, 48]))
    expected = write_random(arena, range(4), gen)
    arena.free(i64([0, 2]))
    del expected[0], expected[2]
    assert (arena.tail_free_bytes, arena.free_bytes) == (32, 160)
    offsets = arena.allocate(i64([5, 6]), i64([100, 48]))  # 112 + 48 = 160: fits only after compaction
    assert offsets.tolist() == [96, 208]
    assert arena.block_offset[[1, 3]].tolist() == [0, 48]
    assert (arena.used_bytes, arena.top, arena.free_bytes) == (256, 256, 0)
    assert_contents(arena, expected)
    arena.check_invariants()


# ---------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    ("slots", "nbytes", "match"),
    [
        (torch.zeros(2, 1, dtype=torch.int64), i64([16, 16]), "1-D int64"),
        (torch.tensor([0, 1], dtype=torch.int32), i64([16, 16]), "slots must be a 1-D int64"),
        (i64([0, 1]), torch.tensor([16.0, 16.0]), "nbytes must be a 1-D int64"),
        ([0, 1], i64([16, 16]), "slots must be a torch.Tensor"),
        (i64([0, 1]), i64([16]), "same shape"),
        (i64([0, 8]), i64([16, 16]), r"\[0, 8\)"),
        (i64([-1]), i64([16]), r"\[0, 8\)"),
        (i64([2, 2]), i64([16, 16]), "distinct"),
        (i64([4, 1]), i64([16, 16]), "already hold"),
        (i64([2]), i64([-1]), "nbytes must be >= 0"),
    ],
)
def test_allocate_rejects_bad_input_without_change(device, slots, nbytes, match):
    arena = make_arena(256, 8, device)
    arena.allocate(i64([4]), i64([16]))
    before = snapshot(arena)
    with pytest.raises(ValueError, match=match):
        arena.allocate(slots, nbytes)
    assert_unchanged(arena, before)


@pytest.mark.parametrize(
    ("slots", "match"),
    [
        (i64([1, 8]), r"\[0, 8\)"),
        (i64([-1, 1]), r"\[0, 8\)"),
        (torch.tensor([1], dtype=torch.int32), "1-D int64"),
        (i64([[1]]), "1-D int64"),
    ],
)
def test_free_rejects_bad_input_without_change(device, slots, match):
    arena = make_arena(256, 8, device)
    arena.allocate(i64([1, 7]), i64([16, 32]))
    before = snapshot(arena)
    with pytest.raises(ValueError, match=match):
        arena.free(slots)
    assert_unchanged(arena, before)


def test_compact_rejects_negative_budget(device):
    with pytest.raises(ValueError, match="max_move_bytes"):
        make_arena(64, 2, device).compact(-1)


def test_check_invariants_detects_corruption(device):
    def corrupted(mutate, match):
        arena = make_arena(256, 4, device)
        arena.allocate(torch.arange(3), i64([32, 32, 32]))
        arena.check_invariants()
        mutate(arena)
        with pytest.raises(AssertionError, match=match):
            arena.check_invariants()

    corrupted(lambda a: a.block_offset.__setitem__(1, 16), "overlap")
    corrupted(lambda a: a.block_offset.__setitem__(1, 40), "unaligned")
    corrupted(lambda a: a.block_offset.__setitem__(2, 240), "above top")
    corrupted(lambda a: a.block_nbytes.__setitem__(3, 16), "dead slot")
    corrupted(lambda a: setattr(a, "_used", 64), "used_bytes")
    corrupted(lambda a: setattr(a, "_top", 128), "not the highest block end")
    corrupted(lambda a: setattr(a, "_num_blocks", 2), "num_blocks")


# ---------------------------------------------------------------- compaction


def test_full_compaction_packs_in_offset_order(device):
    arena, expected = fragmented_arena(device, seed=3)
    order_before = sorted(expected, key=lambda s: (int(arena.block_offset[s]), int(arena.block_nbytes[s]) > 0))
    stats = arena.compact()
    assert isinstance(stats, CompactionStats) and stats.seconds >= 0
    assert stats.remaining_misplaced_blocks == 0 and stats.moved_blocks > 0
    assert arena.top == arena.used_bytes and arena.fragmented_bytes == 0
    running = 0
    for slot in order_before:  # packed, and in the same order as before
        assert int(arena.block_offset[slot]) == running
        running += int(arena.block_nbytes[slot])
    assert_contents(arena, expected)
    arena.check_invariants()
    again = arena.compact()
    assert (again.moved_blocks, again.moved_bytes, again.remaining_misplaced_blocks) == (0, 0, 0)


def test_bounded_compaction_budget_is_inclusive_and_always_progresses(device):
    gen = torch.Generator().manual_seed(5)
    arena = make_arena(256, 4, device)
    arena.allocate(torch.arange(4), i64([16, 32, 32, 32]))
    expected = write_random(arena, range(1, 4), gen)
    arena.free(i64([0]))
    stats = arena.compact(64)  # exactly two blocks fit the budget
    assert (stats.moved_blocks, stats.moved_bytes, stats.remaining_misplaced_blocks) == (2, 64, 1)
    assert arena.block_offset[1:].tolist() == [0, 32, 80] and arena.top == 112
    stats = arena.compact(0)  # a budget below one block still moves that block
    assert (stats.moved_blocks, stats.moved_bytes, stats.remaining_misplaced_blocks) == (1, 32, 0)
    assert arena.block_offset[1:].tolist() == [0, 32, 64] and arena.top == 96
    assert_contents(arena, expected)
    arena.check_invariants()


@pytest.mark.parametrize("max_move_bytes", [0, 16, 40, 100, 1000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bounded_compaction_respects_budget_and_converges(device, max_move_bytes, seed):
    arena, expected = fragmented_arena(device, seed=seed)
    used = arena.used_bytes
    remaining = None
    for _ in range(arena.num_slots + 1):
        offsets_before = arena.block_offset.clone()
        stats = arena.compact(max_move_bytes)
        moved = (arena.block_offset != offsets_before).nonzero().squeeze(1)
        assert stats.moved_blocks == moved.numel()
        assert stats.moved_bytes == int(arena.block_nbytes[moved].sum())
        nonempty_moved = int((arena.block_nbytes[moved] > 0).sum())
        assert stats.moved_bytes <= max_move_bytes or nonempty_moved == 1, "budget exceeded by more than one block"
        if remaining is not None:
            assert stats.remaining_misplaced_blocks < remaining
        remaining = stats.remaining_misplaced_blocks
        assert arena.used_bytes == used
        assert_contents(arena, expected)
        arena.check_invariants()
        if remaining == 0:
            break
    assert remaining == 0
    assert arena.top == arena.used_bytes


# ---------------------------------------------------------------- random operation sequences


def expected_compaction(arena: BlockArena, max_move_bytes: int | None) -> dict[int, int]:
    """Reference model of one compaction in plain Python: the new offset of each moved slot."""
    live = [s for s in range(arena.num_slots) if int(arena.block_offset[s]) >= 0]
    live.sort(key=lambda s: (int(arena.block_offset[s]), int(arena.block_nbytes[s]) > 0))
    new_offsets, target, budget_used, moved_any = {}, 0, 0, False
    for slot in live:
        offset, size = int(arena.block_offset[slot]), int(arena.block_nbytes[slot])
        if offset != target:
            within = max_move_bytes is None or budget_used + size <= max_move_bytes
            if not (within or budget_used == 0):
                break
            new_offsets[slot] = target
            budget_used += size
            moved_any = True
        elif moved_any:
            raise AssertionError("a packed block follows a misplaced one")
        target += size
    return new_offsets


class ArenaMachine(RuleBasedStateMachine):
    """Random alloc / free / compact on a small arena, checked against a byte-level model."""

    device = "cpu"
    CAPACITY = 1000  # rounds down to 992
    NUM_SLOTS = 12

    def __init__(self):
        super().__init__()
        self.arena = make_arena(self.CAPACITY, self.NUM_SLOTS, self.device, seed=11)
        self.expected: dict[int, torch.Tensor] = {}

    @rule(data=st.data(), seed=st.integers(0, 2**31 - 1))
    def allocate(self, data, seed):
        vacant = [s for s in range(self.NUM_SLOTS) if s not in self.expected]
        slots = data.draw(st.lists(st.sampled_from(vacant), unique=True, max_size=4)) if vacant else []
        sizes = data.draw(st.lists(st.integers(0, 200), min_size=len(slots), max_size=len(slots)))
        requested = sum(aligned(n) for n in sizes)
        free_before, capacity = self.arena.free_bytes, self.arena.capacity_bytes
        if requested > free_before:
            before = snapshot(self.arena)
            with pytest.raises(ArenaOutOfMemory) as err:
                self.arena.allocate(i64(slots), i64(sizes))
            assert (err.value.requested_bytes, err.value.free_bytes) == (requested, free_before)
            assert err.value.capacity_bytes == capacity
            assert_unchanged(self.arena, before)
            return
        offsets = self.arena.allocate(i64(slots), i64(sizes))
        assert offsets.tolist() == self.arena.block_offset[i64(slots)].tolist()
        assert self.arena.block_nbytes[i64(slots)].tolist() == [aligned(n) for n in sizes]
        self.expected.update(write_random(self.arena, slots, torch.Generator().manual_seed(seed)))

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def free(self, data):
        held = sorted(self.expected)
        slots = data.draw(st.lists(st.sampled_from(held), max_size=3)) if held else []
        # Repeated and vacant slots are ignored by free.
        slots += data.draw(st.lists(st.integers(0, self.NUM_SLOTS - 1), max_size=2))
        self.arena.free(i64(slots))
        for slot in slots:
            self.expected.pop(slot, None)

    @precondition(lambda self: self.expected)
    @rule(max_move_bytes=st.one_of(st.none(), st.integers(0, 300)))
    def compact(self, max_move_bytes):
        new_offsets = expected_compaction(self.arena, max_move_bytes)
        stats = self.arena.compact(max_move_bytes)
        assert stats.moved_blocks == len(new_offsets)
        for slot, offset in new_offsets.items():
            assert int(self.arena.block_offset[slot]) == offset
        if max_move_bytes is None:
            assert stats.remaining_misplaced_blocks == 0
            assert self.arena.top == self.arena.used_bytes

    @invariant()
    def consistent(self):
        arena = self.arena
        arena.check_invariants()
        assert arena.num_blocks == len(self.expected)
        assert arena.used_bytes == sum(c.numel() for c in self.expected.values())
        assert arena.used_bytes + arena.free_bytes == arena.capacity_bytes
        # Independent overlap / alignment / bounds check, not trusting check_invariants.
        spans = sorted(
            (int(arena.block_offset[s]), int(arena.block_nbytes[s])) for s in self.expected
        )
        for offset, size in spans:
            assert offset % ARENA_ALIGN == 0 and offset + size <= arena.top <= arena.capacity_bytes
        nonempty = [(o, o + n) for o, n in spans if n]
        assert all(end <= start for (_, end), (start, _) in zip(nonempty, nonempty[1:]))
        assert_contents(arena, self.expected)


def test_random_operation_sequences(device):
    machine = type(f"ArenaMachine_{device}", (ArenaMachine,), {"device": device})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=60,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
