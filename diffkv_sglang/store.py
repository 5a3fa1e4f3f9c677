"""The compressed KV store of one model rank: staged (dense) and sealed (compressed) blocks in one arena.

Logical token slots come from SGLang's paged allocator: slot ``s`` is token ``s % page_size`` of logical page
``s // page_size``. For every (logical page, layer, KV head) the store keeps at most one block in a
:class:`~diffkv_sglang.memory.BlockArena`; the arena's slot id is ``(page * num_layers + layer) * num_kv_heads + head``.
A page's life::

    EMPTY --stage()--> STAGED --seal()--> SEALED --release()--> EMPTY
                         |                                   ^
                         +------------- release() ------------+

* ``stage(pages)`` gives the pages dense blocks (model dtype K/V plus importance statistics) in every layer.
* ``write_tokens(layer, locs, k, v)`` stores new tokens (``token_rows(locs)`` plans a batch's writes once);
  ``add_importance(...)`` accumulates attention.
* ``seal(pages, context_lens)`` classifies each token per (layer, head) with :mod:`policy`, writes one compressed
  block per (page, layer, head) with :mod:`quant` (or the seal kernel, byte for byte the same, when
  ``store.kernels``), and frees the dense blocks. The compressed blocks are allocated in spare slots while the
  staged ones are live, so the seal kernel reads the staged blocks in place (no dense copy), then the staged
  blocks are freed and the pages' slots take the new blocks (:meth:`BlockArena.rebind`). Without room for both,
  sealing goes on in halves of the chunk, and a single page that still does not fit is copied out (``L * H``
  blocks), freed and written; a compressed block is never larger than a staged one, so sealing never runs out
  of memory.
* ``release(pages)`` frees every block of the pages (the allocator calls it for every page SGLang frees).

Both states live in one physical budget (the arena), so admission checks need only one number.

``store.kernels`` (decided once, from ``DIFFKV_KERNELS`` and the device: :mod:`diffkv_sglang.backend_select`) selects
the Triton kernels for sealing, compaction moves and decode attention, else the torch reference.
"""

from __future__ import annotations

import dataclasses

import torch

from .backend_select import use_kernels
from .config import DiffKVConfig
from .format import (DESCRIPTOR_COUNT_DTYPE, PAGE_STATE_DTYPE, BlockView, LayerFormats, PageState,
                     descriptor_bytes_per_block)
from .memory import ArenaOutOfMemory, BlockArena
from .policy import classify_with_config, relative_importance
from .quant import read_sealed_blocks, tier_counts, write_sealed_blocks


