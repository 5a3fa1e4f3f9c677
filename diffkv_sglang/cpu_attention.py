"""Decode attention on the packed codes of sealed blocks, in torch: the decode path off CUDA.

:class:`CodeDecodePlan` is what :class:`~diffkv_sglang.attention.DecodeAttentionWrapper` runs when the store does
not use the Triton kernels (``DIFFKV_KERNELS=torch``, or ``auto`` off CUDA). Same contract as the kernel: for each
request ``b`` and KV head ``h`` the ``G = Hq / H`` query heads of the group attend over every kept token of the
request's pages with a float32 softmax, and every staged token's importance gets the group's largest probability
(``score_sum += max``, ``seen += 1``).

Sealed blocks are never dequantized into a page-shaped copy. ``plan()`` (once per batch) enumerates, for every
layer at once, each tier's tokens of every (request, KV head) *row* of the batch (padded per layer to the longest
row): the arena offsets of their packed code rows, scale / zero rows and block meta scales. ``run()`` (per layer)
gathers those rows (one ``index_select`` per section and tier) for a *chunk* of consecutive layers at once, as many
as fit :data:`GATHER_CHUNK_BYTES` (all of them at small batches, where a torch op costs more in dispatch than in
arithmetic and a layer's ``run`` is about a hundred small ops; one at large batches, so that what is gathered is
still in cache when it is used), then applies scale and zero point around the products::

    logit = sigma * m * sum_j (s_j (q_j . c_j) + z_j sum(q_j))       out += m * sum_j ((p s_j) @ c_j + (p @ z_j))

for the ``J`` quantization groups ``j`` of a tier (``q_j``, ``c_j``: the group's columns; ``m``: the block's
power-of-two meta scale). Groups go into the M dimension of one batched product per tier (block ``j`` of the
stacked query holds the query's group-``j`` columns), like the GPU kernel. Codes are unpacked plane-major
(:func:`~diffkv_sglang.quant.unpack_code_planes`), and the query's (and output's) columns are permuted to match,
which is cheaper than interleaving the codes. Hadamard rotation: sealed keys see the rotated query, sealed values
are summed in the rotated space and rotated back once. Staged pages are read dense from the arena at run time
(the step's new token is written there between plan and run). Tokens of every tier and the staged tokens share
one softmax per row.

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
import math

import torch

from .format import INDEX, KEY_META, KEYS, META_SCALE_BYTES, VALUE_META, VALUES
from .quant import code_plane_order, gather_rows, rotate, unpack_code_planes, unrotate
from .format import PageState
from .store import CompressedKVStore

# the rows gathered per token, in the order of the format's kinds (position i holds kind i, so starts[:, KEYS] are
# the key codes), then the block's meta scales
_SECTIONS = (KEYS, VALUES, KEY_META, VALUE_META, INDEX + 1)
# Bytes gathered at once for a chunk of layers. Gathering all 30 layers of the SmolLM2 shape at once made a decode step
# 1.45x faster than per-layer gathers at batch 1 x 512 tokens but 0.83x at batch 8 x 2048 (about 3.6 MB per layer);
# with 4 MiB chunks: 1.42x / 1.10x / 1.30x / 1.00x at 1 x 512, 1 x 2048, 8 x 512, 8 x 2048
# (benchmarks/results/cpu-decode-chunks.json).
GATHER_CHUNK_BYTES = 4 << 20


def _gathered_row_bytes(fmt, tier: int) -> int:
    """Bytes :meth:`CodeDecodePlan._gather_tier` produces per token of ``tier``: its code rows, float32 scale and
    zero per group for keys and values, the block's two meta scales."""
    spec = fmt.tiers[tier].spec
    return fmt.row_bytes(KEYS, tier) + fmt.row_bytes(VALUES, tier) + 8 * (spec.key_groups + spec.value_groups) + 8


