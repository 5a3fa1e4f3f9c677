"""The one description of DiffKV's storage blocks. Reference code and Triton kernels both read it.

Storage is organised in *blocks*, one per (logical page, layer, KV head). A block is either

* **staged** (:class:`StagedBlockFormat`): the page's tokens in the model dtype, plus the importance
  statistics accumulated while the page is still private to one request::

      keys       [page_size, head_dim]   model dtype
      values     [page_size, head_dim]   model dtype
      score_sum  [page_size]             float32   attention mass received so far
      seen       [page_size]             float32   number of queries that contributed to score_sum

* **sealed** (:class:`BlockFormat`): the page's tokens compressed. Each token is in one tier or pruned;
  ``counts[t]`` tokens are in tier ``t``. Sections are laid out kind-major, so that rows of packed codes
  stay 16-byte aligned whenever their row size is::

      keys        tier 0 .. T-1     [counts[t], head_dim * key_bits[t] / 8]     uint8 packed codes
      values      tier 0 .. T-1     [counts[t], head_dim * value_bits[t] / 8]   uint8 packed codes
      key meta    tier 0 .. T-1     [counts[t], key_groups[t], 2]               float16 (scale, zero)
                                    or [head_dim, 2] if counts[t] > 0 and the tier's keys are per channel
      value meta  tier 0 .. T-1     [counts[t], value_groups[t], 2]             float16 (scale, zero)
      meta scale                    [2]                                         float32 (keys, values)
      token index tier 0 .. T-1     [counts[t]]                                 uint8 in-page index
      padding to a multiple of 16 bytes

  Within a tier, tokens are in ascending in-page order. Pruned tokens are absent. Per-group scale and
  zero point are stored in float16 *relative to a per-block power of two* (``meta scale``), so bf16 models
  whose activations exceed the float16 range are safe: the dequantized element is
  ``(code * scale + zero) * meta_scale`` computed in float32. Codes are packed little-endian: element ``j`` of
  a row lives in byte ``j * bits // 8`` at bit ``(j * bits) % 8``.

  A tier with per-channel keys (``TierSpec.key_mode == "channel"``, :data:`~diffkv_sglang.config.KEY_MODES`)
  stores no key metadata per token: its key meta section is one (scale, zero) pair per channel, the min-max over
  the tier's tokens of the block, ``key[i, c] = (code[i, c] * scale[c] + zero[c]) * meta_scale``. The section is
  present only when the tier holds a token, so an empty tier costs nothing.

Every section start is an affine function of the per-tier counts and of which tiers are non-empty:
``start = counts @ coeffs.T + (counts > 0) @ presence.T + const``. :meth:`BlockFormat.section_coefficients`
exports that table so kernels compute the same offsets.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import itertools
from collections.abc import Sequence

import torch

from .config import DiffKVConfig, TierSpec

BLOCK_ALIGN = 16          # bytes; every block starts and ends on this boundary
META_BYTES = 4            # one (scale, zero) pair of float16
META_SCALE_BYTES = 8      # two float32: key and value meta scales
INDEX_BYTES = 1           # uint8 in-page token index

# Descriptor tables, per (page, layer, KV head) block: arena offset and size (int64) and the tier counts (int32);
# per page: its state (int8). The store allocates them, the pool's sizing counts them, kernels read them.
DESCRIPTOR_OFFSET_DTYPE = torch.int64
DESCRIPTOR_COUNT_DTYPE = torch.int32
PAGE_STATE_DTYPE = torch.int8


class PageState(enum.IntEnum):
    """What a logical page currently holds (the same in every layer and head); stored as int8 codes."""

    EMPTY = 0
    STAGED = 1
    SEALED = 2


def descriptor_bytes_per_block(num_tiers: int) -> int:
    """Table bytes per (page, layer, KV head) block: arena offset and size plus ``num_tiers`` tier counts."""
    offset_bytes = torch.empty((), dtype=DESCRIPTOR_OFFSET_DTYPE).element_size()
    count_bytes = torch.empty((), dtype=DESCRIPTOR_COUNT_DTYPE).element_size()
    return 2 * offset_bytes + num_tiers * count_bytes


def descriptor_bytes_per_page(num_tiers: int, blocks_per_page: int) -> int:
    """Table bytes per logical page: ``blocks_per_page`` (layers x KV heads) block rows and the page state."""
    state_bytes = torch.empty((), dtype=PAGE_STATE_DTYPE).element_size()
    return blocks_per_page * descriptor_bytes_per_block(num_tiers) + state_bytes


# Section kinds of a sealed block, in storage order (the meta scale sits between VALUE_META and INDEX).
KEYS, VALUES, KEY_META, VALUE_META, INDEX = range(5)
SECTION_NAMES = ("keys", "values", "key_meta", "value_meta", "index")


@functools.lru_cache(maxsize=16)
def _hadamard_cpu(dim: int) -> torch.Tensor:
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two dimension, got {dim}")
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < dim:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return (matrix / dim ** 0.5).to(torch.float32)


@functools.lru_cache(maxsize=16)
def _hadamard_on(dim: int, device: torch.device) -> torch.Tensor:
    return _hadamard_cpu(dim).to(device)


def hadamard_matrix(dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix ``[dim, dim]`` float32: symmetric and orthonormal (H @ H = I). The
    rotation a format's ``"hadamard"`` keys or values are stored in. One cached copy per device: read-only."""
    return _hadamard_on(dim, torch.device(device))


