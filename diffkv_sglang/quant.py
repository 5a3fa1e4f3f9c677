"""Reference quantization: asymmetric min-max codes, bit packing, rotation, and whole sealed blocks.

Everything here is plain torch (any device) and is the ground truth the Triton kernels are tested against.

Element level (per token, per KV head, per group of ``head_dim / groups`` contiguous elements)::

    zero  = fp16_round_down(min(x_g))                    # stored float16, relative to the block meta scale
    scale = fp16_round_up((max(x_g) - zero) / (2^b - 1))
    code  = clamp(round_half_even((x - zero) / scale), 0, 2^b - 1)
    x_hat = code * scale + zero                           # float32

Rounding the zero point down and the scale up keeps every element of the group inside the code range, so
``|x - x_hat| <= scale / 2`` holds for every element with the *stored* scale (plus float32 rounding), including
constant vectors and values far outside the float16 range (the per-block power-of-two meta scale absorbs those).

Key modes (:data:`KEY_MODES`): ``token`` is the above; ``channel`` (:func:`quantize_channels`) takes min and max per
channel over the tokens of one (block, tier) instead of per token, so scale and zero are ``[D]`` per block and tier;
``channel_offset`` (:func:`quantize_channel_offset`) subtracts a per-channel float16 offset (the channel's midrange
over those tokens) and quantizes the residual per token. Both keep the rounding conventions and the ``scale / 2``
bound. The block format stores ``token`` and ``channel`` keys (``TierSpec.key_mode``, the config's
:data:`~diffkv_sglang.config.KEY_MODES`); ``channel_offset`` is measured by the calibration only.

Block level: :func:`write_sealed_blocks` and :func:`read_sealed_blocks` move whole (page, layer, head)
blocks between dense tensors and the byte arena, following :mod:`diffkv_sglang.format`.
"""

from __future__ import annotations

import torch

from .format import (INDEX, KEY_META, KEYS, META_SCALE_BYTES, VALUE_META, VALUES, BlockFormat, hadamard_matrix,
                     hadamard_scale)

QUANT_BITS = (2, 4, 8, 16)   # 16 is for testing exactness; tiers use 2, 4 or 8
KEY_MODES = ("token", "channel", "channel_offset")   # how a tier's keys are quantized (values: always per token)