@dataclasses.dataclass
class _TierCodes:
    """One tier's tokens of one layer, gathered from the arena with the rest of its chunk, per (request, KV head)
    row ``r = b * H + h`` of the batch, padded to the layer's longest row ``M`` (``J``: the tier's quantization groups for keys or values).

    Attributes:
        key_codes, value_codes: ``[R, M, D * bits / 8]`` uint8 packed codes, as stored.
        key_scale, key_zero: ``[R, J, M]`` float32, times the block's key meta scale (0 on padding).
        value_scale: ``[R, J, M]``, value_zero ``[R, M, J]`` float32, times the value meta scale (0 on padding).
        valid: ``[R, M]`` bool, a real, visible token (False: padding, or beyond the request's length).
    """

    key_codes: torch.Tensor
    value_codes: torch.Tensor
    key_scale: torch.Tensor
    key_zero: torch.Tensor
    value_scale: torch.Tensor
    value_zero: torch.Tensor
    valid: torch.Tensor

    def layer(self, index: int, width: int) -> _TierCodes:
        """Layer ``index`` of codes gathered for several layers at once (a leading layer dimension), its rows cut
        to ``width`` tokens (views)."""
        cut = {name: getattr(self, name)[index] for name in self.__dataclass_fields__}
        last = ("key_scale", "key_zero", "value_scale")                   # [R, J, M]: tokens in the last dim
        return _TierCodes(**{name: x[..., :width] if name in last else x[:, :width] for name, x in cut.items()})


