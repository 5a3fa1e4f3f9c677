"""Compaction kernel: move arena blocks to new offsets through a temporary buffer, in 16-byte units.

The data movement of :meth:`diffkv_sglang.memory.BlockArena.compact`. A block's new range may overlap the old
range of another moved block (blocks slide down), so bytes go through ``tmp`` in two launches of one copy
kernel: a gather (every moved block into ``tmp``, packed in the given order) and a scatter (``tmp`` into the new
ranges). The launch boundary is the grid-wide barrier between the phases. One program copies one block in
tiles of ``BLOCK_UNITS`` 16-byte units, so no host sync is needed to size the grid::

    gather:   tmp[pack[i] : pack[i] + nbytes[i]]   = data[old[i] : old[i] + nbytes[i]]
    scatter:  data[new[i] : new[i] + nbytes[i]]    = tmp[pack[i] : pack[i] + nbytes[i]]
              with pack = exclusive_cumsum(nbytes)

The caller bounds the work by choosing the moved blocks (``BlockArena.compact(max_move_bytes)``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffkv_sglang.format import BLOCK_ALIGN

__all__ = ["move_blocks", "move_blocks_reference", "COPY_CONFIG"]

UNIT_BYTES = BLOCK_ALIGN          # blocks start and end on this boundary, so whole units move

COPY_CONFIG = {"BLOCK_UNITS": 256, "num_warps": 8}
"""Units per tile (256 x 16 B = 4 KiB: one 16-byte access per thread and tile with 8 warps) and warps."""


@triton.jit
def _copy_units_kernel(src, dst, src_units, dst_units, num_units, BLOCK_UNITS: tl.constexpr,
                       UNIT_WORDS: tl.constexpr):
    """Copy segment ``i`` (one program each): ``num_units[i]`` units of ``UNIT_WORDS`` int32 words from unit
    ``src_units[i]`` of ``src`` to unit ``dst_units[i]`` of ``dst``; ``src``/``dst`` are int32 views, ``*_units``
    int64 ``[n]``."""
    i = tl.program_id(0)
    src_word = tl.multiple_of(tl.load(src_units + i) * UNIT_WORDS, UNIT_WORDS)
    dst_word = tl.multiple_of(tl.load(dst_units + i) * UNIT_WORDS, UNIT_WORDS)
    count = tl.load(num_units + i)
    unit = tl.arange(0, BLOCK_UNITS)
    word = tl.arange(0, UNIT_WORDS)
    for start in range(0, count, BLOCK_UNITS):
        u = start + unit
        offsets = u[:, None] * UNIT_WORDS + word[None, :]
        mask = (u < count)[:, None]
        tl.store(dst + dst_word + offsets, tl.load(src + src_word + offsets, mask=mask), mask=mask)


def _check_int64_vector(name: str, x: torch.Tensor, n: int, device) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int64 or tuple(x.shape) != (n,) or x.device != device:
        got = f"{x.dtype} {tuple(x.shape)} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be an int64 [{n}] tensor on {device}, got {got}")


def _copy_segments(src: torch.Tensor, dst: torch.Tensor, src_bytes: torch.Tensor, dst_bytes: torch.Tensor,
                   nbytes: torch.Tensor) -> None:
    _copy_units_kernel[(nbytes.shape[0],)](
        src.view(torch.int32), dst.view(torch.int32), src_bytes // UNIT_BYTES, dst_bytes // UNIT_BYTES,
        nbytes // UNIT_BYTES, BLOCK_UNITS=COPY_CONFIG["BLOCK_UNITS"], UNIT_WORDS=UNIT_BYTES // 4,
        num_warps=COPY_CONFIG["num_warps"])


def move_blocks(data: torch.Tensor, old_offsets: torch.Tensor, new_offsets: torch.Tensor, nbytes: torch.Tensor,
                tmp: torch.Tensor | None = None) -> None:
    """Move ``n`` blocks of the arena to new offsets (gather into ``tmp``, then scatter), on ``data``'s stream.

    Args:
        data: the arena, contiguous 1-D uint8, size a multiple of 16.
        old_offsets, new_offsets: ``[n]`` int64 byte offsets, multiples of 16. The old ranges must not overlap
            each other, nor the new ranges each other; a new range may overlap any old range.
        nbytes: ``[n]`` int64 block sizes, multiples of 16 (0 allowed).
        tmp: optional contiguous uint8 buffer of at least ``nbytes.sum()`` bytes. Given, the call never syncs with
            the host; omitted, it is allocated after reading the total (one sync).

    Nothing outside the new ranges is written (``tmp`` aside). Sizes, offsets and bounds are not checked on the
    device: the caller (``BlockArena``) guarantees them.
    """
    device = data.device
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() % UNIT_BYTES or not data.is_contiguous():
        raise ValueError(f"data must be a contiguous 1-D uint8 tensor of a multiple of {UNIT_BYTES} bytes, "
                         f"got {data.dtype} {tuple(data.shape)}")
    n = old_offsets.shape[0] if isinstance(old_offsets, torch.Tensor) and old_offsets.dim() == 1 else -1
    for name, x in (("old_offsets", old_offsets), ("new_offsets", new_offsets), ("nbytes", nbytes)):
        _check_int64_vector(name, x, n, device)
    if n == 0:
        return
    pack = torch.cumsum(nbytes, 0) - nbytes
    if tmp is None:
        tmp = torch.empty(max(int(nbytes.sum()), UNIT_BYTES), dtype=torch.uint8, device=device)
    elif tmp.dtype != torch.uint8 or tmp.dim() != 1 or tmp.numel() % 4 or not tmp.is_contiguous() \
            or tmp.device != device:
        raise ValueError(f"tmp must be a contiguous 1-D uint8 tensor (multiple of 4 bytes) on {device}, got "
                         f"{tmp.dtype} {tuple(tmp.shape)} on {tmp.device}")
    _copy_segments(data, tmp, old_offsets, pack, nbytes)     # gather
    _copy_segments(tmp, data, pack, new_offsets, nbytes)     # scatter


def move_blocks_reference(data: torch.Tensor, old_offsets: torch.Tensor, new_offsets: torch.Tensor,
                          nbytes: torch.Tensor) -> None:
    """torch reference of :func:`move_blocks` (the unit gather/scatter of ``BlockArena._move_units``, for any
    non-overlapping target layout)."""
    units = nbytes // UNIT_BYTES
    total = int(units.sum())
    if total == 0:
        return
    start = torch.cumsum(units, 0) - units
    within = torch.arange(total, device=data.device) - torch.repeat_interleave(start, units, output_size=total)
    src = torch.repeat_interleave(old_offsets // UNIT_BYTES, units, output_size=total) + within
    dst = torch.repeat_interleave(new_offsets // UNIT_BYTES, units, output_size=total) + within
    words = data.view(torch.int64).view(-1, UNIT_BYTES // 8)
    moved = words[src]
    words[dst] = moved