# ------------------------------------------------------------------------------------------- rotation
def _hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` as a fast Walsh-Hadamard transform in a fixed butterfly order (float32).

    Stage ``h = 1, 2, ..., D/2`` replaces each pair ``(x[j], x[j + h])`` (bit ``h`` of ``j`` clear) by
    ``(x[j] + x[j + h], x[j] - x[j + h])``; the result is multiplied by ``float32(1 / sqrt(D))``. The order is
    fixed, so the result is bit-identical on every device and in the seal kernel (a matmul's is not).
    """
    dim = x.shape[-1]
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two dimension, got {dim}")
    y = x.float()
    h = 1
    while h < dim:
        pairs = y.reshape(*y.shape[:-1], dim // (2 * h), 2, h)
        y = torch.stack([pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]], dim=-2)
        y = y.reshape(x.shape)
        h *= 2
    return y * hadamard_scale(dim)


def rotate(x: torch.Tensor, rotation: str) -> torch.Tensor:
    """Apply a per-vector rotation to the last dimension: ``x @ H`` (float32), or ``x`` for ``"none"``."""
    if rotation == "none":
        return x.float()
    if rotation == "hadamard":
        return _hadamard_transform(x)
    raise ValueError(f"unknown rotation {rotation!r}; allowed: 'none', 'hadamard'")


def unrotate(x: torch.Tensor, rotation: str) -> torch.Tensor:
    """Inverse of :func:`rotate` (Hadamard is its own inverse)."""
    return rotate(x, rotation)


# ------------------------------------------------------------------------------- float16 metadata
def _fp16_round_down(x: torch.Tensor) -> torch.Tensor:
    h = x.to(torch.float16)
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, -torch.inf)), h)


def _fp16_round_up(x: torch.Tensor) -> torch.Tensor:
    h = x.to(torch.float16)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, torch.inf)), h)


def meta_scale(amax: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= ``amax`` (float32, same shape; 1 where ``amax`` is 0; at most 2^127)."""
    _, exponent = torch.frexp(amax.float())
    exponent = exponent.clamp_max(127)
    scale = torch.ldexp(torch.ones_like(amax, dtype=torch.float32), exponent)
    return torch.where(amax > 0, scale, torch.ones_like(scale))


# ------------------------------------------------------------------------------ element quantization
def quantize(x: torch.Tensor, bits: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max quantization per group of the last dimension.

    Args:
        x: ``[..., D]`` float tensor (normally already divided by the block meta scale, so ``|x| <= 1``).
        bits: code width, one of 2, 4, 8, 16.
        groups: number of contiguous groups along ``D`` (each has its own scale and zero).
    Returns:
        ``codes`` int32 ``[..., D]`` in ``[0, 2^bits - 1]``, ``scale`` and ``zero`` float16 ``[..., groups]``.
    """
    _check_bits(bits)
    dim = x.shape[-1]
    if dim % groups:
        raise ValueError(f"groups={groups} must divide the last dimension {dim}")
    # + 0.0 turns -0.0 into +0.0, so a stored zero point never depends on the reduction order of amin/amax
    xg = (x.float() + 0.0).reshape(*x.shape[:-1], groups, dim // groups)
    codes, scale, zero = _minmax_codes(xg, xg.amin(-1), xg.amax(-1), bits, -1)
    return codes.reshape(x.shape), scale, zero


def _check_bits(bits: int) -> None:
    if bits not in QUANT_BITS:
        raise ValueError(f"bits={bits}; allowed: {QUANT_BITS}")


def _minmax_codes(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int, dim: int):
    """Codes of float32 ``x`` on the grid spanning ``[low, high]``, which are ``x``'s extremes reduced over
    dimension ``dim`` (``low``/``high`` have that dimension removed). Returns ``(codes int32 like x, scale, zero)``,
    scale and zero float16 like ``low``: zero rounded down, scale rounded up (so ``|x - x_hat| <= scale / 2``)."""
    qmax = (1 << bits) - 1
    zero = _fp16_round_down(low)
    spread = high - zero.float()
    # divide by a tensor: a Python-scalar divisor becomes a reciprocal multiply on CUDA (not correctly rounded)
    scale = _fp16_round_up(spread / torch.full_like(spread, qmax))
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    codes = torch.round((x - zero.float().unsqueeze(dim)) / safe.unsqueeze(dim)).clamp_(0, qmax)
    codes = torch.where(scale.unsqueeze(dim) > 0, codes, torch.zeros_like(codes))
    return codes.to(torch.int32), scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``codes`` ``[..., D]`` with ``scale``/``zero`` ``[..., G]`` -> float32 ``[..., D]``."""
    groups = scale.shape[-1]
    cg = codes.float().reshape(*codes.shape[:-1], groups, codes.shape[-1] // groups)
    return (cg * scale.float()[..., None] + zero.float()[..., None]).reshape(codes.shape)


# ------------------------------------------------------------------------------------------ key modes
def _members(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[..., P]`` bool: the tokens of ``x`` ``[..., P, D]`` that belong to the tier (all when ``mask`` is None)."""
    if mask is None:
        return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    return mask.to(torch.bool)


def _channel_extremes(x: torch.Tensor, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel min and max of float32 ``x`` ``[..., P, D]`` over the member tokens ``[..., P]`` ->
    ``[..., D]`` each; 0 for both where no token is a member."""
    inside = members[..., None]
    low = torch.where(inside, x, torch.full_like(x, torch.inf)).amin(-2)
    high = torch.where(inside, x, torch.full_like(x, -torch.inf)).amax(-2)
    any_member = members.any(-1)[..., None]
    return torch.where(any_member, low, torch.zeros_like(low)), torch.where(any_member, high, torch.zeros_like(high))


def quantize_channels(x: torch.Tensor, bits: int, mask: torch.Tensor | None = None):
    """Key mode ``channel`` (KIVI-style): asymmetric min-max per channel over the tokens of one (block, tier).

    Args:
        x: ``[..., P, D]`` float tensor, the ``P`` tokens of a page (normally divided by the block meta scale).
        bits: code width, one of 2, 4, 8, 16.
        mask: ``[..., P]`` bool, the tokens that belong to the tier (default: all). Only they enter the
            statistics; the other tokens get code 0.
    Returns:
        ``codes`` int32 ``[..., P, D]``, ``scale`` and ``zero`` float16 ``[..., D]`` (zero rounded down, scale
        up, as in :func:`quantize`: ``|x - x_hat| <= scale / 2`` for every member token).
    """
    _check_bits(bits)
    members = _members(x, mask)
    xf = x.float() + 0.0                                 # -0.0 -> +0.0, as in quantize
    low, high = _channel_extremes(xf, members)
    codes, scale, zero = _minmax_codes(xf, low, high, bits, -2)
    return torch.where(members[..., None], codes, torch.zeros_like(codes)), scale, zero


def dequantize_channels(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_channels`: ``codes`` ``[..., P, D]``, ``scale``/``zero`` float16 ``[..., D]`` ->
    float32 ``[..., P, D]`` (rows of non-member tokens hold ``zero``)."""
    return codes.float() * scale.float()[..., None, :] + zero.float()[..., None, :]


def quantize_channel_offset(x: torch.Tensor, bits: int, groups: int, mask: torch.Tensor | None = None):
    """Key mode ``channel_offset``: subtract a per-channel float16 offset, then :func:`quantize` the residual per
    token and group.

    The offset is the channel's midrange ``(min + max) / 2`` over the member tokens (rounded to nearest float16):
    it bounds every residual by half the channel's spread, so a near-constant channel of large magnitude (a bias
    that survives RoPE) no longer sets the per-token range, whatever its values' distribution over the tokens (a
    mean leaves up to the whole spread on one side); and it needs only the min/max reduction of ``channel`` mode.

    Args:
        x: ``[..., P, D]`` float tensor (normally divided by the block meta scale).
        bits, groups: as in :func:`quantize`.
        mask: ``[..., P]`` bool, the tokens of the tier (default: all); only they enter the offset. The other
            tokens get codes, scale and zero 0.
    Returns:
        ``codes`` int32 ``[..., P, D]``, ``scale`` and ``zero`` float16 ``[..., P, groups]``, ``offset`` float16
        ``[..., D]``; ``|x - x_hat| <= scale / 2`` per element of a member token (plus float32 rounding).
    """
    members = _members(x, mask)
    xf = x.float() + 0.0
    low, high = _channel_extremes(xf, members)
    offset = ((low + high) / 2).to(torch.float16)
    codes, scale, zero = quantize(xf - offset.float()[..., None, :], bits, groups)
    inside = members[..., None]
    return (torch.where(inside, codes, torch.zeros_like(codes)), torch.where(inside, scale, torch.zeros_like(scale)),
            torch.where(inside, zero, torch.zeros_like(zero)), offset)


def dequantize_channel_offset(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                              offset: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_channel_offset`: ``codes`` ``[..., P, D]``, ``scale``/``zero`` ``[..., P, G]``,
    ``offset`` float16 ``[..., D]`` -> float32 ``[..., P, D]``."""
    return dequantize(codes, scale, zero) + offset.float()[..., None, :]


