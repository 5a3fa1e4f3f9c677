"""SGLang's paged allocator over logical pages, with storage life cycle and admission by physical bytes.

Logical pages come and go exactly as in SGLang's ``PagedTokenToKVPoolAllocator`` (``available_size`` stays
logical, so SGLang's conservation checks hold). On top of it:

* every page handed out is **staged** in the store (dense blocks in every layer), and every page SGLang
  releases (``_release_page_ids``: frees, tree eviction, retraction, request end) releases its blocks. That
  private method is the one funnel of SGLang's releases; why no public method serves: the allocator's row in
  :mod:`.upstream`, which checks that the base class still has every method overridden here;
* the scheduler's capacity hooks also consult the arena: a prefill is admitted only if its prompt fits dense
  (plus the decode growth SGLang reserves, at the measured cost of a held token); a decode step only if every
  request could start a new dense page; otherwise the radix tree is evicted, and failing that SGLang retracts a
  request. Running out of arena bytes therefore never crashes a step.
"""

from __future__ import annotations

import logging

import torch

from ..memory import ArenaOutOfMemory
from .pool import DiffKVKVPool
from .upstream import EvictParams, PagedTokenToKVPoolAllocator, PrefillBudget

logger = logging.getLogger(__name__)


class DiffKVPagedAllocator(PagedTokenToKVPoolAllocator):
    """Paged allocator whose pages own DiffKV storage. Same constructor as SGLang's paged allocator."""

    def __init__(self, size: int, page_size: int, dtype: torch.dtype, device: str, kvcache: DiffKVKVPool,
                 need_sort: bool):
        if not isinstance(kvcache, DiffKVKVPool):
            raise TypeError(f"DiffKVPagedAllocator needs a DiffKVKVPool, got {type(kvcache).__name__}")
        self.store = kvcache.store
        self.plan = kvcache.plan
        self._tree_cache = None
        self._changed_since_check = True          # SGLang polls verify_byte_accounting while idle
        super().__init__(size, page_size, dtype, device, kvcache, need_sort)

    # ----------------------------------------------------------------------------- physical model
    def physical_free_bytes(self) -> int:
        return self.store.arena.free_bytes

    def held_bytes_per_token(self) -> float:
        """Average arena bytes per held logical token (falls back to the planned cost while empty)."""
        held = self.size - self.available_size()
        used = self.store.arena.used_bytes - self.plan.staged_page_bytes          # minus the padding page
        if held <= 0 or used <= 0:
            return self.plan.planned_bytes_per_token
        return max(used / held, self.plan.planned_bytes_per_token)

    def evictable_bytes(self, tree_cache) -> float:
        """Estimated arena bytes the radix tree could give back."""
        if tree_cache is None or not tree_cache.supports_prefix_sharing():
            return 0.0
        return tree_cache.evictable_size() * self.held_bytes_per_token()

    def _pages_for_tokens(self, num_tokens: int, num_requests: int = 1) -> int:
        return -(-num_tokens // self.page_size) + num_requests

    def _evict_for_bytes(self, tree_cache, need_bytes: int) -> bool:
        """Evict least-recently-used tree pages until ``need_bytes`` arena bytes are free; True if they are."""
        if tree_cache is not None:
            self._tree_cache = tree_cache
        tree_cache = self._tree_cache
        while self.physical_free_bytes() < need_bytes:
            if tree_cache is None or not tree_cache.supports_prefix_sharing() or tree_cache.evictable_size() <= 0:
                break
            shortfall = need_bytes - self.physical_free_bytes()
            tokens = max(self.page_size, int(shortfall / self.held_bytes_per_token()) + self.page_size)
            before = tree_cache.evictable_size()
            tree_cache.evict_for_alloc(EvictParams(num_tokens=tokens))
            if tree_cache.evictable_size() >= before:
                break
        if self.physical_free_bytes() < need_bytes:
            return False
        return True

    # ------------------------------------------------------------------------ scheduler hooks
    def create_prefill_budget(self, tree_cache, *, num_mixed_decode_tokens=0):
        self._tree_cache = tree_cache
        return DiffKVPrefillBudget(self, tree_cache, num_mixed_decode_tokens=num_mixed_decode_tokens)

    def evict_to_free_tokens(self, tree_cache, num_tokens: int):
        super().evict_to_free_tokens(tree_cache, num_tokens)
        need = self._pages_for_tokens(num_tokens) * self.plan.staged_page_bytes
        return self.available_size() >= num_tokens and self._evict_for_bytes(tree_cache, need)

    def check_decode_capacity(self, *, num_tokens: int, tree_cache, requests=None, spec_algorithm=None) -> bool:
        logical_ok = super().check_decode_capacity(num_tokens=num_tokens, tree_cache=tree_cache,
                                                   requests=requests, spec_algorithm=spec_algorithm)
        # SGLang asks for page_size tokens per request that opens a page; each such page is staged dense
        need = -(-num_tokens // self.page_size) * self.plan.staged_page_bytes
        return logical_ok and self._evict_for_bytes(tree_cache, need)

    def max_new_tokens_for_memory(self, input_tokens: int, max_new_tokens: int, *, token_capacity: int,
                                  sliding_window_size, chunk_size):
        logical = super().max_new_tokens_for_memory(input_tokens, max_new_tokens, token_capacity=token_capacity,
                                                    sliding_window_size=sliding_window_size, chunk_size=chunk_size)
        dense_capacity = (self.store.arena.capacity_bytes // self.plan.staged_page_bytes - 2) * self.page_size
        if -(-input_tokens // self.page_size) * self.page_size > dense_capacity:
            return None                                              # the prompt can never be staged
        return logical

    # ------------------------------------------------------------------------- allocation
    def _stage_new_pages(self, out_indices: torch.Tensor | None) -> torch.Tensor | None:
        """Stage the pages that ``out_indices`` opened; undo the allocation if the arena cannot hold them."""
        if out_indices is None:
            return None
        self._changed_since_check = True
        new_pages = out_indices[out_indices % self.page_size == 0] // self.page_size
        if new_pages.numel() == 0:
            return out_indices
        need = new_pages.numel() * self.plan.staged_page_bytes
        if self.physical_free_bytes() < need:
            self._evict_for_bytes(None, need)
        try:
            self.store.stage(new_pages)
        except ArenaOutOfMemory as error:
            logger.error("DiffKV arena cannot stage %d new pages (%s); refusing the allocation", new_pages.numel(), error)
            super()._release_page_ids(new_pages)
            return None
        return out_indices

    def alloc(self, need_size: int):
        return self._stage_new_pages(super().alloc(need_size))

    def alloc_extend(self, *args, **kwargs):
        return self._stage_new_pages(super().alloc_extend(*args, **kwargs))

    def alloc_decode(self, *args, **kwargs):
        return self._stage_new_pages(super().alloc_decode(*args, **kwargs))

    def _release_page_ids(self, *page_ids: torch.Tensor):
        pages = torch.cat(page_ids) if len(page_ids) > 1 else page_ids[0]
        self.store.release(pages)
        super()._release_page_ids(*page_ids)
        self._changed_since_check = True
        self.get_kvcache().reporter.maybe_report()

    def clear(self):
        super().clear()
        self._changed_since_check = True
        self.get_kvcache().clear()

    def verify_byte_accounting(self) -> list:
        """Idle diagnostic: the arena's invariants and 'no storage without a held page'; also refreshes the gauges,
        which releases after the last forward left stale. SGLang polls it in its idle loop, so it does the work
        once per idle period (after pages changed) and returns at once otherwise."""
        if not self._changed_since_check:
            return []
        self._changed_since_check = False
        self.get_kvcache().reporter.refresh()
        problems = []
        try:
            self.store.arena.check_invariants()
        except AssertionError as error:
            problems.append(f"DiffKV arena: {error}")
        free = self.get_all_free_pages()
        if free is not None and free.numel():
            held = self.store.page_state[free.to(self.store.device)] != 0
            if bool(held.any()):
                problems.append(f"DiffKV: {int(held.sum())} free pages still hold blocks")
        return problems


class DiffKVPrefillBudget(PrefillBudget):
    """SGLang's prefill budget with a second, physical limit.

    Token counts stay SGLang's; the remaining capacity is the smaller of the logical one and the arena's, the
    latter counting a prompt at the staged (dense) cost of its pages and the growth SGLang reserves at the average
    cost of a held token. The arena's answer for what must be staged now is exact: before a prompt or a chunk is
    admitted, its pages (and those of everything admitted before it in this round) must fit in the free bytes,
    after evicting radix-tree pages if that makes room. SGLang treats a failed prefill allocation as fatal
    ("Prefill out of memory"), so an estimate that is too high must never admit.
    """

    def __init__(self, allocator: DiffKVPagedAllocator, tree_cache, *, num_mixed_decode_tokens: int = 0):
        super().__init__(allocator, tree_cache, num_mixed_decode_tokens=num_mixed_decode_tokens)
        self.diffkv = allocator
        self.staged_bytes_per_token = allocator.plan.staged_page_bytes / self.page_size
        self.staged_offset_bytes = 0.0          # immediate (staged) bytes of admitted prompts
        self.total_offset_bytes = 0.0          # plus their reserved growth

    def _physical_bytes(self) -> float:
        return self.diffkv.physical_free_bytes() + self.diffkv.evictable_bytes(self.tree_cache)

    def _immediate_bytes(self, tokens: int) -> float:
        """Staged bytes of a prompt (or chunk) of ``tokens`` new tokens: its pages and one more."""
        return (self.ceil_paged_tokens(tokens) + self.page_size) * self.staged_bytes_per_token

    def _fits_now(self, tokens: int) -> bool:
        """Whether ``tokens`` more prompt tokens can be staged on top of this round's admissions, evicting
        least-recently-used tree pages for the bytes if needed (exact: the arena's free bytes, no estimate)."""
        need = self.staged_offset_bytes + self._immediate_bytes(tokens)
        return self.diffkv._evict_for_bytes(self.tree_cache, int(need) + 1)

    @property
    def remaining_total(self):
        per_token = self.diffkv.held_bytes_per_token()
        physical = (self._physical_bytes() - self.total_offset_bytes) / per_token
        return min(super().remaining_total, int(physical))

    @property
    def remaining_current(self):
        physical = (self._physical_bytes() - self.staged_offset_bytes) / self.staged_bytes_per_token
        return min(super().remaining_current, int(physical))

    def check_prefill(self, *, extend_input_len: int, total_tokens: int, **kwargs):
        ok, chunk = super().check_prefill(extend_input_len=extend_input_len, total_tokens=total_tokens, **kwargs)
        if ok and not self._fits_now(extend_input_len if chunk is None else min(extend_input_len, chunk)):
            return False, None
        return ok, chunk

    def can_allocate_prefill(self, *, paged_input: int, **kwargs) -> bool:
        return super().can_allocate_prefill(paged_input=paged_input, **kwargs) and self._fits_now(paged_input)

    def available_chunk_tokens(self, chunk_limit: int) -> int | None:
        """SGLang's chunk for a continuing chunked prefill, cut to what the arena can stage now (None: wait; the
        base class would force a full chunk to make progress, which the arena may not hold)."""
        available = super().available_chunk_tokens(chunk_limit)
        if available is None or self._fits_now(available):
            return available
        free = self.diffkv.physical_free_bytes() - self.staged_offset_bytes
        stageable = int(free / self.staged_bytes_per_token) // self.page_size * self.page_size - self.page_size
        return stageable if stageable > 0 else None

    def reserve(self, extend_input_len: int, max_new_tokens: int, *, extra_tokens: int = 0, **kwargs) -> None:
        super().reserve(extend_input_len, max_new_tokens, extra_tokens=extra_tokens, **kwargs)
        immediate = self._immediate_bytes(extend_input_len) + extra_tokens * self.staged_bytes_per_token
        self.staged_offset_bytes += immediate
        self.total_offset_bytes += immediate + max_new_tokens * self.diffkv.held_bytes_per_token()
