"""The ``diffkv`` attention backend: SGLang's calls translated into the core's plan/run wrappers.

Per forward (``init_forward_metadata``):

* the batch's page lists come from ``req_to_token`` (one slot per page start, ``slot // page_size``);
* in a **decode** batch, every staged page whose tokens are all older than the protected window is sealed
  first (classified from the importance its tokens gathered, quantized, packed). Prompt pages therefore stay
  staged through a chunked prefill and are sealed at the request's first decode step, with the importance of
  the prompt's last observation window; pages a finished request left staged in the radix tree are sealed
  when a later request decodes over them;
* the wrappers are planned once, and so are the new tokens' rows in every layer (``store.token_rows``, after
  sealing and compaction, which move blocks); ``forward_extend`` / ``forward_decode`` write the new tokens (two
  row-wise index puts) and run one layer.

All of it is host-side preparation (``init_forward_metadata_out_graph``), so SGLang's decode CUDA graphs can
replay the forward itself: ``init_cuda_graph_state`` adds a decode wrapper of fixed capacities (SGLang's largest
captured batch, a full-context page table, and the staged pages a decoding request can have once its old pages
are sealed: ``window / page_size + 2``) that every batch a graph can replay plans into, and a fixed buffer for
the new tokens' rows, so the captured buffers never move (larger batches run eagerly through the growing
wrapper); padded lanes (request row 0, length 1) attend over and write to the pool's padding page. Prefill
(extend) batches stay eager. Decode graphs are on by default on CUDA; ``DIFFKV_CUDA_GRAPH=0`` turns them off
(:mod:`diffkv_sglang.backend_select`).

The backend holds no algorithm: classification, quantization and attention live in the core.
"""

from __future__ import annotations

import logging

import torch

from . import upstream
from ..attention import DecodeAttentionWrapper, ExtendAttentionWrapper
from ..policy import sealable_pages
from ..format import PageState
from .pool import DiffKVKVPool
from .upstream import AttentionBackend, SharedReadEnds, get_parallel

logger = logging.getLogger(__name__)