def hadamard_scale(dim: int) -> float:
    """``float32(1 / sqrt(dim))`` as a Python float: the entries' magnitude in :func:`hadamard_matrix`."""
    return float(torch.tensor(dim ** -0.5, dtype=torch.float64).to(torch.float32))


def align_up(nbytes, align: int = BLOCK_ALIGN):
    """Round ``nbytes`` (int or integer tensor) up to a multiple of ``align``."""
    return (nbytes + align - 1) // align * align


@dataclasses.dataclass(frozen=True)
class TierLayout:
    """Byte sizes of one tier's sections for a given ``head_dim``: per-token rows, and the per-block bytes a
    non-empty tier adds (per-channel key metadata)."""

    spec: TierSpec
    head_dim: int

    @property
    def channel_keys(self) -> bool:
        """Whether keys are quantized per channel over the tier's tokens of a block (else per token)."""
        return self.spec.key_mode == "channel"

    @property
    def key_row_bytes(self) -> int:
        return self.head_dim * self.spec.key_bits // 8

    @property
    def value_row_bytes(self) -> int:
        return self.head_dim * self.spec.value_bits // 8

    @property
    def key_meta_bytes(self) -> int:
        """Per-token key metadata (0 with per-channel keys: see :meth:`fixed_bytes`)."""
        return 0 if self.channel_keys else self.spec.key_groups * META_BYTES

    @property
    def value_meta_bytes(self) -> int:
        return self.spec.value_groups * META_BYTES

    def row_bytes(self, kind: int) -> int:
        """Bytes one token occupies in section ``kind`` (KEYS, VALUES, KEY_META, VALUE_META or INDEX)."""
        return (self.key_row_bytes, self.value_row_bytes, self.key_meta_bytes, self.value_meta_bytes, INDEX_BYTES)[kind]

    def fixed_bytes(self, kind: int) -> int:
        """Bytes section ``kind`` holds whatever the tier's count, when it is not 0: ``head_dim`` (scale, zero)
        pairs in KEY_META with per-channel keys, else nothing."""
        return self.head_dim * META_BYTES if kind == KEY_META and self.channel_keys else 0

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token of this tier costs inside a block (codes, per-token metadata, index)."""
        return sum(self.row_bytes(kind) for kind in range(5))

    @property
    def block_fixed_bytes(self) -> int:
        """Bytes a non-empty tier adds to a block besides its tokens' (per-channel key metadata)."""
        return sum(self.fixed_bytes(kind) for kind in range(5))