def round_trip(x: torch.Tensor, key_mode: str, bits: int, groups: int, mask: torch.Tensor | None = None):
    """Quantize and dequantize the tokens of one (block, tier) with a key mode (values use ``"token"``).

    Args:
        x: ``[..., P, D]`` float tensor (already divided by the block meta scale).
        key_mode: one of :data:`KEY_MODES`: ``"token"`` (:func:`quantize`), ``"channel"``
            (:func:`quantize_channels`; ``groups`` unused) or ``"channel_offset"`` (:func:`quantize_channel_offset`).
        bits, groups: the tier's code width and groups per token.
        mask: ``[..., P]`` bool, the tier's tokens (default: all); rows of other tokens are meaningless.
    Returns:
        float32 ``[..., P, D]``.
    """
    if key_mode == "token":
        return dequantize(*quantize(x, bits, groups))
    if key_mode == "channel":
        return dequantize_channels(*quantize_channels(x, bits, mask))
    if key_mode == "channel_offset":
        return dequantize_channel_offset(*quantize_channel_offset(x, bits, groups, mask))
    raise ValueError(f"unknown key mode {key_mode!r}; allowed: {KEY_MODES}")


def demote(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, groups: int):
    """Re-quantize tokens to a lower tier: dequantize, then quantize with fresh min/max at ``bits``/``groups``.

    Shapes as in :func:`quantize`; returns ``(codes, scale, zero)`` of the lower tier.
    """
    return quantize(dequantize(codes, scale, zero), bits, groups)


# ------------------------------------------------------------------------------------------ packing
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[..., D]`` integer codes of ``bits`` width into ``[..., D * bits / 8]`` uint8, little-endian."""
    if bits == 16:
        c = codes.to(torch.int32)
        return torch.stack([c & 0xFF, c >> 8], -1).reshape(*codes.shape[:-1], -1).to(torch.uint8)
    per_byte = 8 // bits
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[..., R]`` uint8 -> ``[..., R * 8 / bits]`` int32 codes."""
    p = packed.to(torch.int32)
    if bits == 16:
        pairs = p.reshape(*p.shape[:-1], -1, 2)
        return pairs[..., 0] | (pairs[..., 1] << 8)
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    return ((p[..., None] >> shifts) & ((1 << bits) - 1)).reshape(*p.shape[:-1], -1)