class DiffKVAttnBackend(AttentionBackend):
    """Attention over the DiffKV pool (reference path on CPU; the same wrappers select kernels on CUDA)."""

    def __init__(self, model_runner):
        super().__init__()
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, DiffKVKVPool):
            raise RuntimeError("--attention-backend diffkv needs --kv-pool diffkv (the pool is "
                               f"{type(pool).__name__})")
        self.pool = pool
        self.store = pool.store
        self.page_size = pool.page_size
        self.window = pool.plan.config.window
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.num_q_heads = model_runner.model_config.get_num_attention_heads(get_parallel().attn_tp_size)
        # a decoding request's pages older than the window are sealed before each step: at most this many stay
        # staged, so the decode plans size their staged scratch once and plan without a host sync
        self.max_staged_pages = self.window // self.page_size + 2
        self.decode_wrapper = DecodeAttentionWrapper(self.store, self.num_q_heads,             # eager batches
                                                     max_staged_pages=self.max_staged_pages)
        self.graph_decode_wrapper: DecodeAttentionWrapper | None = None  # fixed capacities (init_cuda_graph_state)
        self._graph_max_bs = 0
        self._decode_planned = self.decode_wrapper                        # the wrapper the last decode plan filled
        self._graph_token_rows: torch.Tensor | None = None      # [L, max_bs, H] (init_cuda_graph_state)
        self._token_rows: torch.Tensor | None = None            # [L, tokens, H]: the forward's new tokens' rows
        self.extend_wrapper = ExtendAttentionWrapper(self.store, self.num_q_heads)
        self._checked_layers: set[int] = set()

    # ------------------------------------------------------------------------------ metadata
    def _page_table(self, forward_batch):
        """``[B, max_pages]`` logical pages of each request (what the wrappers plan with) and the
        ``[B, max_pages]`` mask of the columns within each request's length. No host sync: the width comes from
        SGLang's host copy of the lengths."""
        seq_lens = forward_batch.seq_lens.to(torch.int64)
        lens_cpu = forward_batch.seq_lens_cpu
        max_len = int(lens_cpu.max() if lens_cpu is not None else seq_lens.max())
        starts = self.req_to_token[forward_batch.req_pool_indices, :max_len:self.page_size].to(torch.int64)
        pages = starts // self.page_size
        num_pages = (seq_lens + self.page_size - 1) // self.page_size
        valid = torch.arange(pages.shape[1], device=pages.device)[None, :] < num_pages[:, None]
        return pages, valid

    def _seal_old_pages(self, pages, valid, seq_lens):
        """Seal every staged page of the batch that lies entirely before its request's protected window."""
        sealable = sealable_pages(seq_lens, self.page_size, self.window)
        col = torch.arange(pages.shape[1], device=pages.device)[None, :]
        candidate = valid & (col < sealable[:, None])
        candidate &= self.store.page_state[pages] == PageState.STAGED
        if not bool(candidate.any()):
            return
        owner_len = seq_lens[:, None].expand_as(pages)[candidate]
        unique, inverse = torch.unique(pages[candidate], return_inverse=True)
        context = torch.zeros_like(unique).scatter_reduce(0, inverse, owner_len, reduce="amax", include_self=False)
        self.store.seal(unique, context)

    def init_forward_metadata(self, forward_batch):
        self.init_forward_metadata_out_graph(forward_batch)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        """Seal, compact and plan for this batch (outside any CUDA graph: a captured decode graph replays only the
        forward, over the buffers planned here). A decode step syncs with the host once outside sealing (whether
        any page needs sealing); planning needs none (``tests/test_host_syncs.py``)."""
        mode = forward_batch.forward_mode
        if mode.is_idle():
            return
        pages, valid = self._page_table(forward_batch)
        seq_lens = forward_batch.seq_lens.to(torch.int64)
        if mode.is_decode():
            self._seal_old_pages(pages, valid, seq_lens)
            self.store.maybe_compact()
            # a batch a captured graph can replay plans into the fixed-capacity wrapper the graphs were captured
            # with; a larger (eager) batch into its own wrapper, so the captured buffers never move
            graphed = self.graph_decode_wrapper is not None and seq_lens.numel() <= self._graph_max_bs
            self._decode_planned = self.graph_decode_wrapper if graphed else self.decode_wrapper
            self._decode_planned.plan(pages, seq_lens, check=False)      # the table covers seq_lens by construction
            rows = self.store.token_rows(forward_batch.out_cache_loc)
            if graphed:                                  # the rows a captured graph reads, at a fixed address
                self._graph_token_rows[:, :rows.shape[1]].copy_(rows)
                rows = self._graph_token_rows[:, :rows.shape[1]]
            self._token_rows = rows
        elif mode.is_extend():
            extend_lens = forward_batch.extend_seq_lens.to(torch.int64)
            qo_indptr = torch.zeros(extend_lens.numel() + 1, dtype=torch.int64, device=extend_lens.device)
            qo_indptr[1:] = torch.cumsum(extend_lens, 0)
            self.extend_wrapper.plan(qo_indptr, pages, seq_lens)
            self._token_rows = self.store.token_rows(forward_batch.out_cache_loc)
        else:
            raise NotImplementedError(f"the diffkv backend does not support forward mode {mode}")
        self.pool.reporter.maybe_report()

    # --------------------------------------------------------------------------- CUDA graphs
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        """Add the decode wrapper of fixed capacities that captured decode graphs run (see the module docstring)."""
        if not self.store.kernels:
            raise RuntimeError("CUDA graphs need the DiffKV kernels (a CUDA store with DIFFKV_KERNELS auto or triton)")
        max_pages = -(-self.req_to_token.shape[1] // self.page_size)
        self.graph_decode_wrapper = DecodeAttentionWrapper(self.store, self.num_q_heads, max_batch=max_bs,
                                                           max_pages=max_pages, max_staged_pages=self.max_staged_pages)
        self._graph_max_bs = max_bs
        self._graph_token_rows = torch.zeros(self.store.num_layers, max_bs, self.store.num_kv_heads, dtype=torch.int64,
                                             device=self.store.device)

    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    def shared_read_ends(self, fm):
        """Where this backend's reads of scheduler-changed state end, for the overlap scheduler's write-after-read
        barrier: after the whole forward (``POST_REPLAY``), in every mode. Every layer's attention reads the store
        (page states, block offsets, arena bytes), and the scheduler changes it while the forward runs (releasing
        a finished or retracted request's pages, staging new ones); SGLang's default for decode (``IN_REPLAY``,
        reads end with the graph's metadata preparation) let a retraction free blocks that a replayed decode
        graph was still reading ('CUDA error: misaligned address' on an H100, benchmarks/results/serving-h100.json)."""
        return SharedReadEnds.POST_REPLAY

    # ------------------------------------------------------------------------------- forward
    def _check_layer(self, layer) -> None:
        if layer.layer_id in self._checked_layers:
            return
        problems = upstream.unsupported_layer_features(layer)   # raises if the layer lacks an attribute of 0.5.23
        if problems:
            raise NotImplementedError(f"--kv-pool diffkv does not support layer {layer.layer_id}: {', '.join(problems)}")
        self._checked_layers.add(layer.layer_id)

    def _run(self, wrapper, q, k, v, layer, forward_batch, save_kv_cache):
        self._check_layer(layer)
        local_layer = layer.layer_id - self.pool.start_layer
        if save_kv_cache and k is not None and v is not None:
            self.store.write_tokens(local_layer, forward_batch.out_cache_loc, k, v, rows=self._token_rows)
        q = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        out = wrapper.run(q, local_layer, sm_scale=layer.scaling)
        return out.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self._run(self._decode_planned, q, k, v, layer, forward_batch, save_kv_cache)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self._run(self.extend_wrapper, q, k, v, layer, forward_batch, save_kv_cache)

    def support_triton(self):
        return False
