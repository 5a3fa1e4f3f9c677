"""Extend (prefill) attention over the compressed store: flash attention over dequantized pages, plus the
observation window's importance.

The contract is the torch path of :meth:`diffkv_sglang.attention.ExtendAttentionWrapper.run` (the reference; the
wrapper runs these kernels instead when the store uses kernels, see :mod:`diffkv_sglang.backend_select`): each
request's new queries attend causally (by position) over every kept token of its pages, prefix and new tokens
alike, with a float32 softmax; the request's last ``obs_window`` queries then set the importance of the staged
tokens they see (``score = max over the GQA group of the summed probabilities``, ``seen`` = how many of them see
the token).

Prefill is compute-bound (every key is read by many queries), so the kernels read a dense copy of the batch's
pages rather than the compressed blocks: :meth:`ExtendPlan.run` takes the pages' keys and values as the store's
reference read gives them (sealed pages dequantized, pruned slots marked absent), in the query's dtype, and two
kernels run over them:

* ``_extend_attention_kernel``, grid ``(query tiles, Hq)``: a tile is ``BLOCK_Q`` consecutive new queries of one
  request (tiles never span requests); the program walks key positions ``0 .. last query's position`` in tiles of
  ``BLOCK_N`` (a tile may span pages: row ``t`` is slot ``t % P`` of the request's page ``t // P``), masks absent
  and future tokens, and keeps a base-2 online softmax. Writes the output and each row's base-2 log-sum-exp.
* ``_window_importance_kernel``, grid ``(B, H, pages)``: for one staged page of a request and one KV head,
  recomputes the probabilities of the request's observing queries (each of the ``G`` query heads, from the
  log-sum-exp above, ``window_rows`` queries at a time) over the page's tokens, sums them over the queries,
  takes the maximum over the group, and counts the observing queries that see each token. Writes ``score``
  ``[B, H, T]`` and ``seen`` ``[B, T]`` (``T = max_pages * P``) for the wrapper to store; entries of other pages
  are left unwritten.

Arithmetic: products on tensor cores in the query's dtype (16-bit operands, float32 accumulation; float32
queries use IEEE float32 products), probabilities rounded to that dtype for the value product, as in a dense
flash-attention kernel. A 16-bit query sees sealed keys and values rounded to its dtype once (the staged ones
are stored in it); the bound the tests check is derived in ``tests/test_kernel_extend.py``.

Example::

    plan = ExtendPlan(store.view, num_q_heads=32)
    plan.plan(qo_indptr, kv_page_indptr, kv_page_indices, seq_lens)          # once per batch
    for layer in range(store.num_layers):
        store.write_tokens(layer, new_locs, k[layer], v[layer])
        keys, values, present = store.read_pages(layer, kv_page_indices)
        out, score, seen = plan.run(q[layer], keys.to(q.dtype), values.to(q.dtype), present)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from diffkv_sglang.format import BlockView
from diffkv_sglang.kernels.block_read import STAGED
from diffkv_sglang.kernels.tl_utils import mma as _mma

__all__ = ["ExtendPlan", "EXTEND_CONFIG"]

EXTEND_CONFIG = {"block_q": 64, "block_n": 64, "window_rows": 64, "num_warps": 4, "num_stages": 2}
"""Launch parameters: query rows and key rows per attention tile, observing queries per chunk of the importance
kernel, Triton options."""
MIN_BLOCK = 32                  # tile sides of at least 32 rows (16-row tiles gave wrong outputs on an H100 in the first decode kernel, Triton 3.6)


@triton.jit
def _key_rows(K, PRESENT, page0, t, seq_len, h, H: tl.constexpr, P: tl.constexpr, D: tl.constexpr):
    """Keys ``[BLOCK, D]`` of request positions ``t`` (head ``h``; slot ``t % P`` of the request's dense page
    ``page0 + t // P``) and their presence (False past ``seq_len`` and for pruned slots)."""
    in_seq = t < seq_len
    row = ((page0 + t // P) * H + h) * P + t % P
    keys = tl.load(K + row[:, None] * D + tl.arange(0, D)[None, :], mask=in_seq[:, None], other=0.0)
    keep = tl.load(PRESENT + row, mask=in_seq, other=0) != 0
    return row, keys, keep


@triton.jit
def _extend_attention_kernel(Q, K, V, PRESENT, OUT, LSE, TILE_REQ, TILE_ROW, QO_INDPTR, KV_INDPTR, SEQ_LENS,
                             qk_scale, stride_q, stride_out, H: tl.constexpr, G: tl.constexpr, P: tl.constexpr,
                             D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """One query tile of one query head: causal flash attention over the request's dense pages."""
    tile = tl.program_id(0)
    hq = tl.program_id(1)
    h = hq // G
    b = tl.load(TILE_REQ + tile)
    row0 = tl.load(TILE_ROW + tile)
    q_first = tl.load(QO_INDPTR + b)
    q_end = tl.load(QO_INDPTR + b + 1)
    seq_len = tl.load(SEQ_LENS + b).to(tl.int32)
    page0 = tl.load(KV_INDPTR + b)
    rows = row0 + tl.arange(0, BLOCK_Q)
    row_ok = rows < q_end
    pos = (seq_len - (q_end - q_first) + rows - q_first).to(tl.int32)             # query positions
    d = tl.arange(0, D)
    q = tl.load(Q + rows[:, None].to(tl.int64) * stride_q + hq * D + d[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, D], tl.float32)
    last = tl.max(tl.where(row_ok, pos, 0), 0)
    for t0 in range(0, last + 1, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        row, keys, keep = _key_rows(K, PRESENT, page0, t, seq_len, h, H, P, D)
        values = tl.load(V + row[:, None] * D + d[None, :], mask=(t < seq_len)[:, None], other=0.0)
        s = _mma(q, tl.trans(keys), tl.zeros([BLOCK_Q, BLOCK_N], tl.float32), IEEE) * qk_scale
        s = tl.where(keep[None, :] & (t[None, :] <= pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _mma(p.to(values.dtype), values, acc * alpha[:, None], IEEE)
        m_i = m_new
    seen_any = l_i > 0
    out = tl.where(seen_any[:, None], acc / tl.where(seen_any, l_i, 1.0)[:, None], 0.0)
    tl.store(OUT + rows[:, None].to(tl.int64) * stride_out + hq * D + d[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None])
    lse = tl.where(seen_any, m_i + tl.log2(tl.where(seen_any, l_i, 1.0)), float("inf"))  # inf: p = 0 everywhere
    tl.store(LSE + rows.to(tl.int64) * (H * G) + hq, lse, mask=row_ok)


@triton.jit
def _window_importance_kernel(Q, K, PRESENT, LSE, SCORE, SEEN, QO_INDPTR, KV_INDPTR, KV_INDICES, PAGE_STATE,
                              SEQ_LENS, qk_scale, obs_window, stride_q, score_cols, H: tl.constexpr, G: tl.constexpr,
                              P: tl.constexpr, D: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_P: tl.constexpr,
                              IEEE: tl.constexpr):
    """One staged page of one request and one KV head: the observing queries' importance of its tokens (the
    queries in chunks of ``BLOCK_W`` rows)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    j = tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + b).to(tl.int32)
    page0 = tl.load(KV_INDPTR + b)
    if j * P < seq_len:
        page = tl.load(KV_INDICES + page0 + j)
        if tl.load(PAGE_STATE + page) == STAGED:
            q_first = tl.load(QO_INDPTR + b)
            q_end = tl.load(QO_INDPTR + b + 1)
            n_obs = tl.minimum(obs_window, q_end - q_first).to(tl.int32)
            slot = tl.arange(0, BLOCK_P)
            t = j * P + slot
            in_page = (slot < P) & (t < seq_len)
            _, keys, keep = _key_rows(K, PRESENT, page0, tl.where(in_page, t, seq_len), seq_len, h, H, P, D)
            d = tl.arange(0, D)
            score = tl.zeros([BLOCK_P], tl.float32)
            seen = tl.zeros([BLOCK_P], tl.float32)
            for g in range(G):
                hq = h * G + g
                mass = tl.zeros([BLOCK_P], tl.float32)
                for w0 in range(0, n_obs, BLOCK_W):
                    w = w0 + tl.arange(0, BLOCK_W)
                    obs_ok = w < n_obs
                    rows = q_end - n_obs + w                                       # the last n_obs queries
                    pos = seq_len - n_obs + w
                    sees = obs_ok[:, None] & (t[None, :] <= pos[:, None])          # [BLOCK_W, BLOCK_P]
                    q = tl.load(Q + rows[:, None].to(tl.int64) * stride_q + hq * D + d[None, :],
                                mask=obs_ok[:, None], other=0.0)
                    lse = tl.load(LSE + rows.to(tl.int64) * (H * G) + hq, mask=obs_ok, other=float("inf"))
                    s = _mma(q, tl.trans(keys), tl.zeros([BLOCK_W, BLOCK_P], tl.float32), IEEE) * qk_scale
                    mass += tl.sum(tl.where(sees & keep[None, :], tl.exp2(s - lse[:, None]), 0.0), 0)
                    if g == 0:
                        seen += tl.sum(sees.to(tl.float32), 0)
                score = tl.maximum(score, mass)
            tl.store(SCORE + (b.to(tl.int64) * H + h) * score_cols + t, score, mask=in_page)
            if h == 0:
                tl.store(SEEN + b.to(tl.int64) * score_cols + t, seen, mask=in_page)


class ExtendPlan:
    """Per-batch metadata and launches of the extend kernels.

    Args:
        kv: the store's blocks (``CompressedKVStore.view``; its page states decide which pages are staged).
        num_q_heads: query heads (a multiple of the store's KV heads).
        config: launch parameters (default :data:`EXTEND_CONFIG`).
    """

    def __init__(self, kv: BlockView, num_q_heads: int, config: dict | None = None):
        if num_q_heads % kv.num_kv_heads:
            raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={kv.num_kv_heads}")
        if kv.head_dim & (kv.head_dim - 1) or kv.head_dim < 16:
            raise ValueError(f"head_dim={kv.head_dim}: the extend kernel needs a power of two >= 16")
        self.kv, self.num_q_heads = kv, num_q_heads
        self.config = dict(EXTEND_CONFIG, **(config or {}))
        self._batch = None

    def plan(self, qo_indptr: torch.Tensor, kv_page_indptr: torch.Tensor, kv_page_indices: torch.Tensor,
             seq_lens: torch.Tensor, obs_window: int) -> None:
        """Cut the batch's queries into tiles and allocate the per-batch buffers (log-sum-exp ``[total_new, Hq]``,
        ``score``, ``seen``); host syncs for the tile count, query count and page count.

        Args:
            qo_indptr: ``[B + 1]`` int CSR offsets of each request's new tokens in ``q``.
            kv_page_indptr, kv_page_indices: ``[B + 1]``, ``[nnz]`` int the requests' pages (CSR, token order);
                ``run``'s dense keys are indexed the same way.
            seq_lens: ``[B]`` int tokens per request after this extend.
            obs_window: observing queries per request.
        """
        device = self.kv.device
        as_long = lambda x: x.to(device, torch.int64).contiguous()                 # noqa: E731
        qo_indptr, kv_page_indptr, kv_page_indices, seq_lens = map(as_long, (qo_indptr, kv_page_indptr,
                                                                            kv_page_indices, seq_lens))
        block_q = self.config["block_q"]
        extend_lens = qo_indptr[1:] - qo_indptr[:-1]
        tiles = (extend_lens + block_q - 1) // block_q
        tile_req = torch.repeat_interleave(torch.arange(tiles.numel(), device=device), tiles)
        first_tile = torch.cumsum(tiles, 0) - tiles
        tile_row = qo_indptr[:-1][tile_req] + (torch.arange(tile_req.numel(), device=device)
                                               - first_tile[tile_req]) * block_q
        pages = kv_page_indptr[1:] - kv_page_indptr[:-1]
        max_pages = max(int(pages.max()) if pages.numel() else 0, 1)
        total = int(qo_indptr[-1]) if qo_indptr.numel() else 0
        num_batch, heads, cols = seq_lens.numel(), self.kv.num_kv_heads, max_pages * self.kv.page_size
        self._batch = dict(qo_indptr=qo_indptr, kv_page_indptr=kv_page_indptr, kv_page_indices=kv_page_indices,
                           seq_lens=seq_lens, tile_req=tile_req, tile_row=tile_row, max_pages=max_pages,
                           obs_window=int(obs_window), total=total)
        self.lse = torch.empty(total, self.num_q_heads, dtype=torch.float32, device=device)
        self.score = torch.empty(num_batch, heads, cols, dtype=torch.float32, device=device)
        self.seen = torch.empty(num_batch, cols, dtype=torch.float32, device=device)

    def run(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, present: torch.Tensor,
            sm_scale: float, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention of the planned batch in one layer.

        Args:
            q: ``[total_new, Hq, D]`` queries (float32, bfloat16 or float16).
            keys, values: ``[nnz, H, P, D]`` in ``q.dtype``: the pages of ``kv_page_indices`` (sealed ones
                dequantized, in the model's space).
            present: ``[nnz, H, P]`` bool, False for pruned (and empty) slots.
            sm_scale: softmax scale.
            out: optional ``[total_new, Hq, D]`` output buffer in ``q.dtype``.

        Returns:
            out ``[total_new, Hq, D]`` in ``q.dtype``; ``score`` ``[B, H, max_pages * P]`` and ``seen``
            ``[B, max_pages * P]`` float32 (the plan's buffers, overwritten by the next run), defined at the
            positions of staged pages only (see the module docstring).
        """
        batch = self._batch
        if batch is None:
            raise RuntimeError("call plan() before run()")
        kv, cfg = self.kv, self.config
        heads, page, dim = kv.num_kv_heads, kv.page_size, kv.head_dim
        total, num_q_heads = batch["total"], self.num_q_heads
        if tuple(q.shape) != (total, num_q_heads, dim) or q.stride(-1) != 1 or q.stride(1) != dim:
            raise ValueError(f"q must be [{total}, {num_q_heads}, {dim}] with contiguous heads, got {tuple(q.shape)}")
        nnz = batch["kv_page_indices"].numel()
        for name, x, shape in (("keys", keys, (nnz, heads, page, dim)), ("values", values, (nnz, heads, page, dim)),
                               ("present", present, (nnz, heads, page))):
            if tuple(x.shape) != shape or not x.is_contiguous():
                raise ValueError(f"{name} must be contiguous {shape}, got {tuple(x.shape)}")
        if keys.dtype != q.dtype or values.dtype != q.dtype:
            raise ValueError(f"keys and values must be in q's dtype {q.dtype}, got {keys.dtype}, {values.dtype}")
        ieee = q.dtype == torch.float32
        qk_scale = sm_scale * math.log2(math.e)
        group = num_q_heads // heads
        out = torch.empty_like(q) if out is None else out
        if out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
            raise ValueError(f"out must be contiguous {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
        lse, score, seen = self.lse, self.score, self.seen
        num_batch, cols = score.shape[0], score.shape[2]
        present_u8 = present.view(torch.uint8)
        tiles = batch["tile_req"].numel()
        if tiles:
            _extend_attention_kernel[(tiles, num_q_heads)](
                q, keys, values, present_u8, out, lse, batch["tile_req"], batch["tile_row"], batch["qo_indptr"],
                batch["kv_page_indptr"], batch["seq_lens"], qk_scale, q.stride(0), out.stride(0), heads, group,
                page, dim, cfg["block_q"], max(MIN_BLOCK, cfg["block_n"]), ieee,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            _window_importance_kernel[(num_batch, heads, batch["max_pages"])](
                q, keys, present_u8, lse, score, seen, batch["qo_indptr"], batch["kv_page_indptr"],
                batch["kv_page_indices"], kv.page_state, batch["seq_lens"], qk_scale, batch["obs_window"],
                q.stride(0), cols, heads, group, page, dim, cfg["window_rows"],
                max(MIN_BLOCK, triton.next_power_of_2(page)), ieee, num_warps=cfg["num_warps"])
        return out, score, seen