@dataclasses.dataclass
class _SealedRows:
    """Where one tier's tokens are for a group of layers with one block format (see :class:`_TierCodes`).

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
    """The batch's staged pages, ``S`` per request at most (padded), and their tokens.

    Attributes:
        pages: ``[B, S]`` int64 logical pages (0 where padding); page_valid ``[B, S]`` bool.
        token_valid: ``[R, S * P]`` bool, written and visible tokens, per (request, KV head) row.
        target_b, target_t: ``[n]`` int64 (request, staged-token column) of the tokens whose importance ``run``
            adds; target_locs ``[n]`` int64 their logical slots.
    """

    pages: torch.Tensor
    page_valid: torch.Tensor
    token_valid: torch.Tensor
    target_b: torch.Tensor
    target_t: torch.Tensor
    target_locs: torch.Tensor


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
        self._codes: dict[int, list] = {}                # the gathered chunk: layer -> [(tier, _TierCodes)]
        self._staged: _StagedRows | None = None

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
        """Split each format group's layers into runs of consecutive layers whose gathered rows (``rows`` rows per
        layer, every tier) stay within :data:`GATHER_CHUNK_BYTES`, one layer at least. Returns, per layer, its
        chunk ``(format group, first position, end position)`` (positions within the group's layers)."""
        chunk_of: list[tuple[int, int, int]] = [(0, 0, 0)] * self.store.num_layers
        for group, (_, layers) in enumerate(self.store.format_groups):
            layers = layers.tolist()
            entries = [rows_of for rows_of in self._sealed if rows_of.group == group]
            start, total = 0, 0
            for position in range(len(layers) + 1):
                nbytes = 0 if position == len(layers) else sum(
                    rows * e.widths[position] * _gathered_row_bytes(e.fmt, e.tier) for e in entries)
                if position == len(layers) or (position > start and total + nbytes > GATHER_CHUNK_BYTES):
                    for member in range(start, position):
                        chunk_of[layers[member]] = (group, start, position)
                    start, total = position, 0
                total += nbytes
        return chunk_of

    def _gather_chunk(self, group: int, first: int, end: int) -> dict[int, list[tuple[int, _TierCodes]]]:
        """Gather the rows of the layers at positions ``[first, end)`` of format group ``group``: per layer, its
        tiers with tokens as ``(tier, codes)``."""
        layers = self.store.format_groups[group][1].tolist()
        out = {layers[position]: [] for position in range(first, end)}
        for rows_of in self._sealed:
            width = max(rows_of.widths[first:end]) if rows_of.group == group else 0
            if width == 0:
                continue
            codes = self._gather_tier(rows_of.fmt, rows_of.tier, rows_of.starts[first:end, ..., :width],
                                      rows_of.valid[first:end, :, :width])
            for position in range(first, end):
                if rows_of.widths[position]:
                    out[layers[position]].append((rows_of.tier, codes.layer(position - first,
                                                                            rows_of.widths[position])))
        return out

    def _gather_tier(self, fmt, tier: int, starts: torch.Tensor, valid: torch.Tensor) -> _TierCodes:
        """The rows at ``starts`` ``[Lg, 5, R, M]`` (:data:`_SECTIONS`) of one tier for ``Lg`` layers at once: a
        :class:`_TierCodes` with a leading layer dimension (scales and zeros times the meta scales, 0 where
        ``valid`` ``[Lg, R, M]`` is False)."""
        data, spec = self.store.arena.data, fmt.tiers[tier].spec
        meta_scales = gather_rows(data, starts[:, len(_SECTIONS) - 1], META_SCALE_BYTES).view(torch.float32)
        meta = {}
        for name, kind, groups, column in (("key", KEY_META, spec.key_groups, 0),
                                           ("value", VALUE_META, spec.value_groups, 1)):
            pairs = gather_rows(data, starts[:, kind], groups * 4).view(torch.float16).float()
            pairs = pairs.reshape(*valid.shape, groups, 2) * meta_scales[..., column, None, None]
            pairs = pairs.masked_fill_(~valid[..., None, None], 0.0)
            meta[name] = pairs[..., 0].transpose(-1, -2).contiguous(), pairs[..., 1]      # [Lg, R, J, M], [Lg, R, M, J]
        return _TierCodes(key_codes=gather_rows(data, starts[:, KEYS], fmt.row_bytes(KEYS, tier)),
                          value_codes=gather_rows(data, starts[:, VALUES], fmt.row_bytes(VALUES, tier)),
                          key_scale=meta["key"][0], key_zero=meta["key"][1].transpose(-1, -2).contiguous(),
                          value_scale=meta["value"][0], value_zero=meta["value"][1], valid=valid)

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
        device, page = store.device, store.page_size
        batch, cols = table.shape
        b, c = staged.nonzero(as_tuple=True)
        rank = torch.cumsum(staged.to(torch.int64), 1)[b, c] - 1
        pages = torch.zeros(batch, num_staged, dtype=torch.int64, device=device)
        columns = torch.zeros_like(pages)
        page_valid = torch.zeros(batch, num_staged, dtype=torch.bool, device=device)
        pages[b, rank], columns[b, rank], page_valid[b, rank] = table[b, c], c, True
        in_page = torch.arange(page, device=device)
        positions = (columns[:, :, None] * page + in_page).reshape(batch, -1)                 # [B, S*P]
        token_valid = page_valid.repeat_interleave(page, 1) & (positions < seq_lens[:, None])
        target_b, target_t = token_valid.nonzero(as_tuple=True)
        locs = (pages[:, :, None] * page + in_page).reshape(batch, -1)[target_b, target_t]
        return _StagedRows(pages, page_valid, token_valid.repeat_interleave(store.num_kv_heads, 0), target_b, target_t,
                           locs)

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
        q_keys = rotate(query, fmt.key_rotation)
        tiers = [(fmt.tiers[t].spec, codes) for t, codes in self._layer_codes(layer)]
        logits = [self._tier_logits(spec, q_keys, codes) for spec, codes in tiers]
        staged_keys, staged_values = self._staged_kv(layer, rows, dim)                         # [R, S*P, D]
        staged_valid = self._staged.token_valid
        logits.append(torch.bmm(query, staged_keys.transpose(1, 2)).masked_fill(~staged_valid[:, None], -math.inf))
        probs = torch.nan_to_num(torch.softmax(torch.cat(logits, -1), -1), nan=0.0)           # no key: zeros
        probs = probs.split([x.shape[-1] for x in logits], -1)
        sealed = sum((self._tier_values(spec, p, codes) for (spec, codes), p in zip(tiers, probs)),
                     torch.zeros_like(query))
        out = unrotate(sealed, fmt.value_rotation) + torch.bmm(probs[-1], staged_values)
        self._store_importance(layer, probs[-1], heads, group)
        return out.reshape(batch, num_q_heads, dim)

    def _layer_codes(self, layer: int) -> list[tuple[int, _TierCodes]]:
        """``layer``'s tiers with tokens, gathered with the rest of its chunk on first use (after planning again
        if a compaction moved blocks since ``plan``)."""
        if layer not in self._codes:
            if self.store.arena.moves != self._moves:
                self.plan(*self._inputs)
            self._codes = self._gather_chunk(*self._chunk_of[layer])
        return self._codes[layer]

    def _tier_logits(self, spec, query: torch.Tensor, codes: _TierCodes) -> torch.Tensor:
        """``[R, G, M]`` scaled logits of one tier's tokens (``-inf`` on padding) for ``query`` ``[R, G, D]``."""
        num_rows, group, dim = query.shape
        groups = spec.key_groups
        per_group = query.reshape(num_rows, group, groups, dim // groups)
        if groups == 1:
            stacked = query
        else:                                                                                   # [R, J, G, J, D/J]
            stacked = torch.diag_embed(per_group.transpose(2, 3)).permute(0, 3, 1, 4, 2).reshape(num_rows, -1, dim)
        if spec.key_bits != 8:
            stacked = stacked[..., code_plane_order(dim, spec.key_bits, query.device)]
        key_codes = unpack_code_planes(codes.key_codes, spec.key_bits).float()                # [R, M, D] planes
        dots = torch.bmm(stacked, key_codes.transpose(1, 2)).reshape(num_rows, groups, group, -1)  # [R, J, G, M]
        logits = (dots * codes.key_scale[:, :, None]).sum(1) + torch.bmm(per_group.sum(-1), codes.key_zero)
        return logits.masked_fill(~codes.valid[:, None], -math.inf)

    def _tier_values(self, spec, probs: torch.Tensor, codes: _TierCodes) -> torch.Tensor:
        """``[R, G, D]`` one tier's share of the output (rotated space) for its probabilities ``[R, G, M]``."""
        num_rows, group, _ = probs.shape
        groups, dim = spec.value_groups, self.store.head_dim
        value_codes = unpack_code_planes(codes.value_codes, spec.value_bits).float()          # [R, M, D] planes
        weights = probs[:, None] * codes.value_scale[:, :, None]                              # [R, J, G, M]
        out = torch.bmm(weights.reshape(num_rows, groups * group, -1), value_codes)           # [R, J*G, D] planes
        if spec.value_bits != 8:                                                                # model column order
            out = torch.empty_like(out).index_copy_(2, code_plane_order(dim, spec.value_bits, probs.device), out)
        out = out.reshape(num_rows, groups, group, groups, dim // groups).diagonal(dim1=1, dim2=3)
        out = out.permute(0, 1, 3, 2) + torch.bmm(probs, codes.value_zero)[..., None]         # [R, G, J, D/J]
        return out.reshape(num_rows, group, dim)

    def _staged_kv(self, layer: int, rows: int, dim: int):
        """Keys and values ``[R, S * P, D]`` float32 of the staged pages (zeros where unwritten or padding)."""
        store, staged = self.store, self._staged
        fmt = store.formats.staged
        offsets = store.arena.block_offset[store.slots(staged.pages.reshape(-1), layer)]       # [B*S, H]
        elements = torch.where(staged.page_valid.reshape(-1, 1), offsets, 0) // fmt.element_bytes
        data = store.arena.data.view(store.dtype)
        width = store.page_size * dim
        batch, num_pages = staged.pages.shape
        out = []
        for start in (0, fmt.values_start // fmt.element_bytes):
            x = gather_rows(data, elements + start, width)                                     # [B*S, H, P*D]
            x = x.reshape(batch, num_pages, store.num_kv_heads, store.page_size, dim).permute(0, 2, 1, 3, 4).reshape(rows, -1, dim)
            out.append(x.float().masked_fill(~staged.token_valid[..., None], 0.0))   # unwritten slots: any bits, NaN
        return out

    def _store_importance(self, layer: int, probs: torch.Tensor, heads: int, group: int) -> None:
        """Add the group's largest probability ``probs`` ``[R, G, S*P]`` to each staged token (``seen += 1``)."""
        staged = self._staged
        if staged.target_b.numel() == 0:
            return
        score = probs.amax(1).reshape(self._batch, heads, -1)                                  # [B, H, S*P]
        score = score[staged.target_b, :, staged.target_t]                                     # [n, H]
        self.store.add_importance(layer, staged.target_locs, score, torch.ones_like(score[:, 0]), accumulate=True)
