"""The KV pool SGLang builds when ``--kv-pool diffkv`` is set, and how it is sized.

SGLang keeps working on logical token slots (allocator, ``req_to_token``, radix tree). This pool maps them
onto a :class:`~diffkv_sglang.store.CompressedKVStore`: ``set_kv_buffer`` writes new tokens into their staged
pages; reads go through the DiffKV attention backend only (the pool has no dense per-layer buffer to hand out).

Sizing. A logical token is planned at the cost of the cheapest tier (codes, metadata, descriptor rows):
``max_total_num_tokens`` (what SGLang reports as the pool's capacity) is the budget divided by that cost, so it
reflects compression. The arena holds those bytes, and at least enough dense staging for one prompt of the
model's context length, since a prompt stays dense until its prefill ends. What a token really costs depends on
the data (tiers, pruning, the dense window), so admission checks the arena's bytes (see ``allocator.py``).
"""

from __future__ import annotations

import logging
import math

import torch

from ..config import DiffKVConfig
from ..format import BLOCK_ALIGN, META_SCALE_BYTES, LayerFormats, descriptor_bytes_per_page
from ..store import CompressedKVStore
from . import upstream
from .metrics import StoreReporter
from .upstream import KVCache, MemoryPoolConfig, MemoryPoolConfigurator, unwrap_write_loc

logger = logging.getLogger(__name__)

PADDING_PAGE = 0          # SGLang never hands out page 0; padded batch lanes write their dummy tokens there


class PoolPlan:
    """Byte costs of one rank's DiffKV pool, shared by the configurator (sizing) and the pool (arena).

    Args:
        config: DiffKV settings; num_layers, num_kv_heads, head_dim: this rank's attention shape;
        dtype: model dtype of staged pages.
    """

    def __init__(self, config: DiffKVConfig, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        self.config = config
        self.formats = LayerFormats(config, num_layers, head_dim, dtype)
        self.num_layers, self.num_kv_heads, self.head_dim, self.dtype = num_layers, num_kv_heads, head_dim, dtype
        page = config.page_size
        blocks_per_page = num_layers * num_kv_heads
        self.descriptor_bytes_per_page = descriptor_bytes_per_page(config.num_tiers, blocks_per_page)
        cheapest = sum(min(fmt.bytes_per_token(t) for t in range(fmt.num_tiers)) for fmt in self.formats.sealed)
        per_block_overhead = (META_SCALE_BYTES + BLOCK_ALIGN) * blocks_per_page
        self.planned_bytes_per_token = num_kv_heads * cheapest + per_block_overhead / page
        self.staged_page_bytes = blocks_per_page * self.formats.staged.nbytes
        self.dense_bytes_per_token = blocks_per_page * head_dim * 2 * torch.empty((), dtype=dtype).element_size()

    def tokens_for_budget(self, budget_bytes: int) -> int:
        """Logical capacity (page aligned) of a memory budget, descriptor tables included."""
        per_token = self.planned_bytes_per_token + self.descriptor_bytes_per_page / self.config.page_size
        tokens = int(budget_bytes * self.config.arena_fraction / per_token)
        return tokens // self.config.page_size * self.config.page_size

    def arena_bytes(self, max_total_num_tokens: int, context_len: int) -> int:
        """Arena size for a logical capacity: the planned bytes, and at least one dense prompt of
        ``min(context_len, capacity)`` tokens plus the padding page."""
        planned = int(max_total_num_tokens * self.planned_bytes_per_token)
        staging_pages = math.ceil(min(context_len, max_total_num_tokens) / self.config.page_size) + 2
        return max(planned, staging_pages * self.staged_page_bytes)


class DiffKVPoolConfigurator(MemoryPoolConfigurator):
    """SGLang's sizing step for the DiffKV pool: bytes -> logical tokens at the planned (compressed) cost."""

    def __init__(self, plan: PoolPlan):
        self.plan = plan

    def calculate_pool_sizes(self, available_bytes: int, page_size: int) -> MemoryPoolConfig:
        return MemoryPoolConfig(max_total_num_tokens=self.plan.tokens_for_budget(available_bytes))

    def calculate_pool_sizes_from_max_tokens(self, max_total_num_tokens: int, page_size: int) -> MemoryPoolConfig:
        return MemoryPoolConfig(max_total_num_tokens=max_total_num_tokens // page_size * page_size)


class DiffKVKVPool(KVCache):
    """SGLang ``KVCache`` backed by a compressed store.

    Args:
        size: logical token slots (SGLang's ``max_total_num_tokens``); page 0 is the padding page.
        page_size: tokens per page (equals the config's page size).
        plan: byte costs (config, shape, dtype).
        context_len: the model's context length (sets the minimum staging room).
        device, layer_num, start_layer, end_layer, enable_memory_saver: as for SGLang's pools.
    """

    def __init__(self, size: int, page_size: int, plan: PoolPlan, context_len: int, device: str,
                 layer_num: int, start_layer: int | None = None, end_layer: int | None = None,
                 enable_memory_saver: bool = False):
        super().__init__(size, page_size, plan.dtype, layer_num, device, enable_memory_saver, start_layer, end_layer)
        if page_size != plan.config.page_size:
            raise ValueError(f"SGLang page size {page_size} != DiffKV page size {plan.config.page_size}")
        self.plan = plan
        self.head_num, self.head_dim, self.v_head_dim = plan.num_kv_heads, plan.head_dim, plan.head_dim
        self.num_pages = size // page_size + 1
        self.store = CompressedKVStore(plan.config, layer_num, plan.num_kv_heads, plan.head_dim, self.num_pages,
                                       plan.arena_bytes(size, context_len), plan.dtype, device)
        self._stage_padding_page()
        self.reporter = StoreReporter(self.store, tp_rank=int(upstream.get_parallel().tp_rank))
        self._finalize_allocation_log(size)          # SGLang's pools end with it: the size log line and mem_usage

    def _stage_padding_page(self) -> None:
        self.store.stage(torch.tensor([PADDING_PAGE], device=self.store.device))

    def clear(self) -> None:
        """Drop every block (SGLang's flush_cache), keeping the padding page."""
        self.store.clear()
        self._stage_padding_page()
        self.reporter.refresh()

    # ------------------------------------------------------------------------------- KVCache API
    def set_kv_buffer(self, layer, loc, cache_k: torch.Tensor, cache_v: torch.Tensor, k_scale=None, v_scale=None,
                      layer_id_override: int | None = None, dcp_kv_mask=None) -> None:
        """Write new tokens ``[n, H, D]`` (any leading shape that flattens to it) into their staged pages."""
        loc, _, _ = unwrap_write_loc(loc)
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        shape = (-1, self.head_num, self.head_dim)
        self.store.write_tokens(layer_id - self.start_layer, loc, cache_k.reshape(shape), cache_v.reshape(shape))

    def _no_dense_buffer(self, *_):
        raise NotImplementedError(
            "the DiffKV pool stores compressed blocks and has no dense per-layer buffer; "
            "only the 'diffkv' attention backend can read it")

    get_key_buffer = _no_dense_buffer
    get_value_buffer = _no_dense_buffer
    get_kv_buffer = _no_dense_buffer

    def get_kv_size_bytes(self) -> int:
        """Bytes held on the device: the arena and the descriptor tables."""
        store = self.store
        tables = (store.arena.block_offset, store.arena.block_nbytes, store.tier_counts, store.page_state)
        return store.arena.capacity_bytes + sum(t.numel() * t.element_size() for t in tables)