class BlockFormat:
    """Layout of a sealed block for one layer's tiers (see the module docstring).

    Args:
        tiers: the layer's tiers, most precise first.
        head_dim: elements per key/value vector (a multiple of 16).
        page_size: tokens per logical page (<= 256).
        key_rotation, value_rotation: ``"none"`` or ``"hadamard"``; recorded so readers undo it.
    """

    def __init__(self, tiers: Sequence[TierSpec], head_dim: int, page_size: int,
                 key_rotation: str = "none", value_rotation: str = "none"):
        if head_dim % 16:
            raise ValueError(f"head_dim={head_dim} must be a multiple of 16")
        for tier in tiers:
            tier.validate_head_dim(head_dim)
        self.tiers = tuple(TierLayout(t, head_dim) for t in tiers)
        self.head_dim = head_dim
        self.page_size = page_size
        self.key_rotation = key_rotation
        self.value_rotation = value_rotation
        coeffs, presence, const = self._build_coefficients()
        self._coeffs = coeffs            # [5, T, T] int64: start of (kind, tier) = counts @ coeffs[kind, tier]
        self._presence = presence        # [5, T, T] int64: ... + (counts > 0) @ presence[kind, tier]
        self._const = const              # [5] int64
        self._token_bytes = torch.tensor([t.bytes_per_token for t in self.tiers], dtype=torch.int64)
        self._fixed_bytes = torch.tensor([t.block_fixed_bytes for t in self.tiers], dtype=torch.int64)

    @property
    def num_tiers(self) -> int:
        return len(self.tiers)

    def _build_coefficients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        num_tiers = len(self.tiers)
        coeffs = torch.zeros(5, num_tiers, num_tiers, dtype=torch.int64)
        presence = torch.zeros(5, num_tiers, num_tiers, dtype=torch.int64)
        for table, size in ((coeffs, TierLayout.row_bytes), (presence, TierLayout.fixed_bytes)):
            for kind in range(5):
                for tier in range(num_tiers):
                    for other, layout in enumerate(self.tiers):
                        earlier_kinds = sum(size(layout, k) for k in range(kind))
                        same_kind_before = size(layout, kind) if other < tier else 0
                        table[kind, tier, other] = earlier_kinds + same_kind_before
        const = torch.tensor([0, 0, 0, 0, META_SCALE_BYTES], dtype=torch.int64)
        return coeffs, presence, const

    @property
    def has_fixed_bytes(self) -> bool:
        """Whether a tier adds per-block bytes when non-empty (then section starts depend on ``counts > 0``)."""
        return any(t.block_fixed_bytes for t in self.tiers)

    def section_coefficients(self) -> tuple[list[list[list[int]]], list[list[list[int]]], list[int]]:
        """``(coeffs, presence, const)`` as Python lists: the start of section ``kind`` of tier ``t`` for counts
        ``n`` is ``sum(n[u] * coeffs[kind][t][u] + (n[u] > 0) * presence[kind][t][u] for u) + const[kind]``.
        Kernels receive these as constants."""
        return self._coeffs.tolist(), self._presence.tolist(), self._const.tolist()

    def section_starts(self, counts: torch.Tensor) -> torch.Tensor:
        """Byte offset, inside the block, of every (kind, tier) section.

        Args:
            counts: ``[..., T]`` integer tier counts.
        Returns:
            ``[..., 5, T]`` int64 offsets (kinds KEYS, VALUES, KEY_META, VALUE_META, INDEX).
        """
        counts = counts.to(torch.int64)
        starts = (counts[..., None, None, :] * self._coeffs.to(counts.device)).sum(-1)   # (CUDA has no int64 einsum)
        if self.has_fixed_bytes:
            nonempty = (counts > 0).to(torch.int64)
            starts = starts + (nonempty[..., None, None, :] * self._presence.to(counts.device)).sum(-1)
        return starts + self._const.to(counts.device)[:, None]

    def meta_scale_coefficients(self) -> tuple[list[int], list[int]]:
        """``(per_token, presence)``: the meta scales start at ``sum(n[u] * per_token[u] + (n[u] > 0) *
        presence[u] for u)`` for tier counts ``n``."""
        per_token = [sum(t.row_bytes(kind) for kind in range(INDEX)) for t in self.tiers]
        return per_token, [t.block_fixed_bytes for t in self.tiers]

    def meta_scale_start(self, counts: torch.Tensor) -> torch.Tensor:
        """``[...]`` int64 byte offset of the two float32 meta scales."""
        counts = counts.to(torch.int64)
        per_token = sum(self._row_bytes_tensor(kind, counts.device) for kind in range(INDEX))
        return (counts * per_token).sum(-1) + self._fixed_nbytes(counts)

    def _fixed_nbytes(self, counts: torch.Tensor) -> torch.Tensor:
        """``[...]`` int64 per-block bytes of the non-empty tiers of ``counts`` ``[..., T]`` (int64)."""
        return ((counts > 0).to(torch.int64) * self._fixed_bytes.to(counts.device)).sum(-1)

    def data_nbytes(self, counts: torch.Tensor) -> torch.Tensor:
        """``[...]`` int64 bytes a block uses before padding."""
        counts = counts.to(torch.int64)
        return (counts * self._token_bytes.to(counts.device)).sum(-1) + self._fixed_nbytes(counts) + META_SCALE_BYTES

    def block_nbytes(self, counts: torch.Tensor) -> torch.Tensor:
        """``[...]`` int64 size of a block with these ``[..., T]`` tier counts, padded to BLOCK_ALIGN."""
        return align_up(self.data_nbytes(counts))

    @functools.cached_property
    def max_block_nbytes(self) -> int:
        """Largest block: over every set of non-empty tiers, one token in each and the rest of the page in the
        set's most expensive tier."""
        largest = 0
        for chosen in itertools.product((False, True), repeat=self.num_tiers):
            tiers = [t for t, c in zip(self.tiers, chosen) if c]
            if tiers and len(tiers) <= self.page_size:
                nbytes = (sum(t.bytes_per_token + t.block_fixed_bytes for t in tiers)
                          + (self.page_size - len(tiers)) * max(t.bytes_per_token for t in tiers))
                largest = max(largest, nbytes)
        return align_up(largest + META_SCALE_BYTES)

    def _row_bytes_tensor(self, kind: int, device) -> torch.Tensor:
        return torch.tensor([t.row_bytes(kind) for t in self.tiers], dtype=torch.int64, device=device)

    def row_bytes(self, kind: int, tier: int) -> int:
        """Bytes per token of section ``kind`` in ``tier``."""
        return self.tiers[tier].row_bytes(kind)

    def bytes_per_token(self, tier: int) -> float:
        """Bytes a token of ``tier`` costs in a sealed block whose whole page is in that tier: its rows plus the
        tier's per-block bytes (per-channel key metadata) over ``page_size`` tokens; the per-block meta scale and
        padding are not counted."""
        layout = self.tiers[tier]
        return layout.bytes_per_token + layout.block_fixed_bytes / self.page_size

    def __repr__(self) -> str:
        names = ",".join(t.spec.name for t in self.tiers)
        return f"BlockFormat(tiers={names}, head_dim={self.head_dim}, page_size={self.page_size}, " \
               f"key_rotation={self.key_rotation}, value_rotation={self.value_rotation})"


