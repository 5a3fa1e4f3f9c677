"""On-device memory manager: a byte arena of variable-size blocks addressed by slot id.

The compressed KV store keeps one variable-size block per (logical page, layer, KV head) and
addresses it by a *slot id*; ``BlockArena.block_offset`` is the slot table (byte offset of each
slot's block, -1 when it has none), so it doubles as the offset column of the store's
descriptor table. Allocation is a bump allocator made parallel: a batch of requests is rounded
up to ``ARENA_ALIGN`` bytes, an exclusive prefix sum over the sizes gives every block its offset
above the bump pointer ``top`` in one step, and ``top`` advances by the total. Free only marks
slots dead (offset -1, size 0) and lowers ``top`` to the end of the highest live block, so the
holes it leaves below ``top`` stay until compaction. Compaction is stateless and may be bounded:
live blocks sorted by offset have packed targets given by an exclusive prefix sum of their
sizes; the blocks whose target differs from their offset form a suffix of that order, and a
prefix of that suffix (at most ``max_move_bytes``, but always at least one block) slides down
through a temporary buffer in 16-byte units, in one gather and one scatter. Repeated bounded
calls therefore converge to a packed arena with all free space in one region at the end.
Every batch operation is vectorized on the arena's device and reads its results back to the
host in one synchronisation (compaction in two: the live-block count, then the move plan).
Compaction's data movement runs the Triton kernel ``kernels/compaction.py`` (``move_blocks``) when
the arena uses kernels (see :mod:`diffkv_sglang.backend_select`), the torch unit gather/scatter
otherwise; both copy the same bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .backend_select import use_kernels
from .format import BLOCK_ALIGN, DESCRIPTOR_OFFSET_DTYPE

__all__ = ["ARENA_ALIGN", "ArenaOutOfMemory", "BlockArena", "CompactionStats"]

ARENA_ALIGN = BLOCK_ALIGN
"""Every block starts at a multiple of this many bytes, and every size is rounded up to it (the format's
alignment: the arena never has to know a block's layout beyond it)."""

_WORDS_PER_UNIT = ARENA_ALIGN // 8  # compaction copies int64 words, two per 16-byte unit


def _align(nbytes: Tensor) -> Tensor:
    """Round int64 sizes up to a multiple of ``ARENA_ALIGN``."""
    return (nbytes + (ARENA_ALIGN - 1)) // ARENA_ALIGN * ARENA_ALIGN


def _require(condition: bool, message: str) -> None:
    """Raise ``AssertionError(message)`` unless ``condition`` (survives ``python -O``)."""
    if not condition:
        raise AssertionError(message)


class ArenaOutOfMemory(RuntimeError):
    """The arena cannot hold an allocation even after compaction; nothing was changed.

    The caller acts on it (evicts from the radix tree, retracts a request) and may retry.

    Attributes
    ----------
    requested_bytes : int
        Total aligned size of the refused batch.
    free_bytes : int
        Free bytes at the time of the request (holes included).
    capacity_bytes : int
        Capacity of the arena.
    """

    def __init__(self, requested_bytes: int, free_bytes: int, capacity_bytes: int):
        super().__init__(
            f"block arena out of memory: requested {requested_bytes} B, "
            f"{free_bytes} B free of {capacity_bytes} B"
        )
        self.requested_bytes = requested_bytes
        self.free_bytes = free_bytes
        self.capacity_bytes = capacity_bytes


@dataclass(frozen=True)
class CompactionStats:
    """What one ``BlockArena.compact`` call did.

    Attributes
    ----------
    moved_blocks : int
        Blocks whose offset changed (size-0 blocks included).
    moved_bytes : int
        Aligned bytes copied.
    remaining_misplaced_blocks : int
        Blocks still not packed; 0 after a full compaction.
    seconds : float
        Host wall-clock time of the call; on an asynchronous device (CUDA) the copy may still be
        running on the stream when the call returns.
    """

    moved_blocks: int
    moved_bytes: int
    remaining_misplaced_blocks: int
    seconds: float


class BlockArena:
    """A device byte arena of variable-size blocks, one optional block per slot id.

    Parameters
    ----------
    capacity_bytes : int
        Arena size; rounded down to a multiple of ``ARENA_ALIGN`` and must stay > 0.
    num_slots : int
        Number of slot ids, ``[0, num_slots)``; must be > 0.
    device : torch.device or str
        Where the bytes and tables live.
    kernels : bool or None
        Move compacted blocks with the Triton kernel (True) or torch (False); None asks
        :func:`diffkv_sglang.backend_select.use_kernels` (the ``DIFFKV_KERNELS`` switch).

    Attributes
    ----------
    data : Tensor, uint8 [capacity_bytes]
        The bytes (uninitialised at construction).
    block_offset : Tensor, int64 [num_slots]
        Byte offset of each slot's block, -1 if the slot has no block.
    block_nbytes : Tensor, int64 [num_slots]
        Aligned size of each slot's block, 0 if none.
    moves : int
        Incremented whenever live blocks change offset or slot (``compact``, ``rebind``), so a reader that cached
        offsets can tell with one integer comparison whether they still hold.

    A size-0 request gives its slot a real, size-0 block: the slot holds a block (it counts in
    ``num_blocks``, must be freed before it is allocated again) at an aligned offset in
    ``[0, capacity_bytes]`` that addresses no bytes.
    """

    def __init__(self, capacity_bytes: int, num_slots: int, device: torch.device | str = "cpu",
                 kernels: bool | None = None):
        capacity = int(capacity_bytes) // ARENA_ALIGN * ARENA_ALIGN
        if capacity <= 0:
            raise ValueError(
                f"capacity_bytes must be at least ARENA_ALIGN={ARENA_ALIGN}, got {capacity_bytes}"
            )
        if int(num_slots) <= 0:
            raise ValueError(f"num_slots must be > 0, got {num_slots}")
        self.device = torch.device(device)
        self.kernels = use_kernels(self.device) if kernels is None else bool(kernels)
        self.num_slots = int(num_slots)
        self.data = torch.empty(capacity, dtype=torch.uint8, device=self.device)
        self.block_offset = torch.full((self.num_slots,), -1, dtype=DESCRIPTOR_OFFSET_DTYPE, device=self.device)
        self.block_nbytes = torch.zeros(self.num_slots, dtype=DESCRIPTOR_OFFSET_DTYPE, device=self.device)
        self._capacity = capacity
        self._used = 0
        self._top = 0
        self._num_blocks = 0
        self.moves = 0

    def to(self, device: torch.device | str, kernels: bool | None = None) -> "BlockArena":
        """A copy of this arena on ``device``: its bytes, block table and allocation state (``kernels`` as in the
        constructor: None follows ``DIFFKV_KERNELS`` for ``device``)."""
        copy = BlockArena(self._capacity, self.num_slots, device, kernels)
        for name in ("data", "block_offset", "block_nbytes"):
            getattr(copy, name).copy_(getattr(self, name))
        copy._used, copy._top, copy._num_blocks = self._used, self._top, self._num_blocks
        return copy

    @property
    def capacity_bytes(self) -> int:
        """Arena size in bytes (a multiple of ``ARENA_ALIGN``)."""
        return self._capacity

    @property
    def used_bytes(self) -> int:
        """Sum of the aligned sizes of the live blocks."""
        return self._used

    @property
    def free_bytes(self) -> int:
        """``capacity_bytes - used_bytes``: holes below ``top`` plus the tail."""
        return self._capacity - self._used

    @property
    def top(self) -> int:
        """Bump pointer: the end of the highest live block (0 when empty)."""
        return self._top

    @property
    def tail_free_bytes(self) -> int:
        """Contiguous free bytes above ``top``."""
        return self._capacity - self._top

    @property
    def fragmented_bytes(self) -> int:
        """Free bytes in holes below ``top`` (``top - used_bytes``)."""
        return self._top - self._used

    @property
    def num_blocks(self) -> int:
        """Number of slots that hold a block (size-0 blocks included)."""
        return self._num_blocks

    def _slot_tensor(self, name: str, tensor: Tensor) -> Tensor:
        """Check that ``tensor`` is an int64 vector and return it on the arena's device."""
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 1 or tensor.dtype != torch.int64:
            raise ValueError(
                f"{name} must be a 1-D int64 tensor, got shape {tuple(tensor.shape)} dtype {tensor.dtype}"
            )
        return tensor.to(self.device)

    def allocate(self, slots: Tensor, nbytes: Tensor) -> Tensor:
        """Give each slot a new block, for a whole batch in one parallel step.

        Sizes are rounded up to ``ARENA_ALIGN``; offsets are ``top`` plus the exclusive prefix
        sum of the sizes, in the order given. If the tail above ``top`` is too small but the
        free bytes suffice, the arena is fully compacted first.

        Parameters
        ----------
        slots : Tensor, int64 [n]
            Distinct slot ids in ``[0, num_slots)``, none of which holds a block.
        nbytes : Tensor, int64 [n]
            Requested sizes, >= 0 (see the class docstring for size 0).

        Returns
        -------
        Tensor, int64 [n]
            Byte offset of each new block, on the arena's device.

        Raises
        ------
        ValueError
            Bad shapes or dtypes, slot out of range, duplicate slot, slot already holding a
            block, negative size. Nothing is changed.
        ArenaOutOfMemory
            The aligned total exceeds ``free_bytes``. Nothing is changed.
        """
        slots = self._slot_tensor("slots", slots)
        nbytes = self._slot_tensor("nbytes", nbytes)
        if nbytes.shape != slots.shape:
            raise ValueError(
                f"slots and nbytes must have the same shape, got {tuple(slots.shape)} and {tuple(nbytes.shape)}"
            )
        if slots.numel() == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        sizes = _align(nbytes)
        out_of_range = (slots < 0) | (slots >= self.num_slots)
        held = self.block_offset[slots.clamp(0, self.num_slots - 1)] >= 0
        ordered = slots.sort().values
        any_out, any_negative, any_duplicate, any_held, total = torch.stack(
            [
                out_of_range.any().long(),
                (nbytes < 0).any().long(),
                (ordered[1:] == ordered[:-1]).any().long(),
                held.any().long(),
                sizes.sum(),
            ]
        ).tolist()
        if any_out:
            raise ValueError(
                f"slots must lie in [0, {self.num_slots}), got {slots[out_of_range][:8].tolist()}"
            )
        if any_negative:
            raise ValueError(f"nbytes must be >= 0, got {nbytes[nbytes < 0][:8].tolist()}")
        if any_duplicate:
            raise ValueError("slots must be distinct")
        if any_held:
            raise ValueError(
                f"slots already hold a block (free them first): {slots[held][:8].tolist()}"
            )
        if total > self.free_bytes:
            raise ArenaOutOfMemory(total, self.free_bytes, self._capacity)
        if total > self.tail_free_bytes:
            self.compact()
        offsets = self._top + torch.cumsum(sizes, 0) - sizes
        self.block_offset[slots] = offsets
        self.block_nbytes[slots] = sizes
        self._top += total
        self._used += total
        self._num_blocks += slots.numel()
        return offsets

    def free(self, slots: Tensor) -> None:
        """Release the blocks of these slots; their bytes are left as they are.

        Slots without a block (and repeated slots) are ignored, so releasing twice is harmless.
        ``top`` comes down to the end of the highest remaining live block. Costs a few passes
        over the slot table (O(num_slots)) and one host sync.

        Parameters
        ----------
        slots : Tensor, int64 [n]
            Slot ids in ``[0, num_slots)``.

        Raises
        ------
        ValueError
            Bad shape or dtype, or a slot out of range. Nothing is changed.
        """
        slots = self._slot_tensor("slots", slots)
        if slots.numel() == 0:
            return
        out_of_range = (slots < 0) | (slots >= self.num_slots)
        released = torch.zeros(self.num_slots, dtype=torch.bool, device=self.device)
        released[slots.clamp(0, self.num_slots - 1)] = True
        kept = (self.block_offset >= 0) & ~released
        any_out, used, top, num_blocks = torch.stack(
            [
                out_of_range.any().long(),
                torch.where(kept, self.block_nbytes, 0).sum(),
                torch.where(kept, self.block_offset + self.block_nbytes, 0).max(),
                kept.sum(),
            ]
        ).tolist()
        if any_out:
            raise ValueError(
                f"slots must lie in [0, {self.num_slots}), got {slots[out_of_range][:8].tolist()}"
            )
        self.block_offset.masked_fill_(released, -1)
        self.block_nbytes.masked_fill_(released, 0)
        self._used, self._top, self._num_blocks = used, top, num_blocks

    def rebind(self, sources: Tensor, targets: Tensor) -> None:
        """Hand the blocks of ``sources`` to ``targets`` without moving a byte: ``targets[i]`` gets the offset and
        size of ``sources[i]``'s block, which then holds none. ``used``, ``top`` and the block count are unchanged.
        (The store seals into spare slots while the staged blocks are live, then rebinds.) One host sync.

        Parameters
        ----------
        sources, targets : Tensor, int64 [n]
            Distinct slot ids in ``[0, num_slots)``; every source holds a block, no target does.

        Raises
        ------
        ValueError
            Bad shapes, a slot out of range, a source without a block or a target holding one. Nothing is
            changed.
        """
        sources = self._slot_tensor("sources", sources)
        targets = self._slot_tensor("targets", targets)
        if sources.shape != targets.shape:
            raise ValueError(f"sources and targets must have the same shape, got {tuple(sources.shape)} and "
                             f"{tuple(targets.shape)}")
        if sources.numel() == 0:
            return
        both = torch.cat([sources, targets])
        in_range = (both >= 0) & (both < self.num_slots)
        held = self.block_offset[both.clamp(0, self.num_slots - 1)] >= 0
        n = sources.numel()
        ordered = both.sort().values
        out_of_range, empty_source, held_target, repeated = torch.stack([
            (~in_range).any(), (~held[:n]).any(), held[n:].any(), (ordered[1:] == ordered[:-1]).any()]).tolist()
        if out_of_range:
            raise ValueError(f"slots must lie in [0, {self.num_slots}), got {both[~in_range][:8].tolist()}")
        if empty_source or held_target or repeated:
            raise ValueError("rebind: every source must hold a block, no target may, and all slots must be distinct")
        self.block_offset[targets] = self.block_offset[sources]
        self.block_nbytes[targets] = self.block_nbytes[sources]
        self.block_offset[sources] = -1
        self.block_nbytes[sources] = 0
        self.moves += 1

    def compact(self, max_move_bytes: int | None = None) -> CompactionStats:
        """Slide live blocks toward offset 0, keeping their order, so free space joins the tail.

        Live blocks sorted by offset have packed targets (exclusive prefix sum of their sizes).
        Those whose target differs from their offset are misplaced; they form a suffix of the
        order. This call moves the longest prefix of that suffix whose total size is at most
        ``max_move_bytes``, and always at least the first misplaced block, so every call makes
        progress. Bytes go through a temporary buffer, since a block's new range may overlap
        another moved block's old range. Moved slots get their new ``block_offset``.

        Parameters
        ----------
        max_move_bytes : int or None
            Copy budget in bytes (>= 0); exceeded only by a single block larger than it.
            None moves every misplaced block, after which ``top == used_bytes``.

        Returns
        -------
        CompactionStats
        """
        if max_move_bytes is not None and max_move_bytes < 0:
            raise ValueError(f"max_move_bytes must be >= 0 or None, got {max_move_bytes}")
        start = time.perf_counter()
        live_slots = torch.nonzero(self.block_offset >= 0).squeeze(1)
        offsets = self.block_offset[live_slots]
        sizes = self.block_nbytes[live_slots]
        # Ties on offset: a size-0 block sorts before the block that starts where it sits.
        order = torch.argsort(offsets + (sizes > 0).long())
        live_slots, offsets, sizes = live_slots[order], offsets[order], sizes[order]
        targets = torch.cumsum(sizes, 0) - sizes
        misplaced = targets != offsets
        misplaced_sizes = torch.where(misplaced, sizes, 0)
        moved_through = torch.cumsum(misplaced_sizes, 0)
        move = misplaced
        if max_move_bytes is not None:
            move = misplaced & ((moved_through <= max_move_bytes) | (moved_through == misplaced_sizes))
        num_misplaced, num_moved, moved_bytes = torch.stack(
            [misplaced.sum(), move.sum(), torch.where(move, sizes, 0).sum()]
        ).tolist()
        if num_moved:
            first = live_slots.numel() - num_misplaced
            moving = slice(first, first + num_moved)
            self._move_units(offsets[moving], targets[moving], sizes[moving], moved_bytes)
            self.block_offset[live_slots[moving]] = targets[moving]
            self.moves += 1
            if num_moved == num_misplaced:
                self._top = self._used
        return CompactionStats(
            moved_blocks=num_moved,
            moved_bytes=moved_bytes,
            remaining_misplaced_blocks=num_misplaced - num_moved,
            seconds=time.perf_counter() - start,
        )

    def _move_units(self, sources: Tensor, targets: Tensor, sizes: Tensor, total_bytes: int) -> None:
        """Copy blocks (int64 [m] offsets and sizes) to targets that are packed one after another.

        One gather of every moved 16-byte unit into a temporary buffer, then one scatter: two launches
        of ``move_blocks`` with kernels (its buffer allocated here from the known total, so the move
        costs no extra host sync; the caching allocator reuses it), else torch indexing.
        """
        if self.kernels:
            from .kernels.compaction import move_blocks

            tmp = torch.empty(max(total_bytes, ARENA_ALIGN), dtype=torch.uint8, device=self.device)
            move_blocks(self.data, sources, targets, sizes, tmp)
            return
        units = sizes // ARENA_ALIGN
        total_units = total_bytes // ARENA_ALIGN
        dst = targets[0] // ARENA_ALIGN + torch.arange(total_units, device=self.device)
        shift = torch.repeat_interleave((sources - targets) // ARENA_ALIGN, units, output_size=total_units)
        words = self.data.view(torch.int64).view(-1, _WORDS_PER_UNIT)
        moved = words[dst + shift]
        words[dst] = moved

    def check_invariants(self) -> None:
        """Check the tables and counters against each other (debug and test use; syncs).

        Raises
        ------
        AssertionError
            Naming the first violation: dead slot with a size, unaligned offset or size, block
            crossing ``top`` or the capacity, ``top`` not the highest block end, overlapping
            blocks, counters out of step with the tables.
        """
        offsets, sizes = self.block_offset, self.block_nbytes
        live = offsets >= 0
        dead = ~live
        _require(bool((offsets[dead] == -1).all()), "a dead slot has an offset other than -1")
        _require(bool((sizes[dead] == 0).all()), "a dead slot has a nonzero size")
        _require(bool((sizes >= 0).all()), "a block has a negative size")
        _require(bool((offsets[live] % ARENA_ALIGN == 0).all()), "a block offset is unaligned")
        _require(bool((sizes % ARENA_ALIGN == 0).all()), "a block size is unaligned")
        _require(0 <= self._top <= self._capacity, f"top {self._top} outside [0, {self._capacity}]")
        ends = torch.where(live, offsets + sizes, 0)
        highest = int(ends.max())
        _require(highest <= self._top, f"a block ends at {highest}, above top {self._top}")
        _require(highest == self._top, f"top {self._top} is not the highest block end {highest}")
        nonempty = live & (sizes > 0)
        starts, order = offsets[nonempty].sort()
        block_ends = ends[nonempty][order]
        overlap = torch.nonzero(starts[1:] < block_ends[:-1]).squeeze(1)
        if overlap.numel():
            slots = torch.nonzero(nonempty).squeeze(1)[order]
            i = int(overlap[0])
            raise AssertionError(
                f"blocks of slots {int(slots[i])} and {int(slots[i + 1])} overlap: "
                f"[{int(starts[i])}, {int(block_ends[i])}) and [{int(starts[i + 1])}, {int(block_ends[i + 1])})"
            )
        used = int(sizes.sum())
        _require(self._used == used, f"used_bytes {self._used} != sum of live sizes {used}")
        count = int(live.sum())
        _require(self._num_blocks == count, f"num_blocks {self._num_blocks} != live slots {count}")
        _require(self.used_bytes + self.free_bytes == self._capacity, "used + free != capacity")

    def clear(self) -> None:
        """Drop every block (bytes are left as they are)."""
        self.block_offset.fill_(-1)
        self.block_nbytes.zero_()
        self._used = 0
        self._top = 0
        self._num_blocks = 0
