"""Decode attention on the packed codes of sealed blocks, in torch: the decode path off CUDA.

:class:`CodeDecodePlan` is what :class:`~diffkv_sglang.attention.DecodeAttentionWrapper` runs when the store does
not use the Triton kernels (``DIFFKV_KERNELS=torch``, or ``auto`` off CUDA). Same contract as the kernel: for each
request ``b`` and KV head ``h`` the ``G = Hq / H`` query heads of the group attend over every kept token of the
request's pages with a float32 softmax, and every staged token's importance gets the group's largest probability
(``score_sum += max``, ``seen += 1``).

Sealed blocks are never dequantized into K/V. ``plan()`` (once per batch) enumerates, for every layer at once,
each tier's tokens of every (request, KV head) *row* of the batch (padded per layer to the longest row): the arena
offsets of their packed code rows, scale / zero rows and block meta scales; and the staged pages' blocks and
importance slots. ``run()`` (per layer) gathers those rows (one ``index_select`` per section and tier) for a *chunk*
of consecutive layers at once, as many as fit :data:`GATHER_CHUNK_BYTES`, unpacks the codes to float32 in their
row order (:func:`~diffkv_sglang.quant.unpack_codes_into`) with every tier one after another along the token
dimension, so that one product per layer covers every tier, then applies scale and zero point around the
products::

    logit = sigma * m * sum_j (s_j (q_j . c_j) + z_j sum(q_j))       out += m * sum_j ((p s_j) @ c_j + (p @ z_j))

for the ``J`` quantization groups ``j`` of a tier (``q_j``, ``c_j``: the group's columns; ``m``: the block's
power-of-two meta scale; a tier with fewer groups than the layer's most repeats its scale and zero). A tier with
per-channel keys has no per-token key scale and zero: its key codes are dequantized when unpacked, ``c * s + z``
elementwise with the ``[D]`` (scale, zero) of each token's block (the reference's float32 operations), and enter
the products with scale 1 and zero 0 (token-only formats skip this). Groups go into the M dimension of the
product (block ``j`` of the stacked query holds the query's group-``j`` columns), like the GPU kernel. At small
batches a chunk holds many layers: a layer's ``run`` is then a few dozen small torch ops, where each costs more in
dispatch than in arithmetic (one tier at a time with per-layer unpacking took about three hundred, and a
single-request decode step 1.4x longer at 512 tokens); at large batches a chunk is one layer, still in cache
when it is used. Buffers are reused from step to step (:class:`_Workspace`). Hadamard rotation: sealed keys see the
rotated query, sealed values are summed in the rotated space and rotated back once. Staged pages are read dense
from the arena at run time (the step's new token is written there between plan and run). Tokens of every tier and
the staged tokens share one softmax per row.

Arithmetic is float32 (codes < 256 are exact; products and sums as in the dense float32 reference, in another
order). Measured on the CI CPU (AMD EPYC with AVX-512 and AVX512-BF16, torch 2.13, 1 thread; ``q`` ``[24, 3, 64]``
against ``[24, 2048, 64]`` codes, medians of 15): converting uint8 codes costs 0.81 ms to float32 and 0.42 ms to
bfloat16, ``q . c`` 2.88 against 0.76 ms, ``p @ c`` 1.44 against 0.39 ms; float16 products have no fast CPU path
(7-318 ms). But torch's CPU ``bmm`` rounds bfloat16 results to bfloat16 (``out_dtype`` is not implemented on CPU),
a relative 2^-9 of ``q . c``, which the codes' offset makes much larger than the logit, so an error the
quantization does not bound; int8 ``_int_mm`` (0.33 ms for the same product) is 2-D only and needs a quantized
query. Float32 it is.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from .format import INDEX, KEY_META, KEYS, META_SCALE_BYTES, VALUE_META, VALUES
from .quant import gather_rows, rotate, unpack_codes_into, unrotate
from .format import PageState
from .store import CompressedKVStore

# the rows gathered per token, in the order of the format's kinds (position i holds kind i, so starts[:, KEYS] are
# the key codes), then the block's meta scales
_SECTIONS = (KEYS, VALUES, KEY_META, VALUE_META, INDEX + 1)
# Bytes of float32 codes, scales and zeros unpacked at once for a chunk of layers (_chunk_token_bytes per token).
# At small batches a chunk holds many layers, so a decode step costs a few dozen torch ops per layer plus a few
# per tier and chunk (each op costs more in dispatch than in arithmetic there); at large batches a chunk is one
# layer, still in cache when it is used. With 8 MiB: benchmarks/results/cpu-decode-one-product.json (other sizes
# not compared since the float32 unpacking moved into the chunk).
GATHER_CHUNK_BYTES = 8 << 20
# The most bytes of a chunk's (and the staged pages') buffers kept from one step to the next (_Workspace).
WORKSPACE_KEEP_BYTES = 64 << 20


def _chunk_token_bytes(head_dim: int, key_groups: int, value_groups: int) -> int:
    """Bytes :meth:`CodeDecodePlan._gather_chunk` holds per token: float32 key and value codes, a float32 scale
    and zero per key and value group, the float32 mask bias."""
    return 8 * head_dim + 8 * (key_groups + value_groups) + 4


@functools.lru_cache(maxsize=16)
def _group_masks(groups: int, dim: int, device: torch.device) -> torch.Tensor:
    """``[J, 1, D]`` float32: row ``j`` is 1 on quantization group ``j``'s columns, 0 elsewhere."""
    return torch.eye(groups, device=device).repeat_interleave(dim // groups, 1)[:, None, :]


@dataclasses.dataclass
class _LayerCodes:
    """One layer's sealed tokens, every tier, per (request, KV head) row ``r = b * H + h`` of the batch: the tiers
    one after another along ``M``, each padded to its longest row in the layer's chunk. ``Jk``, ``Jv``: the most
    key / value quantization groups of a tier of the layer's format; a tier with fewer repeats its scale and zero
    over the finer groups (groups are powers of two), so every tier shares one set of products.

    Attributes:
        keys, values: ``[R, M, D]`` float32 codes in the row's element order (the rotated space where the format
            rotates); the keys of a tier with per-channel keys dequantized (``code * scale + zero``, before the
            meta scale).
        key_scale, key_zero: ``[R, Jk, M]`` float32, times the block's key meta scale (0 on padding; 1 and 0
            for per-channel keys).
        value_scale, value_zero: ``[R, Jv, M]`` float32, times the value meta scale (0 on padding).
        bias: ``[R, 1, M]`` float32, 0 on a real, visible token and ``-inf`` on padding or beyond the request.
    """

    keys: torch.Tensor
    values: torch.Tensor
    key_scale: torch.Tensor
    key_zero: torch.Tensor
    value_scale: torch.Tensor
    value_zero: torch.Tensor
    bias: torch.Tensor


@dataclasses.dataclass
class _SealedRows:
    """Where one tier's tokens are for a group of layers with one block format (rows ``r = b * H + h``).

    Attributes:
        group: index of the layers' format group in ``store.format_groups``; fmt: its block format; tier: the tier.
        starts: ``[Lg, 5, R, W]`` int32 (int64 in arenas of 2 GiB and more) arena byte offsets of each token's rows
            (:data:`_SECTIONS`; 0 on padding). ``W``: the longest row over the group's layers.
        valid: ``[Lg, R, W]`` bool.
        widths: ``[Lg]`` the longest row of each layer (host ints).
    """

    group: int
    fmt: object
    tier: int
    starts: torch.Tensor
    valid: torch.Tensor
    widths: list[int]


@dataclasses.dataclass
class _StagedRows:
    """The batch's staged pages, ``S`` per request at most (padded), and their tokens, for every layer.

    Attributes:
        elements: ``[L, 2, B * S, H]`` int64 arena offsets (in store-dtype elements) of each staged block's keys,
            then values (0 where padding).
        token_valid: ``[R, S * P]`` bool, written and visible tokens, per (request, KV head) row.
        targets: ``[n, H]`` int64 index into a ``[R * S * P]`` row-major score of the visible staged tokens whose
            importance ``run`` adds.
        statistics: ``[L, 2 * n * H]`` int64 arena offsets (float32 elements) of those tokens' ``score_sum``, then
            their ``seen``.
        increments: ``[2 * n * H]`` float32 buffer for the values added there (``seen``'s half holds ones).
    """

    elements: torch.Tensor
    token_valid: torch.Tensor
    targets: torch.Tensor
    statistics: torch.Tensor
    increments: torch.Tensor


class _Workspace:
    """Float32 buffers reused from one decode step to the next, by name. A fresh large allocation pays its page
    faults on first touch (about 1.5 ms per chunk at batch 1 x 512 tokens, more than unpacking it); a buffer of more
    than ``keep_bytes`` is allocated for its use only, not kept."""

    def __init__(self, keep_bytes: int):
        self.keep_bytes = keep_bytes
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """An uninitialized float32 tensor of ``shape``; valid until ``name`` is taken again."""
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.device != device:
            buffer = torch.empty(numel, device=device)
            if 4 * numel <= self.keep_bytes:
                self._buffers[name] = buffer
        return buffer[:numel].view(shape)


class CodeDecodePlan:
    """Decode attention over a store's pages, reading sealed blocks' codes directly (see the module docstring).

    Args:
        store: the compressed store (its torch reference path).

    Example::

        plan = CodeDecodePlan(store)
        plan.plan(page_table, seq_lens)                 # once per batch: [B, C] pages, [B] lengths
        for layer in range(store.num_layers):
            store.write_tokens(layer, new_locs, k[layer], v[layer])
            out = plan.run(q[layer], layer)             # [B, Hq, D] float32
    """

    def __init__(self, store: CompressedKVStore):
        self.store = store
        self._batch = 0
        self._inputs: tuple | None = None                # (page_table, seq_lens) of the last plan()
        self._moves = 0                                  # store.arena.moves when the offsets were planned
        self._sealed: list[_SealedRows] = []             # per (format group, tier) with tokens
        self._chunk_of: list[tuple[int, int, int]] = []  # per layer: (format group, first, end position) of its chunk
        self._codes: dict[int, _LayerCodes | None] = {}  # the gathered chunk, per layer
        self._staged: _StagedRows | None = None
        self._workspace = _Workspace(WORKSPACE_KEEP_BYTES)

    # ------------------------------------------------------------------------------------------ plan
    def plan(self, page_table: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """Locate the batch's sealed tokens per layer and tier, and enumerate its staged pages (one host sync).

        Args:
            page_table: ``[B, C]`` int64 logical pages per request, in token order (padding columns ignored).
            seq_lens: ``[B]`` int64 tokens per request, the new one included (every key is visible to the query).

        The pages' states must not change before the batch's last ``run`` (SGLang seals before planning); blocks
        moved by a compaction are noticed by ``run`` (``store.arena.moves``), which plans again.
        """
        store = self.store
        device, page = store.device, store.page_size
        table, seq_lens = page_table.to(device, torch.int64), seq_lens.to(device, torch.int64)
        batch, cols = table.shape
        self._batch = batch
        self._inputs, self._moves, self._codes = (table, seq_lens), store.arena.moves, {}
        if batch == 0:
            return
        col = torch.arange(cols, device=device)
        in_use = col[None, :] < (seq_lens[:, None] + page - 1) // page                        # [B, C]
        state = store.page_state[table]
        sealed = in_use & (state == PageState.SEALED)
        staged = in_use & (state == PageState.STAGED)
        partial = sealed & ((col[None, :] + 1) * page > seq_lens[:, None])                    # rare: see _visible
        # [B, C, L, H, T] -> [L, B, H, C, T], zero outside sealed pages
        counts = (store.tier_counts[table] * sealed[:, :, None, None, None]).permute(2, 0, 3, 1, 4).to(torch.int64)
        per_row = counts.sum(3)                                                                 # [L, B, H, T]
        longest = per_row.reshape(store.num_layers, -1, counts.shape[-1]).amax(1)             # [L, T]
        num_tiers = counts.shape[-1]
        sizes = torch.cat([longest.reshape(-1), staged.sum(1).max().reshape(1), partial.any().reshape(1)])
        *longest, num_staged, any_partial = sizes.tolist()                                     # the host sync
        longest = [longest[layer * num_tiers:(layer + 1) * num_tiers] for layer in range(store.num_layers)]
        self._sealed = []
        for group, (fmt, layers) in enumerate(store.format_groups):
            self._plan_sealed(group, fmt, layers, table, seq_lens, counts[layers], longest, bool(any_partial))
        self._chunk_of = self._plan_chunks(batch * store.num_kv_heads)
        self._staged = self._plan_staged(table, seq_lens, staged, int(num_staged))

    def _plan_sealed(self, group, fmt, layers, table, seq_lens, counts, longest, any_partial) -> None:
        """Add to ``self._sealed`` the tiers of ``layers`` (format group ``group``, block format ``fmt``) that hold
        tokens; ``counts`` ``[Lg, B, H, C, T]``.

        Works per output position, not per token: position ``m`` of row ``r`` belongs to the column whose
        inclusive running count first exceeds ``m`` (a ``searchsorted``), at rank ``m`` minus the tokens of the
        row's earlier columns."""
        store = self.store
        device = store.device
        num_layers, batch, heads, cols, _ = counts.shape
        rows = batch * heads
        pages = table[None, :, None, :]
        layer_ids = layers.to(device)[:, None, None, None]
        heads_ids = torch.arange(heads, device=device)[None, None, :, None]
        offsets = store.arena.block_offset[(pages * store.num_layers + layer_ids) * heads + heads_ids]   # [Lg, B, H, C]
        # offsets fit int32 in any arena below 2 GiB: half the bytes to write here and to read in run()
        index_dtype = torch.int32 if store.arena.capacity_bytes < 2**31 else torch.int64
        # per block: arena offset of every section start, [Lg, B, H, C, 6, T]: the five kinds, then the meta scales
        meta_scales = fmt.meta_scale_start(counts)[..., None, None].expand(*counts.shape[:4], 1, counts.shape[-1])
        sections = (torch.cat([fmt.section_starts(counts), meta_scales], -2) + offsets[..., None, None]).to(index_dtype)
        layer_list = layers.tolist()
        for t in range(fmt.num_tiers):
            width = max(longest[layer][t] for layer in layer_list)
            if width == 0:
                continue
            n = counts[..., t].reshape(num_layers, rows, cols).to(index_dtype)
            before = torch.cumsum(n, -1, dtype=index_dtype)                                  # inclusive
            m = torch.arange(width, device=device, dtype=index_dtype).expand(num_layers, rows, width).contiguous()
            col = torch.searchsorted(before, m, right=True).clamp_max_(cols - 1)             # [Lg, R, width] int64
            valid = m < before[..., -1:]
            rank = m - (before - n).gather(-1, col)

            def section(kinds):                    # [Lg, len(kinds), R, width] arena offsets of the tokens' rows
                base = sections[..., kinds, t].reshape(num_layers, rows, cols, len(kinds)).permute(0, 3, 1, 2)
                out = base.gather(-1, col[:, None].expand(-1, len(kinds), -1, -1))
                row_bytes = torch.tensor([fmt.row_bytes(kind, t) if kind <= INDEX else 0 for kind in kinds],
                                         dtype=index_dtype, device=device)
                return out.add_(rank[:, None] * row_bytes[:, None, None])

            if any_partial:
                valid &= self._visible(section([INDEX])[:, 0], col, seq_lens, heads)
            starts = section(list(_SECTIONS)).masked_fill_(~valid[:, None], 0)                # [Lg, 5, R, width]
            self._sealed.append(_SealedRows(group, fmt, t, starts, valid, [longest[layer][t] for layer in layer_list]))

    def _plan_chunks(self, rows: int) -> list[tuple[int, int, int]]:
        """Split each format group's layers into runs of consecutive layers whose unpacked tokens (``rows`` rows per
        layer, every tier) stay within :data:`GATHER_CHUNK_BYTES`, one layer at least. Returns, per layer, its
        chunk ``(format group, first position, end position)`` (positions within the group's layers)."""
        chunk_of: list[tuple[int, int, int]] = [(0, 0, 0)] * self.store.num_layers
        for group, (fmt, layers) in enumerate(self.store.format_groups):
            layers = layers.tolist()
            token_bytes = _chunk_token_bytes(self.store.head_dim, *self._most_groups(fmt))
            entries = [rows_of for rows_of in self._sealed if rows_of.group == group]
            start, total = 0, 0
            for position in range(len(layers) + 1):
                nbytes = 0 if position == len(layers) else rows * token_bytes * sum(e.widths[position] for e in entries)
                if position == len(layers) or (position > start and total + nbytes > GATHER_CHUNK_BYTES):
                    for member in range(start, position):
                        chunk_of[layers[member]] = (group, start, position)
                    start, total = position, 0
                total += nbytes
        return chunk_of

    @staticmethod
    def _most_groups(fmt) -> tuple[int, int]:
        """``(Jk, Jv)``: the most key and value quantization groups of a tier of ``fmt``."""
        return (max(tier.spec.key_groups for tier in fmt.tiers), max(tier.spec.value_groups for tier in fmt.tiers))

    def _gather_chunk(self, group: int, first: int, end: int) -> dict[int, _LayerCodes | None]:
        """Gather and unpack the sealed tokens of the layers at positions ``[first, end)`` of format group
        ``group``: per layer its :class:`_LayerCodes` (views of one buffer per attribute), or None without any."""
        store = self.store
        fmt, layer_ids = store.format_groups[group]
        layers = layer_ids.tolist()[first:end]
        entries = [(rows_of, max(rows_of.widths[first:end])) for rows_of in self._sealed if rows_of.group == group]
        entries = [(rows_of, width) for rows_of, width in entries if width]
        if not entries:
            return dict.fromkeys(layers)
        data, device = store.arena.data, store.device
        key_groups, value_groups = self._most_groups(fmt)
        count, rows, dim = len(layers), self._batch * store.num_kv_heads, store.head_dim
        total = sum(width for _, width in entries)
        take = self._workspace.take
        keys, values = take("codes", (2, count, rows, total, dim), device)
        key_meta = take("key_meta", (2, count, rows, key_groups, total), device)             # scale, zero
        value_meta = take("value_meta", (2, count, rows, value_groups, total), device)
        bias = take("bias", (count, rows, 1, total), device).zero_()
        at = 0
        for rows_of, width in entries:
            tier, layout = rows_of.tier, fmt.tiers[rows_of.tier]
            spec = layout.spec
            starts, valid = rows_of.starts[first:end, ..., :width], rows_of.valid[first:end, :, :width]
            span = slice(at, at + width)
            unpack_codes_into(keys[:, :, span], gather_rows(data, starts[:, KEYS], fmt.row_bytes(KEYS, tier)),
                              spec.key_bits)
            unpack_codes_into(values[:, :, span], gather_rows(data, starts[:, VALUES], fmt.row_bytes(VALUES, tier)),
                              spec.value_bits)
            if layout.channel_keys:                 # keys dequantized here with their block's per-channel pairs
                self._dequantize_channels(keys[:, :, span], starts[:, KEY_META], valid, layout.fixed_bytes(KEY_META))
            meta_scales = gather_rows(data, starts[:, len(_SECTIONS) - 1], META_SCALE_BYTES).view(torch.float32)
            for meta, kind, groups, column in ((key_meta, KEY_META, spec.key_groups, 0),
                                               (value_meta, VALUE_META, spec.value_groups, 1)):
                if kind == KEY_META and layout.channel_keys:                                # scale 1, zero 0
                    pairs = meta_scales.new_tensor([1.0, 0.0]).expand(*valid.shape, 1, 2)
                else:
                    pairs = gather_rows(data, starts[:, kind], groups * 4).view(torch.float16).float()
                    pairs = pairs.reshape(*valid.shape, groups, 2)
                pairs = pairs * meta_scales[..., column, None, None]
                pairs = pairs.masked_fill_(~valid[..., None, None], 0.0)                     # [Lc, R, w, j, 2]
                # [2, Lc, R, J, w] with each of the tier's groups repeated over the J / j finer ones
                meta[..., span].unflatten(3, (groups, -1)).copy_(pairs.permute(4, 0, 1, 3, 2)[..., None, :])
            bias[:, :, 0, span].masked_fill_(~valid, -math.inf)
            at += width
        per_layer = zip(keys, values, *key_meta, *value_meta, bias)
        return {layer: _LayerCodes(*codes) for layer, codes in zip(layers, per_layer)}

    def _dequantize_channels(self, codes: torch.Tensor, meta_starts: torch.Tensor, valid: torch.Tensor,
                             meta_bytes: int) -> None:
        """Dequantize per-channel key ``codes`` ``[Lc, R, w, D]`` (float32, in place) to ``c * scale + zero`` with
        the (scale, zero) float16 pairs ``[D, 2]`` of each token's block at ``meta_starts`` ``[Lc, R, w]`` (the
        tier's key meta section: no per-token rows; ``meta_bytes`` bytes); 0 where not ``valid`` (padding points
        anywhere: any bits, NaN too)."""
        pairs = gather_rows(self.store.arena.data, meta_starts, meta_bytes).view(torch.float16)
        pairs = pairs.unflatten(-1, (codes.shape[-1], 2))                                     # [Lc, R, w, D, 2]
        codes.mul_(pairs[..., 0]).add_(pairs[..., 1]).masked_fill_(~valid[..., None], 0.0)

    def _visible(self, index_starts, col, seq_lens, heads) -> torch.Tensor:
        """``[Lg, R, width]`` bool: the tokens whose in-page index byte is at ``index_starts``, in page column
        ``col`` of row ``r = b * H + h``, lie before their request's length. Sealed pages do in every batch SGLang
        builds; a batch with one that does not (``any_partial``) is checked token by token."""
        data = self.store.arena.data                           # (padding positions point anywhere: clamped)
        in_page = gather_rows(data, index_starts.clamp(0, data.numel() - 1), 1)[..., 0]
        lengths = seq_lens.repeat_interleave(heads)[None, :, None]
        return col * self.store.page_size + in_page < lengths

    def _plan_staged(self, table, seq_lens, staged, num_staged) -> _StagedRows:
        store = self.store
        device, page, heads = store.device, store.page_size, store.num_kv_heads
        fmt = store.formats.staged
        batch, cols = table.shape
        b, c = staged.nonzero(as_tuple=True)
        rank = torch.cumsum(staged.to(torch.int64), 1)[b, c] - 1
        pages = torch.zeros(batch, num_staged, dtype=torch.int64, device=device)
        columns = torch.zeros_like(pages)
        page_valid = torch.zeros(batch, num_staged, dtype=torch.bool, device=device)
        pages[b, rank], columns[b, rank], page_valid[b, rank] = table[b, c], c, True
        offsets = store.arena.block_offset[store.slots(pages.reshape(-1))].permute(1, 0, 2)  # [L, B*S, H] bytes
        keys = fmt.key_elements(torch.where(page_valid.reshape(1, -1, 1), offsets, 0))
        elements = torch.stack([keys, keys + fmt.values_elements], 1)
        in_page = torch.arange(page, device=device)
        positions = (columns[:, :, None] * page + in_page).reshape(batch, -1)                 # [B, S*P]
        token_valid = page_valid.repeat_interleave(page, 1) & (positions < seq_lens[:, None])
        target_b, target_t = token_valid.nonzero(as_tuple=True)
        target_page = target_t // page
        head_ids = torch.arange(heads, device=device)
        targets = ((target_b[:, None] * heads + head_ids) * token_valid.shape[1] + target_t[:, None])   # [n, H]
        at = offsets.unflatten(1, (batch, num_staged))[:, target_b, target_page]           # [L, n, H] bytes
        in_page_t = (target_t % page)[None, :, None]
        statistics = torch.stack([fmt.score_index(at, in_page_t), fmt.seen_index(at, in_page_t)], 1)
        increments = torch.ones(2 * targets.numel(), device=device)
        return _StagedRows(elements, token_valid.repeat_interleave(heads, 0), targets,
                           statistics.reshape(store.num_layers, -1), increments)

    # ------------------------------------------------------------------------------------------- run
    def run(self, q: torch.Tensor, layer: int, sm_scale: float) -> torch.Tensor:
        """``q`` ``[B, Hq, D]`` -> float32 ``[B, Hq, D]``; adds the staged tokens' importance in ``layer``."""
        store = self.store
        batch, num_q_heads, dim = q.shape
        if self._batch == 0:
            return q.new_zeros(q.shape, dtype=torch.float32)
        heads = store.num_kv_heads
        rows, group = batch * heads, num_q_heads // heads
        fmt = store.formats[layer]
        query = q.float().reshape(rows, group, dim) * sm_scale                                  # [R, G, D]
        if store.arena.moves != self._moves:                 # a compaction moved blocks since plan()
            self.plan(*self._inputs)
        staged_keys, staged_values = self._staged_kv(layer, rows, dim)                         # [R, S*P, D]
        logits = [torch.bmm(query, staged_keys.transpose(1, 2)).masked_fill_(~self._staged.token_valid[:, None],
                                                                               -math.inf)]
        codes = self._layer_codes(layer)
        if codes is not None:
            logits.insert(0, self._sealed_logits(rotate(query, fmt.key_rotation), codes))
        probs = torch.nan_to_num(torch.softmax(torch.cat(logits, -1), -1), nan=0.0)           # no key: zeros
        probs = probs.split([x.shape[-1] for x in logits], -1)
        out = torch.bmm(probs[-1], staged_values)
        if codes is not None:
            out += unrotate(self._sealed_values(probs[0], codes), fmt.value_rotation)
        self._store_importance(layer, probs[-1])
        return out.reshape(batch, num_q_heads, dim)

    def _layer_codes(self, layer: int) -> _LayerCodes | None:
        """``layer``'s sealed tokens, gathered with the rest of its chunk on first use; None if it has none."""
        if layer not in self._codes:
            self._codes = self._gather_chunk(*self._chunk_of[layer])
        return self._codes[layer]

    @staticmethod
    def _sealed_logits(query: torch.Tensor, codes: _LayerCodes) -> torch.Tensor:
        """``[R, G, M]`` scaled logits of the sealed tokens (``-inf`` on padding) for ``query`` ``[R, G, D]``:
        ``sum_j s_j (q_j . c_j) + z_j sum(q_j)``, the ``J`` groups stacked in the M dimension of one product
        (block ``j`` of the stacked query keeps only group ``j``'s columns)."""
        rows, group, dim = query.shape
        groups = codes.key_scale.shape[1]
        sums = query.reshape(rows, group, groups, dim // groups).sum(-1)                       # [R, G, J]
        if groups == 1:                                       # the common case, in fewer ops: s (q . c) + z sum(q)
            dots = torch.bmm(query, codes.keys.transpose(1, 2))
            return torch.addcmul(dots.mul_(codes.key_scale), sums, codes.key_zero).add_(codes.bias)
        stacked = (query[:, None] * _group_masks(groups, dim, query.device)).reshape(rows, groups * group, dim)
        dots = torch.bmm(stacked, codes.keys.transpose(1, 2)).view(rows, groups, group, -1)
        logits = (dots * codes.key_scale[:, :, None]).sum(1)
        return logits.add_(torch.bmm(sums, codes.key_zero)).add_(codes.bias)

    @staticmethod
    def _sealed_values(probs: torch.Tensor, codes: _LayerCodes) -> torch.Tensor:
        """``[R, G, D]`` the sealed tokens' share of the output (rotated space) for their probabilities
        ``[R, G, M]``: ``sum_j (p s_j) @ c_j + p @ z_j`` on group ``j``'s columns."""
        rows, group, width = probs.shape
        groups, dim = codes.value_scale.shape[1], codes.values.shape[-1]
        weights = (probs[:, None] * codes.value_scale[:, :, None]).reshape(rows, groups * group, width)
        out = torch.bmm(weights, codes.values)                                                  # [R, J*G, D]
        zeros = torch.bmm(probs, codes.value_zero.transpose(1, 2))                             # [R, G, J]
        if groups == 1:
            return out.add_(zeros)
        out = (out.view(rows, groups, group, dim) * _group_masks(groups, dim, probs.device)).sum(1)
        return out.add_(zeros.repeat_interleave(dim // groups, -1))

    def _staged_kv(self, layer: int, rows: int, dim: int) -> torch.Tensor:
        """Keys and values ``[2, R, S * P, D]`` float32 of the staged pages (values 0 where unwritten or padding;
        keys there are any bits, masked in the logits)."""
        store, staged = self.store, self._staged
        batch = self._batch
        _, blocks, heads = staged.elements.shape[1:]
        data = store.arena.data.view(store.dtype)
        kv = gather_rows(data, staged.elements[layer], store.page_size * dim)                 # [2, B*S, H, P*D]
        kv = kv.view(2, batch, blocks // batch, heads, store.page_size, dim).transpose(2, 3)
        out = self._workspace.take("staged", (2, rows, staged.token_valid.shape[1], dim), store.device)
        out.view(kv.shape).copy_(kv)
        out[1].masked_fill_(~staged.token_valid[..., None], 0.0)                  # unwritten slots: any bits, NaN
        return out

    def _store_importance(self, layer: int, probs: torch.Tensor) -> None:
        """Add the group's largest probability ``probs`` ``[R, G, S*P]`` to each visible staged token's
        ``score_sum`` and one to its ``seen``."""
        staged = self._staged
        if staged.targets.numel() == 0:
            return
        increments = staged.increments
        increments[:staged.targets.numel()] = probs.amax(1).view(-1)[staged.targets.view(-1)]
        self.store.arena.data.view(torch.float32).index_put_((staged.statistics[layer],), increments, accumulate=True)