@dataclasses.dataclass(frozen=True)
class StagedBlockFormat:
    """Layout of a staged (dense) block: one page of one (layer, KV head) in the model dtype.

    Offsets (bytes): keys at 0, values at ``values_start``, float32 ``score_sum`` at ``score_start``,
    float32 ``seen`` at ``seen_start``; ``nbytes`` includes padding to BLOCK_ALIGN.
    """

    head_dim: int
    page_size: int
    dtype: torch.dtype

    @functools.cached_property
    def element_bytes(self) -> int:
        """Bytes per model-dtype element (cached: the token write reads it per layer call)."""
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def row_bytes(self) -> int:
        return self.head_dim * self.element_bytes

    @property
    def values_start(self) -> int:
        return self.page_size * self.row_bytes

    @property
    def score_start(self) -> int:
        return 2 * self.page_size * self.row_bytes

    @property
    def seen_start(self) -> int:
        return self.score_start + 4 * self.page_size

    @property
    def nbytes(self) -> int:
        return align_up(self.seen_start + 4 * self.page_size)

    # Addressing from block byte offsets, for readers that view the arena as a flat tensor. Offsets are int64
    # tensors (any shape); ``in_page`` broadcasts against them.
    @property
    def values_elements(self) -> int:
        """Model-dtype elements from a block's first key element to its first value element."""
        return self.values_start // self.element_bytes

    def key_elements(self, offsets: torch.Tensor) -> torch.Tensor:
        """Model-dtype element index of the first key element of the blocks at byte ``offsets``."""
        return offsets // self.element_bytes

    def score_index(self, offsets: torch.Tensor, in_page=0) -> torch.Tensor:
        """float32 element index of ``score_sum[in_page]`` of the blocks at byte ``offsets``; ``seen`` follows
        ``page_size`` elements later."""
        return (offsets + self.score_start) // 4 + in_page

    def seen_index(self, offsets: torch.Tensor, in_page=0) -> torch.Tensor:
        """float32 element index of ``seen[in_page]`` of the blocks at byte ``offsets``."""
        return (offsets + self.seen_start) // 4 + in_page


