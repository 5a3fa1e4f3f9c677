"""FlashInfer-style attention wrappers over the compressed store: ``plan()`` once per batch, ``run()`` per layer.

Each request's KV is a row of logical pages in a padded ``page_table`` ``[B, max_pages]`` (like FlashAttention's
``block_table``, and what SGLang's ``req_to_token`` gives without a conversion): token ``t`` of request ``b`` lives
in page ``page_table[b, t // P]`` at in-page index ``t % P``, and its position is ``t``; columns past a request's
``ceil(seq_len / P)`` pages are ignored. Pages may be staged (dense) or sealed (compressed, some tokens pruned):
attention runs over every kept token, with a float32 softmax, all query heads of a GQA group sharing their
KV head. As a side effect ``run`` records the importance statistics of staged tokens that sealing needs
(see :mod:`diffkv_sglang.policy`): every decode query adds its attention; an extend's last ``obs_window``
queries per request *replace* the statistics of the staged tokens they see, so after a chunked prefill (or a new
turn over a cached prefix) the latest observation window decides, as DiffKV's prefill rule intends.

Off the kernels, :class:`DecodeAttentionWrapper` runs :class:`~diffkv_sglang.cpu_attention.CodeDecodePlan` (torch,
on the sealed blocks' packed codes, without a dense copy of them) and :class:`ExtendAttentionWrapper` the torch
reference below (any device: sealed pages dequantized by ``store.read_pages``). When the store uses kernels
(``store.kernels``, see :mod:`diffkv_sglang.backend_select`), :class:`DecodeAttentionWrapper` runs the Triton decode kernel
(:class:`diffkv_sglang.kernels.decode_attention.DecodePlan`) and :class:`ExtendAttentionWrapper` the Triton extend
kernels (:class:`diffkv_sglang.kernels.extend_attention.ExtendPlan`, flash attention over the batch's pages read
densely by :func:`diffkv_sglang.kernels.dense_read.read_pages_dense`) behind the same ``plan()`` / ``run()``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .backend_select import decode_split_kernel
from .cpu_attention import CodeDecodePlan
from .policy import group_max
from .format import PageState
from .store import CompressedKVStore


_QUERY_CHUNK = 512      # reference attention runs queries in chunks, each over the keys its positions can see


@dataclasses.dataclass
class PagedBatchPlan:
    """Per-batch metadata built by ``plan()``.

    Attributes:
        page_table: ``[B, max_pages]`` int64 logical pages per request (padded with page 0).
        seq_lens: ``[B]`` int64 tokens per request (including the new ones).
        key_locs: ``[B, T]`` int64 logical slot of each key position (``T = max_pages * page_size``).
        key_valid: ``[B, T]`` bool, ``t < seq_len``.
        q_positions: ``[B, Q]`` int64 position of each (padded) query; q_valid ``[B, Q]`` bool.
        q_index: ``[n_valid]`` int64 flat index into ``[B * Q]`` of the real queries, in input order.
        observe: ``[B, Q]`` bool, queries whose attention is recorded as importance.
        sm_scale: softmax scale.
    """

    page_table: torch.Tensor
    seq_lens: torch.Tensor
    key_locs: torch.Tensor
    key_valid: torch.Tensor
    q_positions: torch.Tensor
    q_valid: torch.Tensor
    q_index: torch.Tensor
    observe: torch.Tensor
    sm_scale: float


@dataclasses.dataclass
class _QueryLayout:
    """What the reference attention needs of a planned batch beyond the plan, the same in every layer.

    Attributes:
        plan: the plan it was built for.
        causal: ``[B, Q, T]`` bool, key ``t`` is valid and visible to query ``q``.
        chunks: ``(start, end, span)`` query chunks and the keys ``[0, span)`` their positions can see.
        columns: ``[n]`` int64 query columns some request observes.
        observed: ``[B, n]`` bool, which requests observe those columns.
        seen: ``[B, T]`` float32 observing queries that see each key.
    """

    plan: PagedBatchPlan
    causal: torch.Tensor
    chunks: list[tuple[int, int, int]]
    columns: torch.Tensor
    observed: torch.Tensor
    seen: torch.Tensor

    @classmethod
    def build(cls, plan: PagedBatchPlan) -> "_QueryLayout":
        num_q, num_keys = plan.q_positions.shape[1], plan.key_valid.shape[1]
        causal = plan.key_valid[:, None, :] & (torch.arange(num_keys, device=plan.key_valid.device)[None, None, :]
                                               <= plan.q_positions[:, :, None])
        last_position = plan.q_positions.max(0).values.tolist() if plan.q_positions.numel() else []  # one host sync
        chunks = [(start, min(start + _QUERY_CHUNK, num_q),
                   max(1, min(max(last_position[start:start + _QUERY_CHUNK]) + 1, num_keys)))
                  for start in range(0, num_q, _QUERY_CHUNK)]
        observe = plan.observe & plan.q_valid                                              # [B, Q]
        columns = observe.any(0).nonzero().squeeze(1)
        observed = observe[:, columns]
        seen = (causal[:, columns] & observed[:, :, None]).sum(1).float()
        return cls(plan, causal, chunks, columns, observed, seen)


def _check_table(page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int) -> None:
    """Raise unless ``page_table`` ``[B, C]`` has a column for every page ``seq_lens`` ``[B]`` need (a host sync)."""
    if page_table.dim() != 2 or seq_lens.shape != page_table.shape[:1]:
        raise ValueError(f"plan: page_table {tuple(page_table.shape)} and seq_lens {tuple(seq_lens.shape)}: "
                         "expected [B, max_pages] and [B]")
    if seq_lens.numel() and bool(((seq_lens + page_size - 1) // page_size > page_table.shape[1]).any()):
        raise ValueError("plan: some requests have fewer pages than their seq_lens need")


class _PagedAttentionBase:
    """Shared plan/run machinery; subclasses define the queries."""

    def __init__(self, store: CompressedKVStore, num_q_heads: int):
        if num_q_heads < 1 or num_q_heads % store.num_kv_heads:
            raise ValueError(f"num_q_heads={num_q_heads} must be a positive multiple of num_kv_heads="
                             f"{store.num_kv_heads}")
        self.store, self.num_q_heads = store, num_q_heads
        self._plan: PagedBatchPlan | None = None
        self._targets = None            # (plan, b, t, slots) of the staged tokens whose statistics run() sets
        self._layout: _QueryLayout | None = None     # of the planned batch, built by its first run()

    def _plan_keys(self, page_table, seq_lens):
        store = self.store
        table = page_table.to(store.device, torch.int64)
        seq_lens = seq_lens.to(store.device, torch.int64)
        _check_table(table, seq_lens, store.page_size)
        most = -(-int(seq_lens.max()) // store.page_size) if seq_lens.numel() else 0       # one host sync
        table = table[:, :most] if most else torch.zeros(table.shape[0], 1, dtype=torch.int64, device=store.device)
        num_keys = table.shape[1] * store.page_size
        t = torch.arange(num_keys, device=store.device)
        key_locs = table[:, t // store.page_size] * store.page_size + t % store.page_size
        return table, seq_lens, key_locs, t[None, :] < seq_lens[:, None]

    def _run(self, q_padded: torch.Tensor, layer: int, sm_scale: float | None) -> torch.Tensor:
        """Attention for padded queries ``[B, Q, Hq, D]`` -> float32 ``[B, Q, Hq, D]``; records importance."""
        plan, store = self._plan, self.store
        if plan is None:
            raise RuntimeError("call plan() before run()")
        batch, num_q, num_q_heads, dim = q_padded.shape
        heads = store.num_kv_heads
        group = num_q_heads // heads
        keys, values, present = store.read_pages(layer, plan.page_table.reshape(-1))     # [B*pages, H, P(, D)]
        keys = keys.reshape(batch, -1, heads, store.page_size, dim).permute(0, 2, 1, 3, 4).reshape(batch, heads, -1, dim)
        values = values.reshape(batch, -1, heads, store.page_size, dim).permute(0, 2, 1, 3, 4).reshape(batch, heads, -1, dim)
        present = present.reshape(batch, -1, heads, store.page_size).permute(0, 2, 1, 3).reshape(batch, heads, -1)
        present &= plan.key_valid[:, None, :]
        absent = ~present[..., None]                              # unwritten slots may hold any bits, NaN included
        keys, values = keys.masked_fill(absent, 0.0), values.masked_fill(absent, 0.0)
        q = q_padded.float().permute(0, 2, 1, 3).reshape(batch, heads, group * num_q, dim)  # [B, H, G*Q, D]
        scale = plan.sm_scale if sm_scale is None else sm_scale
        if self._layout is None or self._layout.plan is not plan:   # positions only: once per batch, not per layer
            self._layout = _QueryLayout.build(plan)
        causal = self._layout.causal                                                       # [B, Q, T]
        q_groups = q.reshape(batch, heads, group, num_q, dim)
        out = torch.empty_like(q_groups)
        for start, end, span in self._layout.chunks:      # causal: a chunk of queries reads keys up to its last
            mask = causal[:, None, None, start:end, :span] & present[:, :, None, None, :span]   # [B, H, 1, n, t]
            chunk = torch.nn.functional.scaled_dot_product_attention(
                q_groups[:, :, :, start:end].reshape(batch, heads, -1, dim), keys[:, :, :span], values[:, :, :span],
                attn_mask=mask.expand(-1, -1, group, -1, -1).reshape(batch, heads, -1, span), scale=scale)
            out[:, :, :, start:end] = chunk.reshape(batch, heads, group, end - start, dim)
        out = torch.nan_to_num(out, nan=0.0)              # queries that see no key: padding, everything pruned
        self._record_importance(layer, q, keys, present, scale)
        return out.reshape(batch, num_q_heads, num_q, dim).permute(0, 2, 1, 3)

    def _record_importance(self, layer: int, q: torch.Tensor, keys: torch.Tensor, present: torch.Tensor,
                           scale: float) -> None:
        """Add the observing queries' attention to staged tokens. ``q`` ``[B, H, G*Q, D]`` (row ``g * Q + i``:
        query ``i``, head ``g`` of the group), ``keys`` ``[B, H, T, D]``, ``present`` ``[B, H, T]``. The
        probabilities are computed for the query columns some request observes only (the last ``obs_window`` of a
        prompt, not all of it)."""
        layout = self._layout
        batch, heads, rows, dim = q.shape
        num_q = layout.causal.shape[1]
        columns = layout.columns
        q_obs = q.reshape(batch, heads, rows // num_q, num_q, dim)[:, :, :, columns]       # [B, H, G, n, D]
        logits = torch.einsum("bhgqd,bhkd->bhgqk", q_obs, keys) * scale                    # [B, H, G, n, T]
        mask = layout.causal[:, None, None, columns] & present[:, :, None, None, :]
        probs = torch.nan_to_num(torch.softmax(logits.masked_fill(~mask, -math.inf), dim=-1), nan=0.0)
        mass = (probs * layout.observed[:, None, None, :, None]).sum(3)                    # [B, H, G, T]
        score = group_max(mass.reshape(batch, -1, mass.shape[-1]), heads)                  # [B, H, T]
        self._store_importance(layer, score, layout.seen)

    def _store_importance(self, layer: int, score: torch.Tensor, seen: torch.Tensor) -> None:
        """Give the planned batch's staged tokens that some observing query saw their statistics: ``score``
        ``[B, H, T]`` attention mass per KV head, ``seen`` ``[B, T]`` observing queries (``T`` key positions of
        the plan; entries of other tokens are ignored)."""
        plan, store = self._plan, self.store
        if self._targets is None or self._targets[0] is not plan:
            # which tokens those are depends on positions and page states only: found once per batch (one host
            # sync), not in every layer
            pages = plan.key_locs // store.page_size
            target = plan.key_valid & (store.page_state[pages] == PageState.STAGED) & (seen > 0)
            b, t = target.nonzero(as_tuple=True)
            self._targets = (plan, b, t, plan.key_locs[b, t])
        _, b, t, locs = self._targets
        store.add_importance(layer, locs, score[b, :, t], seen[b, t], accumulate=False)      # the window replaces


class DecodeAttentionWrapper(_PagedAttentionBase):
    """Decode attention: one query per request over its paged, partly compressed KV.

    Without ``store.kernels`` (off CUDA by default) ``plan`` fills a
    :class:`~diffkv_sglang.cpu_attention.CodeDecodePlan` and ``run`` computes attention in torch on the sealed
    blocks' packed codes (float32 results, staged pages read dense).

    With ``store.kernels`` (CUDA by default) ``plan`` fills a
    :class:`~diffkv_sglang.kernels.decode_attention.DecodePlan` and ``run`` only launches: with ``out`` given,
    ``run`` allocates nothing and never syncs with the host, so a decode step (``write_tokens`` and ``run`` of
    every layer) can be captured in a CUDA graph and replayed after ``plan`` with a new batch of the same
    capacity. The plan's capacity (requests, pages per request) is given here or grows to the next power of two of
    what a batch needs (pages capped by the store's page count); growing reallocates its buffers, in ``plan``.

    Args:
        store: the compressed store.
        num_q_heads: query heads on this rank (a multiple of ``store.num_kv_heads``).
        max_batch, max_pages: initial capacity of the kernel plan (ignored without kernels).
        max_staged_pages: staged pages a request may have, fixed: the plan's scratch never reallocates and
            ``plan`` needs no host sync for it (a decode batch whose old pages were sealed has at most
            ``window / page_size + 2``; staged pages past it get no importance). None sizes it in every ``plan``
            from the batch (one host sync).

    Example (a store of two layers and one KV head, two query heads, one request of 20 tokens)::

        >>> import torch
        >>> from diffkv_sglang.config import DiffKVConfig
        >>> from diffkv_sglang.store import CompressedKVStore
        >>> store = CompressedKVStore(DiffKVConfig(page_size=16), num_layers=2, num_kv_heads=1, head_dim=64,
        ...                           num_pages=8, arena_bytes=1 << 20, dtype=torch.float32)
        >>> pages = torch.tensor([[1, 2]])                          # [B, max_pages]: the request's pages
        >>> store.stage(pages[0])
        >>> locs = torch.arange(16, 16 + 20)                        # token t in page 1 + t // 16
        >>> wrapper = DecodeAttentionWrapper(store, num_q_heads=2)
        >>> wrapper.plan(pages, torch.tensor([20]))                  # once per batch
        >>> for layer in range(2):
        ...     kv = torch.randn(2, 20, 1, 64)
        ...     store.write_tokens(layer, locs, kv[0], kv[1])
        ...     out = wrapper.run(torch.randn(1, 2, 64), layer)       # [B, Hq, D]
        >>> out.shape
        torch.Size([1, 2, 64])
    """

    def __init__(self, store: CompressedKVStore, num_q_heads: int, max_batch: int = 1, max_pages: int = 1,
                 max_staged_pages: int | None = None):
        super().__init__(store, num_q_heads)
        self._kernel_plan = None                     # DecodePlan, built by the first plan()
        self._capacity = (max(1, max_batch), max(1, min(max_pages, store.num_pages)))
        self._max_staged_pages = max_staged_pages
        self._sm_scale: float | None = None
        self._batch_size = 0
        self._code_plan = None if store.kernels else CodeDecodePlan(store)
        self._split_kernel = decode_split_kernel()             # DIFFKV_KERNELS, read once, like store.kernels

    @property
    def capacity(self) -> tuple[int, int]:
        """``(max_batch, max_pages)`` the kernel plan holds now (it grows in ``plan`` for a larger batch)."""
        return self._capacity

    def plan(self, page_table: torch.Tensor, seq_lens: torch.Tensor, sm_scale: float | None = None,
             check: bool = True) -> None:
        """Build per-batch metadata.

        Args:
            page_table: ``[B, max_pages]`` int logical pages of each request in token order (columns past a
                request's last page are ignored).
            seq_lens: ``[B]`` int tokens per request, the new token included (it is the query's position + 1).
            sm_scale: softmax scale (default ``1 / sqrt(head_dim)``).
            check: verify that ``page_table`` covers ``seq_lens`` (a host sync); a caller that built the table
                from the lengths (the SGLang backend) passes False.
        """
        store = self.store
        self._sm_scale = sm_scale if sm_scale is not None else store.head_dim ** -0.5
        table = page_table.to(store.device, torch.int64)
        seq_lens = seq_lens.to(store.device, torch.int64)
        if check:
            _check_table(table, seq_lens, store.page_size)
        self._batch_size = seq_lens.numel()
        if not store.kernels:
            self._code_plan.plan(table, seq_lens)
        elif self._batch_size:
            self._plan_kernel(table, seq_lens)

    def run(self, q: torch.Tensor, layer: int, sm_scale: float | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """``q`` ``[B, Hq, D]`` -> output ``[B, Hq, D]`` in ``q.dtype`` (written to ``out`` if given);
        accumulates staged-token importance. ``sm_scale`` overrides the plan's softmax scale for this layer."""
        if self._sm_scale is None:
            raise RuntimeError("call plan() before run()")
        scale = self._sm_scale if sm_scale is None else sm_scale
        if not self.store.kernels:
            result = self._code_plan.run(q, layer, scale).to(q.dtype)
            return result if out is None else out.copy_(result)
        if self._batch_size == 0:
            return torch.empty_like(q) if out is None else out
        return self._kernel_plan.run(q if q.stride(-1) == 1 else q.contiguous(), layer, out=out, sm_scale=scale)

    def _plan_kernel(self, table: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """Fill the kernel plan for the batch, (re)building it for a larger batch."""
        from .kernels.decode_attention import DecodePlan

        batch, cols = table.shape
        plan = self._kernel_plan
        if plan is None or batch > plan.max_batch or cols > plan.max_pages:
            grow = lambda need, have: max(have, 1 << (need - 1).bit_length())          # noqa: E731
            max_batch = grow(batch, self._capacity[0])
            max_pages = min(grow(max(cols, 1), self._capacity[1]), max(cols, self.store.num_pages))
            self._capacity = (max_batch, max_pages)
            self._kernel_plan = plan = DecodePlan(self.store.view, self.num_q_heads, max_batch=max_batch,
                                                  max_pages=max_pages, max_staged_pages=self._max_staged_pages,
                                                  split_kernel=self._split_kernel)
        plan.plan(table, seq_lens, check=False)          # plan() checked the table when asked to


class ExtendAttentionWrapper(_PagedAttentionBase):
    """Extend (prefill, chunked prefill, prefix-cache hit) attention: new queries over prefix + new tokens.

    The new tokens' K/V must already be written to their staged pages. Attention is causal by position and
    exact over staged tokens. The last ``obs_window`` queries of each request's chunk set the importance of the
    staged tokens they see (replacing earlier statistics). With ``store.kernels``, ``plan`` also plans the Triton
    extend kernels (:class:`~diffkv_sglang.kernels.extend_attention.ExtendPlan`, over the batch's valid pages
    read densely once per layer by :func:`~diffkv_sglang.kernels.dense_read.read_pages_dense`).

    Args:
        store: the compressed store.
        num_q_heads: query heads on this rank (a multiple of ``store.num_kv_heads``).

    Example (one request: a 40-token prompt in pages 3, 4 and 5)::

        >>> import torch
        >>> from diffkv_sglang.config import DiffKVConfig
        >>> from diffkv_sglang.store import CompressedKVStore
        >>> store = CompressedKVStore(DiffKVConfig(page_size=16), num_layers=2, num_kv_heads=1, head_dim=64,
        ...                           num_pages=8, arena_bytes=1 << 20, dtype=torch.float32)
        >>> pages = torch.tensor([[3, 4, 5]])
        >>> store.stage(pages[0])
        >>> wrapper = ExtendAttentionWrapper(store, num_q_heads=2)
        >>> wrapper.plan(torch.tensor([0, 40]), pages, torch.tensor([40]))   # qo_indptr, page_table, seq_lens
        >>> for layer in range(2):
        ...     kv = torch.randn(2, 40, 1, 64)
        ...     store.write_tokens(layer, 48 + torch.arange(40), kv[0], kv[1])
        ...     out = wrapper.run(torch.randn(40, 2, 64), layer)          # [total_new, Hq, D]
        >>> out.shape
        torch.Size([40, 2, 64])
    """

    def __init__(self, store: CompressedKVStore, num_q_heads: int):
        super().__init__(store, num_q_heads)
        self._kernel_plan = None                     # ExtendPlan, built by the first plan() with kernels
        self._kv_pages = None                        # [nnz] int64 the batch's valid pages, in CSR order

    def plan(self, qo_indptr: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor,
             sm_scale: float | None = None, obs_window: int | None = None) -> None:
        """Build per-batch metadata (host syncs allowed: prefill is compute-bound).

        Args:
            qo_indptr: ``[B + 1]`` int CSR offsets of each request's new tokens in ``q``.
            page_table: ``[B, max_pages]`` int the requests' pages, prefix and new tokens.
            seq_lens: ``[B]`` int total tokens per request after this extend.
            sm_scale: softmax scale (default ``1 / sqrt(head_dim)``).
            obs_window: observing queries per request (default: the config's ``obs_window``).
        """
        table, seq_lens, key_locs, key_valid = self._plan_keys(page_table, seq_lens)
        device = table.device
        qo_indptr = qo_indptr.to(device, torch.int64)
        window = obs_window if obs_window is not None else self.store.config.obs_window
        extend_lens = qo_indptr[1:] - qo_indptr[:-1]
        batch = extend_lens.numel()
        max_q = int(extend_lens.max()) if batch else 0
        i = torch.arange(max(max_q, 1), device=device)
        q_valid = i[None, :] < extend_lens[:, None]
        q_positions = (seq_lens - extend_lens)[:, None] + i[None, :]
        observe = q_positions >= (seq_lens - window)[:, None]
        q_index = (torch.arange(batch, device=device)[:, None] * q_valid.shape[1] + i[None, :])[q_valid]
        self._plan = PagedBatchPlan(
            page_table=table, seq_lens=seq_lens, key_locs=key_locs, key_valid=key_valid,
            q_positions=q_positions, q_valid=q_valid, q_index=q_index, observe=observe,
            sm_scale=sm_scale if sm_scale is not None else self.store.head_dim ** -0.5)
        if self.store.kernels:
            self._plan_kernel(qo_indptr, table, seq_lens, window)

    def _plan_kernel(self, qo_indptr, table, seq_lens, window) -> None:
        """The kernels read the batch's valid pages densely, request after request (CSR)."""
        from .kernels.extend_attention import ExtendPlan

        num_pages = (seq_lens + self.store.page_size - 1) // self.store.page_size
        kv_page_indptr = torch.zeros(num_pages.numel() + 1, dtype=torch.int64, device=table.device)
        kv_page_indptr[1:] = torch.cumsum(num_pages, 0)
        valid = torch.arange(table.shape[1], device=table.device)[None, :] < num_pages[:, None]
        self._kv_pages = table[valid]
        if self._kernel_plan is None:
            self._kernel_plan = ExtendPlan(self.store.view, self.num_q_heads)
        self._kernel_plan.plan(qo_indptr, kv_page_indptr, self._kv_pages, seq_lens, window)

    def run(self, q: torch.Tensor, layer: int, sm_scale: float | None = None) -> torch.Tensor:
        """``q`` ``[total_new, Hq, D]`` -> output ``[total_new, Hq, D]`` in ``q.dtype``; records window importance.
        ``sm_scale`` overrides the plan's softmax scale for this layer."""
        plan = self._plan
        if plan is None:
            raise RuntimeError("call plan() before run()")
        if self.store.kernels:
            return self._run_kernel(q, layer, plan.sm_scale if sm_scale is None else sm_scale)
        batch, max_q = plan.q_valid.shape
        padded = torch.zeros(batch * max_q, *q.shape[1:], dtype=q.dtype, device=q.device)
        padded[plan.q_index] = q
        out = self._run(padded.reshape(batch, max_q, *q.shape[1:]), layer, sm_scale)
        return out.reshape(batch * max_q, *q.shape[1:])[plan.q_index].to(q.dtype)

    def _run_kernel(self, q: torch.Tensor, layer: int, sm_scale: float) -> torch.Tensor:
        """The Triton extend kernels over the batch's pages, read densely in ``q``'s dtype (by the dense-read
        kernel for the store's dtype or float32, else by the reference)."""
        from .kernels.dense_read import read_pages_dense

        if q.dtype in (self.store.dtype, torch.float32):
            keys, values, present = read_pages_dense(self.store.view, layer, self._kv_pages, q.dtype)
        else:
            keys, values, present = self.store.read_pages(layer, self._kv_pages)
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        out, score, seen = self._kernel_plan.run(q.contiguous(), keys, values, present, sm_scale)
        self._store_importance(layer, score, seen)
        return out