def unpack_codes_into(out: torch.Tensor, packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack ``[..., R]`` uint8 rows of 2-, 4- or 8-bit codes into ``out`` ``[..., R * 8 / bits]`` (any float
    dtype, any strides, e.g. a slice of a larger buffer), in the row's own element order; returns ``out``.

    Element ``i * (8 / bits) + s`` of a row is bits ``[s * bits, (s + 1) * bits)`` of byte ``i``
    (:func:`pack_codes`), so each shift ``s`` is one strided copy into every ``8 / bits``-th column: the codes land
    converted and in place, with no interleaving temporary (as fast on a CPU as unpacking plane by plane and
    converting after)."""
    if bits == 8:
        return out.copy_(packed)
    if bits not in (2, 4):
        raise ValueError(f"bits={bits}; unpacking into a buffer supports 2, 4, 8")
    per_byte, mask = 8 // bits, (1 << bits) - 1
    for shift in range(per_byte):
        out[..., shift::per_byte] = (packed >> (shift * bits)) & mask
    return out


def gather_rows(data: torch.Tensor, starts: torch.Tensor, row_bytes: int) -> torch.Tensor:
    """Rows of ``row_bytes`` elements of the flat ``data`` (the uint8 arena, or a view of it in another dtype)
    starting at element offsets ``starts`` (any shape, int64 or int32) -> ``[*starts.shape, row_bytes]`` in ``data``'s
    dtype. One ``index_select`` over an overlapping-rows view of ``data`` (no per-element index tensor)."""
    rows = data.as_strided((data.numel() - row_bytes + 1, row_bytes), (1, 1))
    return rows.index_select(0, starts.reshape(-1)).reshape(*starts.shape, row_bytes)


# ------------------------------------------------------------------------------------ sealed blocks
def tier_counts(tiers: torch.Tensor, num_tiers: int) -> torch.Tensor:
    """``tiers`` ``[..., P]`` (tier index per token, -1 = pruned) -> ``[..., num_tiers]`` int64 counts."""
    one_hot = tiers[..., None] == torch.arange(num_tiers, device=tiers.device)
    return one_hot.sum(-2, dtype=torch.int64)


def _scatter_rows(data: torch.Tensor, starts: torch.Tensor, rows: torch.Tensor) -> None:
    """Write ``rows`` ``[m, R]`` uint8 at byte offsets ``starts`` ``[m]`` of the flat uint8 ``data``."""
    index = starts[:, None] + torch.arange(rows.shape[-1], device=data.device)
    data[index.reshape(-1)] = rows.reshape(-1)


def _as_bytes(x: torch.Tensor) -> torch.Tensor:
    """Reinterpret the last dimension of a contiguous tensor as bytes: ``[m, k]`` -> ``[m, k * itemsize]`` uint8."""
    return x.contiguous().view(torch.uint8).reshape(x.shape[0], -1)


def write_sealed_blocks(fmt: BlockFormat, data: torch.Tensor, offsets: torch.Tensor, keys: torch.Tensor,
                        values: torch.Tensor, tiers: torch.Tensor) -> torch.Tensor:
    """Quantize, pack and write ``n`` sealed blocks (the reference of the seal kernel).

    Args:
        fmt: the layer's block format.
        data: the arena, flat uint8.
        offsets: ``[n]`` int64 byte offsets of the blocks (sized with ``fmt.block_nbytes(counts)``).
        keys, values: ``[n, P, D]`` the pages' tokens (any float dtype, unrotated).
        tiers: ``[n, P]`` integer tier per token, -1 = pruned.
    Returns:
        ``[n, T]`` int64 tier counts (what the descriptor table records).
    """
    counts = tier_counts(tiers, fmt.num_tiers)
    starts = offsets[:, None, None] + fmt.section_starts(counts)                     # [n, 5, T]
    present = tiers >= 0
    rotated = {"k": rotate(keys, fmt.key_rotation), "v": rotate(values, fmt.value_rotation)}
    amax = {name: torch.where(present[..., None], x.abs(), torch.zeros_like(x)).amax(dim=(1, 2))
            for name, x in rotated.items()}
    scales = {name: meta_scale(a) for name, a in amax.items()}                      # [n] float32
    for t, layout in enumerate(fmt.tiers):
        block, pos = (tiers == t).nonzero(as_tuple=True)
        if block.numel() == 0:
            continue
        rank = (torch.cumsum((tiers == t).to(torch.int64), dim=1) - 1)[block, pos]
        for name, code_kind, meta_kind, bits, groups in (
                ("k", KEYS, KEY_META, layout.spec.key_bits, layout.spec.key_groups),
                ("v", VALUES, VALUE_META, layout.spec.value_bits, layout.spec.value_groups)):
            if name == "k" and layout.channel_keys:
                codes, scale, zero = quantize_channels(rotated["k"] / scales["k"][:, None, None], bits, tiers == t)
                codes, nonempty = codes[block, pos], counts[:, t] > 0
                meta = torch.stack([scale[nonempty], zero[nonempty]], -1).reshape(int(nonempty.sum()), -1)  # [m, 2D]
                _scatter_rows(data, starts[nonempty, KEY_META, t], _as_bytes(meta))
            else:
                codes, scale, zero = quantize(rotated[name][block, pos] / scales[name][block, None], bits, groups)
                meta = torch.stack([scale, zero], -1).reshape(block.numel(), -1)         # [m, 2G] float16
                _scatter_rows(data, starts[block, meta_kind, t] + rank * layout.row_bytes(meta_kind), _as_bytes(meta))
            _scatter_rows(data, starts[block, code_kind, t] + rank * layout.row_bytes(code_kind), pack_codes(codes, bits))
        _scatter_rows(data, starts[block, INDEX, t] + rank, pos.to(torch.uint8)[:, None])
    meta_scales = torch.stack([scales["k"], scales["v"]], -1)                       # [n, 2] float32
    _scatter_rows(data, offsets + fmt.meta_scale_start(counts), _as_bytes(meta_scales))
    return counts


def read_sealed_blocks(fmt: BlockFormat, data: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor,
                       undo_rotation: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dequantize ``n`` sealed blocks back to page-shaped dense tensors (the reference of the read path).

    Args:
        fmt: the layer's block format.
        data: the arena, flat uint8.
        offsets: ``[n]`` int64 block offsets; counts: ``[n, T]`` tier counts from the descriptor table.
        undo_rotation: return keys/values in the model's space (True) or in the rotated space the codes live in.
    Returns:
        ``keys``, ``values``: ``[n, P, D]`` float32 (zeros where a token is pruned);
        ``tier``: ``[n, P]`` int8 tier per token, -1 where pruned.
    """
    num_blocks, page, dim = offsets.shape[0], fmt.page_size, fmt.head_dim
    device = data.device
    counts = counts.to(torch.int64)
    starts = offsets[:, None, None] + fmt.section_starts(counts)
    meta_scales = gather_rows(data, offsets + fmt.meta_scale_start(counts), META_SCALE_BYTES)
    meta_scales = meta_scales.view(torch.float32).reshape(num_blocks, 2)
    out = {"k": torch.zeros(num_blocks, page, dim, device=device), "v": torch.zeros(num_blocks, page, dim, device=device)}
    tier_of = torch.full((num_blocks, page), -1, dtype=torch.int8, device=device)
    for t, layout in enumerate(fmt.tiers):
        per_block = counts[:, t]
        block = torch.repeat_interleave(torch.arange(num_blocks, device=device), per_block)
        if block.numel() == 0:
            continue
        rank = torch.arange(block.numel(), device=device) - (torch.cumsum(per_block, 0) - per_block)[block]
        pos = gather_rows(data, starts[block, INDEX, t] + rank, 1)[:, 0].to(torch.int64)
        tier_of[block, pos] = t
        for name, scale_col, code_kind, meta_kind, bits in (
                ("k", 0, KEYS, KEY_META, layout.spec.key_bits),
                ("v", 1, VALUES, VALUE_META, layout.spec.value_bits)):
            packed = gather_rows(data, starts[block, code_kind, t] + rank * layout.row_bytes(code_kind),
                                  layout.row_bytes(code_kind))
            if name == "k" and layout.channel_keys:             # one (scale, zero) per channel of each block
                meta = gather_rows(data, starts[block, KEY_META, t], layout.fixed_bytes(KEY_META))
                meta = meta.view(torch.float16).reshape(block.numel(), dim, 2)
                x = dequantize_channels(unpack_codes(packed, bits)[:, None], meta[..., 0], meta[..., 1])[:, 0]
            else:
                meta = gather_rows(data, starts[block, meta_kind, t] + rank * layout.row_bytes(meta_kind),
                                    layout.row_bytes(meta_kind)).view(torch.float16).reshape(block.numel(), -1, 2)
                x = dequantize(unpack_codes(packed, bits), meta[..., 0], meta[..., 1])
            out[name][block, pos] = x * meta_scales[block, scale_col, None]
    keys, values = out["k"], out["v"]
    if undo_rotation:
        keys, values = unrotate(keys, fmt.key_rotation), unrotate(values, fmt.value_rotation)
    return keys, values, tier_of