class LayerFormats:
    """The sealed-block format of every layer of a model, shared between identical layers.

    Args:
        config: the DiffKV config (per-layer tier overrides included).
        num_layers, head_dim: model shape (per-rank KV heads do not change the format).
        dtype: model dtype of staged blocks.
    """

    def __init__(self, config: DiffKVConfig, num_layers: int, head_dim: int, dtype: torch.dtype):
        config.validate_model(head_dim, num_layers)
        self.config = config
        self.num_layers = num_layers
        self.head_dim = head_dim
        self.staged = StagedBlockFormat(head_dim, config.page_size, dtype)
        make = functools.lru_cache(maxsize=None)(
            lambda tiers: BlockFormat(tiers, head_dim, config.page_size, config.key_rotation, config.value_rotation))
        self.sealed = tuple(make(config.tiers_for_layer(layer)) for layer in range(num_layers))

    def __getitem__(self, layer: int) -> BlockFormat:
        return self.sealed[layer]

    @property
    def max_sealed_block_nbytes(self) -> int:
        """Largest sealed block over all layers."""
        return max(f.max_block_nbytes for f in self.sealed)


@dataclasses.dataclass(frozen=True)
class BlockView:
    """The store's blocks as kernels see them: arena bytes, descriptor tables and layer formats; no allocator.

    Kernels (and the torch decode path on codes) take a ``BlockView`` and never the store, like FlashInfer's
    kernels take a paged KV tensor and never a cache manager. Block ``(page, layer, head)`` is descriptor row
    ``(page * num_layers + layer) * num_kv_heads + head``; its bytes are ``data[block_offset[row]:]`` in the
    layout of ``formats.staged`` (``page_state[page] == STAGED``) or ``formats[layer]`` with the tier counts
    ``tier_counts[page, layer, head]`` (``SEALED``). The tensors are the store's own (views, not copies): writes
    through them are writes to the store.

    Attributes:
        data: ``[capacity]`` uint8 arena bytes.
        block_offset: ``[num_pages * num_layers * num_kv_heads + spare]`` int64 byte offset of each block (-1:
            none); the rows after the pages' are the store's spare slots (a chunk's blocks while it seals).
        page_state: ``[num_pages]`` int8 :class:`PageState` codes.
        tier_counts: ``[num_pages, num_layers, num_kv_heads, num_tiers]`` int32 tokens per tier of sealed blocks.
        formats: the staged format and every layer's sealed format.
        num_kv_heads: KV heads on this rank.
    """

    data: torch.Tensor
    block_offset: torch.Tensor
    page_state: torch.Tensor
    tier_counts: torch.Tensor
    formats: LayerFormats
    num_kv_heads: int

    @property
    def num_layers(self) -> int:
        return self.formats.num_layers

    @property
    def num_pages(self) -> int:
        return self.page_state.numel()

    @property
    def head_dim(self) -> int:
        return self.formats.head_dim

    @property
    def page_size(self) -> int:
        return self.formats.staged.page_size

    @property
    def dtype(self) -> torch.dtype:
        """Model dtype of staged K/V."""
        return self.formats.staged.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def num_tiers(self) -> int:
        return self.tier_counts.shape[-1]

    def typed(self, dtype: torch.dtype) -> torch.Tensor:
        """The arena bytes as a flat ``dtype`` tensor (``uint8``, ``int32``, ``float32`` or the model dtype)."""
        return self.data.view(dtype)
