"""Stores for the kernel tests: built through the store's own API with steered tiers (``store.to(device)``
gives the kernels' copy)."""

import math
import os

import pytest
import torch

from diffkv_sglang.config import DiffKVConfig
from diffkv_sglang.store import CompressedKVStore

CONTEXT = 1000                  # context length given to seal(): relative importance r = score / seen * CONTEXT
PRUNING = {"alpha_low": 0.02}   # DiffKV's pruning threshold (the default is 0): kernel tests cover pruned tokens

# Kernels on CPU stores run in Triton's interpreter, which a CUDA machine does not enable (conftest.py): there the
# test_kernel_* tests run the kernels natively instead.
needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU stores need Triton's interpreter; on CUDA the test_kernel_* tests run the kernels natively")


def tier_values(config: DiffKVConfig) -> list[float]:
    """A relative importance that lands a token in each tier, then one that prunes it."""
    th, prune = list(config.thresholds), config.alpha_prune
    bounds = [max(2 * th[0], 1.0) if th else 1.0] + [(a + b) / 2 for a, b in zip(th, th[1:])]
    last = (prune + th[-1]) / 2 if th else max(prune, 1e-3) * 2
    return (bounds + [last])[:config.num_tiers] + [prune / 2]


def build(config: DiffKVConfig, heads: int, dim: int, seq_lens: list[int], layers: int = 2, staged_pages: int = 1,
          dtype: torch.dtype = torch.float32):
    """A CPU store (model dtype ``dtype``) holding one request per ``seq_lens`` entry on shuffled pages, every page
    but the last ``staged_pages`` of each request sealed with steered tiers. Returns the store, page table
    ``[B, max_pages]`` and seq lens."""
    page = config.page_size
    counts = [math.ceil(n / page) for n in seq_lens]
    store = CompressedKVStore(config, layers, heads, dim, num_pages=sum(counts) + 4,
                              arena_bytes=sum(counts) * layers * heads * (4 * page * dim * 4 + 256) + (1 << 16),
                              dtype=dtype)
    store.arena.data.random_(0, 256)                        # unwritten slots hold garbage, NaN bit patterns too
    pages = (torch.randperm(sum(counts)) + 2).tolist()      # page 0 is the padding page
    table = torch.zeros(len(seq_lens), max(counts), dtype=torch.int64)
    values = torch.tensor(tier_values(config))
    to_seal = []
    for b, (n, c) in enumerate(zip(seq_lens, counts)):
        own = torch.tensor(pages[:c])
        pages = pages[c:]
        table[b, :c] = own
        store.stage(own)
        locs = (own[:, None] * page + torch.arange(page)).reshape(-1)[:n]
        for layer in range(layers):
            store.write_tokens(layer, locs, torch.randn(n, heads, dim) * 2, torch.randn(n, heads, dim))
            # per page: mixed tiers, a single tier (the others empty), everything pruned, or the first tier mixed
            # with pruned tokens (every later tier empty, its section start inside the page's rows)
            mode = torch.randint(0, 4, (c, 1, 1))
            first_or_pruned = torch.randint(0, 2, (c, page, heads)) * (len(values) - 1)
            pick = torch.where(mode == 0, torch.randint(0, len(values), (c, page, heads)),
                               torch.where(mode == 1, torch.randint(0, len(values) - 1, (c, 1, 1)),
                                           torch.where(mode == 2, len(values) - 1, first_or_pruned)))
            r = values[pick.expand(c, page, heads)].reshape(-1, heads)[:n]
            store.add_importance(layer, locs, r / CONTEXT, torch.ones(n))
        to_seal += own[:max(0, c - staged_pages)].tolist()
    if to_seal:
        store.seal(torch.tensor(to_seal), torch.full((len(to_seal),), CONTEXT))
    return store, table, torch.tensor(seq_lens)


def csr(table: torch.Tensor, seq_lens: torch.Tensor, page: int):
    pages = (seq_lens + page - 1) // page
    keep = torch.arange(table.shape[1], device=table.device)[None, :] < pages[:, None]
    return torch.cat([pages.new_zeros(1), pages.cumsum(0)]), table[keep]