@dataclasses.dataclass(frozen=True)
class StoreStats:
    """A snapshot of the store for metrics and logs.

    Byte counts are physical. Token counts (``tokens_per_tier``, ``pruned_tokens``) count (token, layer, KV head)
    entries, since each head of each layer decides for itself. ``dense_equivalent_bytes`` is what the same tokens cost in bf16 K/V.
    ``compression_ratio`` divides it by every byte the held tokens use: their blocks (with metadata and
    padding) and their descriptor-table rows.
    """

    capacity_bytes: int
    used_bytes: int
    free_bytes: int
    staged_bytes: int
    sealed_bytes: int
    descriptor_bytes: int
    staged_pages: int
    sealed_pages: int
    tokens_per_tier: tuple[int, ...]
    pruned_tokens: int
    dense_equivalent_bytes: int
    compression_ratio: float
    sealed_compression_ratio: float
    compactions: int
    compacted_bytes: int
    compaction_seconds: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class CompressedKVStore:
    """DiffKV storage for all layers of one rank.

    Args:
        config: DiffKV settings (tiers, thresholds, page size...).
        num_layers, num_kv_heads, head_dim: the model's attention shape on this rank.
        num_pages: logical pages (SGLang's pool size / page size, padding page included).
        arena_bytes: physical budget for all blocks.
        dtype: model dtype of staged K/V.
        device: where the arena and tables live.
        seal_chunk_pages: pages sealed per internal chunk (spare descriptor slots for a chunk's sealed blocks).

    Attributes:
        kernels: True when this store runs the Triton kernels (seal, compaction moves, decode attention); see
            :mod:`diffkv_sglang.backend_select`.
        view: the blocks as kernels take them (:class:`~diffkv_sglang.format.BlockView`: the arena bytes,
            descriptor tables and formats, shared with the store).

    Example (two pages of 16 tokens, sealed one, read back, released)::

        >>> import torch
        >>> from diffkv_sglang.config import DiffKVConfig
        >>> store = CompressedKVStore(DiffKVConfig(page_size=16), num_layers=2, num_kv_heads=2, head_dim=64,
        ...                           num_pages=64, arena_bytes=1 << 22)
        >>> pages = torch.tensor([1, 2])
        >>> store.stage(pages)
        >>> locs = torch.arange(16, 48)                     # token slots of pages 1 and 2
        >>> for layer in range(2):
        ...     store.write_tokens(layer, locs, torch.randn(32, 2, 64), torch.randn(32, 2, 64))
        >>> store.seal(torch.tensor([1]), context_lens=torch.tensor([96]))
        >>> keys, values, present = store.read_pages(0, pages)     # [n, H, P, D] float32, present [n, H, P]
        >>> keys.shape, store.stats().sealed_pages
        (torch.Size([2, 2, 16, 64]), 1)
        >>> store.release(pages)
        >>> store.stats().used_bytes
        0
    """

    def __init__(self, config: DiffKVConfig, num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int,
                 arena_bytes: int, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                 seal_chunk_pages: int = 64):
        if num_pages < 1 or num_layers < 1 or num_kv_heads < 1:
            raise ValueError(f"num_pages={num_pages}, num_layers={num_layers}, num_kv_heads={num_kv_heads} must be >= 1")
        self.config = config
        self.formats = LayerFormats(config, num_layers, head_dim, dtype)
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_pages, self.page_size, self.dtype = num_pages, config.page_size, dtype
        self.device = torch.device(device)
        self.seal_chunk_pages = seal_chunk_pages
        self.kernels = use_kernels(self.device, head_dim)
        # slots [0, num_pages * L * H) hold the pages' blocks; the spare slots after them hold a chunk's sealed
        # blocks while its staged blocks are still live (seal reads them in place), until rebound to the pages
        self._num_page_slots = num_pages * num_layers * num_kv_heads
        spare_slots = seal_chunk_pages * num_layers * num_kv_heads
        self.arena = BlockArena(arena_bytes, self._num_page_slots + spare_slots, self.device, kernels=self.kernels)
        self.page_state = torch.zeros(num_pages, dtype=PAGE_STATE_DTYPE, device=self.device)
        self.tier_counts = torch.zeros(num_pages, num_layers, num_kv_heads, config.num_tiers,
                                       dtype=DESCRIPTOR_COUNT_DTYPE, device=self.device)
        self.view = self._make_view()
        self._heads = torch.arange(num_kv_heads, device=self.device)
        self._layers = torch.arange(num_layers, device=self.device)
        self._format_groups = self._group_layers_by_format()
        # running totals of sealed pages, so stats() needs no scan of the tables: [bytes, tier 0 .. T-1 entries]
        self._sealed_totals = torch.zeros(1 + config.num_tiers, dtype=torch.int64, device=self.device)
        self.compactions = 0
        self.compacted_bytes = 0
        self.compaction_seconds = 0.0

    def to(self, device: torch.device | str) -> "CompressedKVStore":
        """A copy of this store on ``device`` (arena bytes and allocation state, descriptor tables, counters);
        whether it runs the kernels follows ``DIFFKV_KERNELS`` for ``device``."""
        copy = CompressedKVStore(self.config, self.num_layers, self.num_kv_heads, self.head_dim, self.num_pages,
                                 arena_bytes=16, dtype=self.dtype, device=device, seal_chunk_pages=self.seal_chunk_pages)
        copy.arena = self.arena.to(copy.device, kernels=copy.kernels)
        copy.view = copy._make_view()
        for name in ("page_state", "tier_counts", "_sealed_totals"):
            getattr(copy, name).copy_(getattr(self, name))
        copy.compactions, copy.compacted_bytes = self.compactions, self.compacted_bytes
        copy.compaction_seconds = self.compaction_seconds
        return copy

    def _make_view(self) -> BlockView:
        """The kernels' view of the blocks; also refreshes the overlapping-row views :meth:`write_tokens` puts
        key and value rows through (row ``i`` starts at model-dtype element ``i``, or ``values_start`` later)."""
        rows = self._rows(self.dtype, self.head_dim)
        self._token_rows_views = rows, rows[self.formats.staged.values_elements:]
        return BlockView(self.arena.data, self.arena.block_offset, self.page_state, self.tier_counts, self.formats,
                         self.num_kv_heads)

    # ------------------------------------------------------------------------------------- addressing
    def slots(self, pages: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Arena slot ids: ``[n, L, H]`` for all layers, or ``[n, H]`` for one ``layer``."""
        pages = pages.to(self.device, torch.int64)
        if layer is None:
            return (pages[:, None, None] * self.num_layers + self._layers[None, :, None]) * self.num_kv_heads + self._heads
        return (pages[:, None] * self.num_layers + layer) * self.num_kv_heads + self._heads

    def block_nbytes(self, pages: torch.Tensor) -> torch.Tensor:
        """``[n, L, H]`` int64 arena bytes of each block of ``pages`` ``[n]`` (0 where a page holds none)."""
        return self.arena.block_nbytes[self.slots(pages)]

    def _staged_elements(self, layer: int, pages: torch.Tensor) -> torch.Tensor:
        """``[n, H]`` element index (in model-dtype units) of the staged blocks of ``pages`` in ``layer``."""
        return self.formats.staged.key_elements(self.arena.block_offset[self.slots(pages, layer)])

    def _rows(self, dtype: torch.dtype, width: int) -> torch.Tensor:
        """The arena as overlapping rows of ``width`` ``dtype`` elements, row ``i`` starting at element ``i``:
        ``[capacity / itemsize - width + 1, width]``. Indexing rows by element offsets reads or writes whole rows
        with one int64 index per row (not per element)."""
        flat = self.arena.data.view(dtype)
        return flat.as_strided((max(flat.numel() - width + 1, 0), width), (1, 1))

    def _check_state(self, pages: torch.Tensor, allowed: tuple[PageState, ...], action: str) -> None:
        state = self.page_state[pages]
        ok = torch.zeros_like(state, dtype=torch.bool)
        for s in allowed:
            ok |= state == s
        if not bool(ok.all()):
            bad = pages[~ok][:8].tolist()
            raise ValueError(f"{action}: pages {bad} are not {'/'.join(s.name for s in allowed)}")

    # ---------------------------------------------------------------------------------------- staging
    def stage(self, pages: torch.Tensor) -> None:
        """Give EMPTY ``pages`` ``[n]`` dense blocks in every layer and head, importance zeroed.

        Raises :class:`~diffkv_sglang.memory.ArenaOutOfMemory` (nothing changed) if the arena cannot hold them.
        """
        pages = pages.to(self.device, torch.int64)
        if pages.numel() == 0:
            return
        self._check_state(pages, (PageState.EMPTY,), "stage")
        slots = self.slots(pages).reshape(-1)
        staged = self.formats.staged
        offsets = self.arena.allocate(slots, torch.full_like(slots, staged.nbytes))
        statistics = self._rows(torch.float32, 2 * self.page_size)          # score_sum and seen are contiguous
        statistics[staged.score_index(offsets)] = 0.0
        self.page_state[pages] = PageState.STAGED

    def token_rows(self, locs: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Where new tokens go: int64 element offsets (in model-dtype units) of the key rows of the token slots
        ``locs`` ``[m]`` (their pages STAGED): ``[L, m, H]`` for every layer, or ``[m, H]`` for ``layer``. A
        token's value row starts ``formats.staged.values_start / element_bytes`` elements after its key row.

        One gather, no host sync: plan it once per batch (after sealing and compaction, which move blocks) and
        pass it to :meth:`write_tokens` of every layer."""
        locs = locs.to(self.device, torch.int64)
        pages, in_page = locs // self.page_size, locs % self.page_size
        if layer is None:
            offsets = self.arena.block_offset[:self._num_page_slots].view(self.num_pages, self.num_layers,
                                                                          self.num_kv_heads)[pages]     # [m, L, H]
            rows = self.formats.staged.key_elements(offsets) + (in_page * self.head_dim)[:, None, None]
            return rows.transpose(0, 1).contiguous()
        return self._staged_elements(layer, pages) + (in_page * self.head_dim)[:, None]

    def write_tokens(self, layer: int, locs: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     rows: torch.Tensor | None = None) -> None:
        """Store new tokens of ``layer`` into their staged pages: two row-wise index puts, like SGLang's own
        ``set_kv_buffer``, through overlapping-row views of the arena (one int64 index per row).

        Args:
            locs: ``[m]`` int logical token slots (their pages must be STAGED).
            keys, values: ``[m, H, D]`` (any shape that flattens to it; cast to the store dtype).
            rows: ``[L, m, H]`` from :meth:`token_rows` of the same ``locs`` (a batch's plan, shared by its layers);
                computed for this layer when not given.
        """
        if locs.numel() == 0:
            return
        rows = (self.token_rows(locs, layer) if rows is None else rows[layer]).reshape(-1)             # [m * H]
        key_rows, value_rows = self._token_rows_views
        key_rows.index_put_((rows,), keys.reshape(-1, self.head_dim).to(self.dtype))
        value_rows.index_put_((rows,), values.reshape(-1, self.head_dim).to(self.dtype))

    def add_importance(self, layer: int, locs: torch.Tensor, score: torch.Tensor, seen: torch.Tensor,
                       accumulate: bool = True) -> None:
        """Accumulate (or, with ``accumulate=False``, overwrite) attention statistics of staged tokens.

        Args:
            locs: ``[m]`` int distinct logical token slots in STAGED pages.
            score: ``[m, H]`` float attention mass per KV head.
            seen: ``[m]`` float number of observing queries.
        """
        if locs.numel() == 0:
            return
        locs = locs.to(self.device, torch.int64)
        pages, in_page = locs // self.page_size, locs % self.page_size
        staged = self.formats.staged
        offsets = self.arena.block_offset[self.slots(pages, layer)]                          # [m, H]
        score_at = staged.score_index(offsets, in_page[:, None])
        seen_at = staged.seen_index(offsets, in_page[:, None])
        as_f32 = self.arena.data.view(torch.float32)
        as_f32.index_put_((score_at.reshape(-1),), score.float().reshape(-1), accumulate=accumulate)
        as_f32.index_put_((seen_at.reshape(-1),), seen.float()[:, None].expand_as(seen_at).reshape(-1),
                          accumulate=accumulate)

    def _read_staged_kv(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the dense K/V of the staged blocks at byte ``offsets`` ``[...]``: ``[..., P, D]`` (store dtype)."""
        staged = self.formats.staged
        elements = staged.key_elements(offsets)
        blocks = self._rows(self.dtype, self.page_size * self.head_dim)
        shape = (*offsets.shape, self.page_size, self.head_dim)
        return blocks[elements].reshape(shape), blocks[elements + staged.values_elements].reshape(shape)

    def _read_statistics(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``score_sum``, ``seen`` ``[..., P]`` float32 of the staged blocks at byte ``offsets`` ``[...]``."""
        staged = self.formats.staged
        statistics = self._rows(torch.float32, 2 * self.page_size)[staged.score_index(offsets)]
        return statistics[..., :self.page_size], statistics[..., self.page_size:]

    # ---------------------------------------------------------------------------------------- sealing
    def seal(self, pages: torch.Tensor, context_lens: torch.Tensor) -> None:
        """Compress full STAGED ``pages`` ``[n]`` in every layer and head.

        Args:
            pages: ``[n]`` int logical pages, every token written and outside the protected window.
            context_lens: ``[n]`` int context length ``N`` of the owning request, for the thresholds.
        """
        pages = pages.to(self.device, torch.int64)
        if pages.numel() == 0:
            return
        self._check_state(pages, (PageState.STAGED,), "seal")
        context_lens = context_lens.to(self.device, torch.int64)
        for start in range(0, pages.numel(), self.seal_chunk_pages):
            self._seal_chunk(pages[start:start + self.seal_chunk_pages], context_lens[start:start + self.seal_chunk_pages])

    def _seal_chunk(self, pages: torch.Tensor, context_lens: torch.Tensor) -> None:
        """Seal at most ``seal_chunk_pages`` pages: in place when the arena has room for their sealed blocks next
        to the staged ones, else in halves, and a single page that still does not fit through a copy."""
        slots = self.slots(pages)                                                              # [n, L, H]
        score_sum, seen = self._read_statistics(self.arena.block_offset[slots])               # [n, L, H, P]
        r = relative_importance(score_sum, seen, context_lens[:, None, None, None])
        tiers = classify_with_config(r, self.config)                                           # [n, L, H, P]
        nbytes = torch.empty(slots.shape, dtype=torch.int64, device=self.device)
        for fmt, layers in self._format_groups:
            nbytes[:, layers] = fmt.block_nbytes(tier_counts(tiers[:, layers], fmt.num_tiers))
        spare = torch.arange(slots.numel(), device=self.device) + self._num_page_slots
        try:
            sealed = self.arena.allocate(spare, nbytes.reshape(-1)).reshape(slots.shape)
        except ArenaOutOfMemory:
            if pages.numel() > 1:                      # less headroom needed for fewer pages
                half = pages.numel() // 2
                self._seal_chunk(pages[:half], context_lens[:half])
                self._seal_chunk(pages[half:], context_lens[half:])
            else:
                self._seal_page_through_copy(pages, slots, tiers, nbytes)
            return
        # the staged blocks are live, so the sealed ones cannot overlap them; read their offsets after the
        # allocation (which may have compacted the arena)
        staged = self.arena.block_offset[slots]
        source = staged if self.kernels else self._read_staged_kv(staged)
        self._write_groups(pages, sealed, source, tiers)
        self.arena.free(slots.reshape(-1))
        self.arena.rebind(spare, slots.reshape(-1))
        self._finish_seal(pages, slots)

    def _seal_page_through_copy(self, pages, slots, tiers, nbytes) -> None:
        """Seal one page when the arena cannot hold its sealed blocks beside the staged ones: copy the staged K/V
        out (one page: ``L * H * P * D`` elements), free, allocate (a sealed block is never larger than a staged
        one, so this fits), write."""
        keys, values = self._read_staged_kv(self.arena.block_offset[slots])
        self.arena.free(slots.reshape(-1))
        sealed = self.arena.allocate(slots.reshape(-1), nbytes.reshape(-1)).reshape(slots.shape)
        self._write_groups(pages, sealed, (keys, values), tiers)
        self._finish_seal(pages, slots)

    def _write_groups(self, pages, sealed, source, tiers) -> None:
        """Write every format group's sealed blocks at ``sealed`` ``[n, L, H]`` offsets from ``source``: staged
        block offsets ``[n, L, H]`` (the seal kernel reads them in place) or ``(keys, values)`` ``[n, L, H, P, D]``;
        record the tier counts."""
        for fmt, layers in self._format_groups:
            flat = lambda x: x[:, layers].reshape(-1, *x.shape[3:])                            # noqa: E731
            group_source = flat(source) if isinstance(source, torch.Tensor) else tuple(map(flat, source))
            counts = self._write_sealed(fmt, flat(sealed), group_source, flat(tiers))
            self.tier_counts[pages[:, None], layers] = counts.reshape(len(pages), len(layers), self.num_kv_heads, -1).to(torch.int32)
            self._sealed_totals[1:] += counts.sum(0)

    def _finish_seal(self, pages, slots) -> None:
        self._sealed_totals[0] += self.arena.block_nbytes[slots.reshape(-1)].sum()
        self.page_state[pages] = PageState.SEALED

    def _write_sealed(self, fmt, offsets, source, tiers) -> torch.Tensor:
        """Write sealed blocks of one format at ``offsets`` ``[n]`` from ``source`` (``[n]`` staged block offsets,
        kernels only, or ``(keys, values)`` ``[n, P, D]``) and ``tiers`` ``[n, P]``; returns the ``[n, T]`` tier
        counts. One seal-kernel launch with kernels."""
        if self.kernels:
            from .kernels.seal import seal_blocks

            return seal_blocks(fmt, self.arena.data, source, tiers, offsets, staged_dtype=self.dtype)
        return write_sealed_blocks(fmt, self.arena.data, offsets, *source, tiers)

    @property
    def format_groups(self) -> list[tuple]:
        """``[(BlockFormat, layers)]``, ``layers`` an int64 tensor: the layers sharing each sealed-block format."""
        return self._format_groups

    def _group_layers_by_format(self):
        """``[(format, layer index tensor)]``: layers sharing one sealed-block format, sealed together."""
        by_format: dict[int, list[int]] = {}
        for layer, fmt in enumerate(self.formats.sealed):
            by_format.setdefault(id(fmt), []).append(layer)
        return [(self.formats[layers[0]], torch.tensor(layers, device=self.device)) for layers in by_format.values()]

    # --------------------------------------------------------------------------------------- release
    def release(self, pages: torch.Tensor) -> None:
        """Free every block of ``pages`` ``[n]`` (any state; EMPTY pages are ignored)."""
        pages = pages.to(self.device, torch.int64)
        if pages.numel() == 0:
            return
        slots = self.slots(pages)
        sealed = self.page_state[pages] == PageState.SEALED                                    # [n]
        # masked sums, not an integer matrix product: CUDA has no int64 addmv/mm (torch raises NotImplementedError)
        self._sealed_totals[0] -= (self.block_nbytes(pages) * sealed[:, None, None]).sum()
        per_page = self.tier_counts[pages].sum(dim=(1, 2), dtype=torch.int64)                 # [n, T]
        self._sealed_totals[1:] -= (per_page * sealed[:, None]).sum(0)
        self.arena.free(slots.reshape(-1))
        self.page_state[pages] = PageState.EMPTY
        self.tier_counts[pages] = 0

    def clear(self) -> None:
        """Drop everything (SGLang's flush_cache)."""
        self.arena.clear()
        self._sealed_totals.zero_()
        self.page_state.zero_()
        self.tier_counts.zero_()

    # ------------------------------------------------------------------------------------------ reads
    def read_pages(self, layer: int, pages: torch.Tensor):
        """Reference read of one layer: dense float32 K/V of ``pages`` ``[n]`` in any state.

        Returns:
            keys, values: ``[n, H, P, D]`` float32 (sealed pages dequantized, in the model's space);
            present: ``[n, H, P]`` bool, False for pruned tokens and EMPTY pages.
        """
        pages = pages.to(self.device, torch.int64)
        n, heads, page, dim = pages.numel(), self.num_kv_heads, self.page_size, self.head_dim
        keys = torch.zeros(n, heads, page, dim, device=self.device)
        values = torch.zeros_like(keys)
        present = torch.zeros(n, heads, page, dtype=torch.bool, device=self.device)
        state = self.page_state[pages]
        staged = (state == PageState.STAGED).nonzero(as_tuple=True)[0]
        if staged.numel():
            k, v = self._read_staged_kv(self.arena.block_offset[self.slots(pages[staged], layer)])
            keys[staged], values[staged], present[staged] = k.float(), v.float(), True
        sealed = (state == PageState.SEALED).nonzero(as_tuple=True)[0]
        if sealed.numel():
            slots = self.slots(pages[sealed], layer).reshape(-1)
            counts = self.tier_counts[pages[sealed], layer].reshape(-1, self.config.num_tiers)
            k, v, tier = read_sealed_blocks(self.formats[layer], self.arena.data, self.arena.block_offset[slots], counts)
            shape = (sealed.numel(), heads, page)
            keys[sealed], values[sealed] = k.reshape(*shape, dim), v.reshape(*shape, dim)
            present[sealed] = (tier >= 0).reshape(shape)
        return keys, values, present

    def staged_importance(self, layer: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``score_sum``, ``seen`` ``[n, H, P]`` float32 of STAGED ``pages`` in ``layer`` (for tests and debugging)."""
        return self._read_statistics(self.arena.block_offset[self.slots(pages.to(self.device, torch.int64), layer)])

    # ---------------------------------------------------------------------------------------- metrics
    @property
    def descriptor_bytes_per_block(self) -> int:
        """Table bytes per (page, layer, head): arena offset and size plus tier counts."""
        return descriptor_bytes_per_block(self.config.num_tiers)

    def maybe_compact(self):
        """Run one bounded compaction step if holes exceed ``config.compaction_trigger`` of the arena.

        Moves at most 1/16 of the capacity per call (at least 1 MiB), so a step never stalls for long;
        repeated calls converge to a packed arena. Returns the step's CompactionStats, or None.
        """
        arena = self.arena
        if arena.fragmented_bytes <= self.config.compaction_trigger * arena.capacity_bytes or arena.fragmented_bytes == 0:
            return None
        result = arena.compact(max_move_bytes=max(arena.capacity_bytes // 16, 1 << 20))
        self.compactions += 1
        self.compacted_bytes += result.moved_bytes
        self.compaction_seconds += result.seconds
        return result

    def stats(self) -> StoreStats:
        """Physical bytes, tokens per tier and the effective compression ratio (one host sync, no table scan)."""
        state = self.page_state
        counters = torch.stack([(state == PageState.STAGED).sum(), (state == PageState.SEALED).sum()])
        n_staged, n_sealed, sealed_bytes, *per_tier = torch.cat([counters, self._sealed_totals]).tolist()
        staged_bytes = n_staged * self.num_layers * self.num_kv_heads * self.formats.staged.nbytes
        blocks_per_page = self.num_layers * self.num_kv_heads
        dense_token_bytes = blocks_per_page * self.head_dim * 2 * 2                           # bf16 K and V
        desc = self.descriptor_bytes_per_block * blocks_per_page
        held_pages = n_staged + n_sealed
        dense_equivalent = held_pages * self.page_size * dense_token_bytes
        pruned = n_sealed * self.page_size * blocks_per_page - sum(per_tier)
        used_by_held = staged_bytes + sealed_bytes + held_pages * desc
        sealed_used = sealed_bytes + n_sealed * desc
        return StoreStats(
            capacity_bytes=self.arena.capacity_bytes, used_bytes=self.arena.used_bytes,
            free_bytes=self.arena.free_bytes, staged_bytes=staged_bytes, sealed_bytes=sealed_bytes,
            descriptor_bytes=held_pages * desc, staged_pages=n_staged, sealed_pages=n_sealed,
            tokens_per_tier=tuple(int(x) for x in per_tier), pruned_tokens=int(pruned),
            dense_equivalent_bytes=dense_equivalent,
            compression_ratio=dense_equivalent / used_by_held if used_by_held else 0.0,
            sealed_compression_ratio=(n_sealed * self.page_size * dense_token_bytes / sealed_used) if sealed_used else 0.0,
            compactions=self.compactions, compacted_bytes=self.compacted_bytes,
            compaction_seconds=self.compaction_seconds,
        )
