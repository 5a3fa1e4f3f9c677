"""Decode attention on the packed codes of sealed blocks, in torch: the decode path off CUDA.

:class:`CodeDecodePlan` is what :class:`~diffkv_sglang.attention.DecodeAttentionWrapper` runs when the store does
not use the Triton kernels (``DIFFKV_KERNELS=torch``, or ``auto`` off CUDA). Same contract as the kernel: for each
request ``b`` and KV head ``h`` the ``G = Hq / H`` query heads of the group attend over every kept token of the
request's pages with a float32 softmax, and every staged token's importance gets the group's largest probability
(``score_sum += max``, ``seen += 1``).

Sealed blocks are never dequantized into a page-shaped copy. ``plan()`` (once per batch) enumerates, for every
layer at once, each tier's tokens of every (request, KV head) *row* of the batch: the token's block (its arena
slot) and the byte offset of each of its rows inside the block (key codes, value codes, key (scale, zero), value
(scale, zero), the block's meta scales), padded per layer to the longest row. ``run()`` (per layer) adds the
blocks' current arena offsets (so a compaction between plan and run is harmless), gathers the packed rows
(one ``index_select`` per section and tier) and applies scale and zero point around the products::

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
order). Measured on the CI CPU (AVX-512 with bf16, 1 thread, ``benchmarks/cpu_decode.py``'s shapes): bfloat16
products are about 2x faster than float32 ones, but torch's CPU ``bmm`` rounds bfloat16 results to bfloat16
(there is no float32-output variant on CPU), a relative 2^-9 of ``q . c`` rather than of the logit, so an error
the quantization does not already bound; int8 ``_int_mm`` would need a quantized query. Float32 it is.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .format import INDEX, KEY_META, KEYS, META_SCALE_BYTES, VALUE_META, VALUES
from .quant import code_plane_order, gather_rows, rotate, unpack_code_planes, unrotate
from .store import CompressedKVStore, PageState

_META_SCALE = 4          # row of _TierRows.inblock holding the offset of the block's meta scales


@dataclasses.dataclass
class _TierRows:
    """Where one tier's tokens of one layer are, per (request, KV head) row ``r = b * H + h`` of the batch.

    Attributes:
        slot: ``[R, M]`` int64 arena slot of the token's block (0 where padding).
        valid: ``[R, M]`` bool, a real, visible token (False: padding, or beyond the request's length).
        inblock: ``[5, R, M]`` int64 byte offsets inside the block of the token's key codes, value codes, key meta,
            value meta rows and of the block's meta scales (0 where padding).
    """

    slot: torch.Tensor
    valid: torch.Tensor
    inblock: torch.Tensor


@dataclasses.dataclass
class _StagedRows:
    """The batch's staged pages, ``S`` per request at most (padded), and their tokens.

    Attributes:
        pages: ``[B, S]`` int64 logical pages (0 where padding); page_valid ``[B, S]`` bool.
        token_valid: ``[B, S * P]`` bool, written and visible tokens.
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
        self._tiers: list[list[_TierRows]] = []          # per layer, per tier (None where the tier is empty)
        self._staged: _StagedRows | None = None

    # ------------------------------------------------------------------------------------------ plan
    def plan(self, page_table: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """Enumerate the batch's sealed tokens per layer and tier, and its staged pages (one host sync).

        Args:
            page_table: ``[B, C]`` int64 logical pages per request, in token order (padding columns ignored).
            seq_lens: ``[B]`` int64 tokens per request, the new one included (every key is visible to the query).
        """
        store = self.store
        device, page = store.device, store.page_size
        table, seq_lens = page_table.to(device, torch.int64), seq_lens.to(device, torch.int64)
        batch, cols = table.shape
        self._batch = batch
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
        self._tiers = [[None] * num_tiers for _ in range(store.num_layers)]
        for fmt, layers in store.format_groups:
            self._plan_sealed(fmt, layers, table, seq_lens, counts[layers], longest, bool(any_partial))
        self._staged = self._plan_staged(table, seq_lens, staged, int(num_staged))

    def _plan_sealed(self, fmt, layers, table, seq_lens, counts, longest, any_partial) -> None:
        """Fill ``self._tiers`` for ``layers`` (one block format); ``counts`` ``[Lg, B, H, C, T]``."""
        store = self.store
        device = store.device
        num_layers, batch, heads, cols, _ = counts.shape
        rows = batch * heads
        sections = fmt.section_starts(counts)                                                   # [Lg, B, H, C, 5, T]
        meta_scales = fmt.meta_scale_start(counts)                                              # [Lg, B, H, C]
        pages = table[None, :, None, :]
        layer_ids = layers.to(device)[:, None, None, None]
        heads_ids = torch.arange(heads, device=device)[None, None, :, None]
        slots = ((pages * store.num_layers + layer_ids) * heads + heads_ids).reshape(-1)       # [Lg*B*H*C]
        layer_list = layers.tolist()
        for t in range(fmt.num_tiers):
            width = max(longest[layer][t] for layer in layer_list)
            if width == 0:
                continue
            n = counts[..., t].reshape(-1)
            block = torch.repeat_interleave(torch.arange(n.numel(), device=device), n)         # token -> block
            token = torch.arange(block.numel(), device=device)
            rank = token - (torch.cumsum(n, 0) - n)[block]
            per_row = counts[..., t].sum(-1).reshape(-1)                                        # [Lg*R]
            row = block // cols
            pos = token - (torch.cumsum(per_row, 0) - per_row)[row]
            where = row * width + pos
            inblock = torch.stack(
                [sections[..., kind, t].reshape(-1)[block] + rank * fmt.row_bytes(kind, t)
                 for kind in (KEYS, VALUES, KEY_META, VALUE_META)] + [meta_scales.reshape(-1)[block]])

            def padded(x: torch.Tensor) -> torch.Tensor:      # [..., n] per token -> [Lg, R, width, ...], zeros
                out = torch.zeros(num_layers * rows * width, *x.shape[:-1], dtype=x.dtype, device=device)
                return out.index_put_((where,), x.movedim(-1, 0)).reshape(num_layers, rows, width, *x.shape[:-1])

            slot = padded(slots[block])
            inblock = padded(inblock).permute(0, 3, 1, 2)                                       # [Lg, 5, R, width]
            valid = padded(self._visible(t, block, rank, sections, slots, seq_lens, any_partial))
            for i, layer in enumerate(layer_list):
                m = longest[layer][t]
                if m:
                    self._tiers[layer][t] = _TierRows(slot[i, :, :m], valid[i, :, :m], inblock[i, :, :, :m])

    def _visible(self, t, block, rank, sections, slots, seq_lens, any_partial) -> torch.Tensor:
        """``[n]`` bool: the tier-``t`` tokens ``block``/``rank`` are before their request's length. Sealed pages
        lie before the length in every batch SGLang builds; a page that does not (``any_partial``) is checked
        token by token through the in-page index stored in its block."""
        if not any_partial:
            return torch.ones_like(block, dtype=torch.bool)
        _, batch, heads, cols = sections.shape[:4]
        index_start = self.store.arena.block_offset[slots[block]] + sections[..., INDEX, t].reshape(-1)[block]
        in_page = gather_rows(self.store.arena.data, index_start + rank, 1)[:, 0].to(torch.int64)
        b = block // (heads * cols) % batch
        return (block % cols) * self.store.page_size + in_page < seq_lens[b]

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
        return _StagedRows(pages, page_valid, token_valid, target_b, target_t, locs)

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
        tiers = [(t, rows_t) for t, rows_t in enumerate(self._tiers[layer]) if rows_t is not None]
        bases = [torch.where(r.valid, store.arena.block_offset[r.slot], 0) for _, r in tiers]
        logits = [self._tier_logits(fmt.tiers[t].spec, q_keys, r, base) for (t, r), base in zip(tiers, bases)]
        staged_keys, staged_values = self._staged_kv(layer, rows, dim)                         # [R, S*P, D]
        staged_valid = self._staged.token_valid.repeat_interleave(heads, 0)                   # [R, S*P]
        logits.append(torch.bmm(query, staged_keys.transpose(1, 2)).masked_fill(~staged_valid[:, None], -math.inf))
        probs = torch.nan_to_num(torch.softmax(torch.cat(logits, -1), -1), nan=0.0)           # no key: zeros
        probs = probs.split([x.shape[-1] for x in logits], -1)
        sealed = sum((self._tier_values(fmt.tiers[t].spec, p, r, base)
                      for (t, r), base, p in zip(tiers, bases, probs)), torch.zeros_like(query))
        out = unrotate(sealed, fmt.value_rotation) + torch.bmm(probs[-1], staged_values)
        self._store_importance(layer, probs[-1], heads, group)
        return out.reshape(batch, num_q_heads, dim)

    def _meta(self, rows: _TierRows, base: torch.Tensor, kind: int, groups: int, scale_col: int):
        """Scale and zero ``[R, M, J]`` float32 of each token's groups, times the block's meta scale (0 on padding)."""
        data = self.store.arena.data
        pairs = gather_rows(data, base + rows.inblock[kind], groups * 4).view(torch.float16).float()
        meta = gather_rows(data, base + rows.inblock[_META_SCALE], META_SCALE_BYTES).view(torch.float32)
        pairs = pairs.reshape(*base.shape, groups, 2) * meta[..., scale_col, None, None]
        pairs = pairs.masked_fill(~rows.valid[..., None, None], 0.0)
        return pairs[..., 0], pairs[..., 1]

    def _codes(self, rows: _TierRows, base: torch.Tensor, kind: int, bits: int) -> torch.Tensor:
        """``[R, M, D]`` float32 codes in plane-major column order."""
        row_bytes = self.store.head_dim * bits // 8
        return unpack_code_planes(gather_rows(self.store.arena.data, base + rows.inblock[kind], row_bytes), bits).float()

    def _tier_logits(self, spec, query, rows, base) -> torch.Tensor:
        """``[R, G, M]`` scaled logits of one tier's tokens (``-inf`` on padding) for ``query`` ``[R, G, D]``."""
        num_rows, group, dim = query.shape
        groups = spec.key_groups
        scale, zero = self._meta(rows, base, KEY_META, groups, 0)                             # [R, M, J]
        codes = self._codes(rows, base, KEYS, spec.key_bits)                                   # [R, M, D]
        per_group = query.reshape(num_rows, group, groups, dim // groups)
        stacked = torch.diag_embed(per_group.transpose(2, 3)).permute(0, 3, 1, 4, 2)          # [R, J, G, J, D/J]
        order = code_plane_order(dim, spec.key_bits, query.device)
        stacked = stacked.reshape(num_rows, groups * group, dim)[..., order]
        dots = torch.bmm(stacked, codes.transpose(1, 2)).reshape(num_rows, groups, group, -1)  # [R, J, G, M]
        logits = (dots * scale.transpose(1, 2)[:, :, None]).sum(1) + torch.bmm(per_group.sum(-1), zero.transpose(1, 2))
        return logits.masked_fill(~rows.valid[:, None], -math.inf)

    def _tier_values(self, spec, probs, rows, base) -> torch.Tensor:
        """``[R, G, D]`` one tier's share of the output (rotated space) for its probabilities ``[R, G, M]``."""
        num_rows, group, _ = probs.shape
        groups, dim = spec.value_groups, self.store.head_dim
        scale, zero = self._meta(rows, base, VALUE_META, groups, 1)                           # [R, M, J]
        codes = self._codes(rows, base, VALUES, spec.value_bits)
        weights = probs[:, None] * scale.transpose(1, 2)[:, :, None]                          # [R, J, G, M]
        out = torch.bmm(weights.reshape(num_rows, groups * group, -1), codes)                 # [R, J*G, D] planes
        order = code_plane_order(dim, spec.value_bits, probs.device)
        out = torch.empty_like(out).index_copy_(2, order, out)                                # model column order
        out = out.reshape(num_rows, groups, group, groups, dim // groups).diagonal(dim1=1, dim2=3)
        out = out.permute(0, 1, 3, 2) + torch.bmm(probs, zero)[..., None]                      # [R, G, J, D/J]
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
            valid = staged.token_valid.repeat_interleave(store.num_kv_heads, 0)
            out.append(x.float().masked_fill(~valid[..., None], 0.0))   # unwritten slots may hold any bits, NaN too
        return out

    def _store_importance(self, layer: int, probs: torch.Tensor, heads: int, group: int) -> None:
        """Add the group's largest probability ``probs`` ``[R, G, S*P]`` to each staged token (``seen += 1``)."""
        staged = self._staged
        if staged.target_b.numel() == 0:
            return
        score = probs.amax(1).reshape(self._batch, heads, -1)                                  # [B, H, S*P]
        score = score[staged.target_b, :, staged.target_t]                                     # [n, H]
        self.store.add_importance(layer, staged.target_locs, score, torch.ones_like(score[:, 0]), accumulate=True)
