"""Write new tokens' keys and values into their staged blocks: one launch per layer, one program per token.

The contract is the torch path of :meth:`diffkv_sglang.store.CompressedKVStore.write_tokens` (the reference): token
slot ``s`` is in-page row ``s % P`` of page ``s // P``, whose staged block for (``layer``, KV head ``h``) starts at
``block_offset[(page * L + layer) * H + h]``; keys go to row ``s % P`` of its key rows, values to the same row of
its value rows (:class:`diffkv_sglang.format.StagedBlockFormat`), cast to the model dtype (by torch, before the
launch, when they are in another). Every other byte is left
alone. Grid ``(m,)``: a program reads its token's ``H`` descriptors and copies ``H`` key rows and ``H`` value rows,
so a decode step's write is one launch (SGLang's own ``set_kv_buffer`` is two index puts).

Example::

    write_tokens(store.view, layer, locs, k, v)        # locs [m] int, k/v [m, H, D]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffkv_sglang.format import BlockView

__all__ = ["write_tokens"]


@triton.jit
def _write_tokens_kernel(KV, BLOCK_OFFSET, LOCS, K, V, stride_kt, stride_kh, stride_vt, stride_vh, layer,
                         VALUES_START: tl.constexpr, NUM_LAYERS: tl.constexpr, H: tl.constexpr, P: tl.constexpr,
                         D: tl.constexpr, ELEMENT_BYTES: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token ``i``'s rows (``KV``: the arena in the model dtype; ``VALUES_START`` in elements)."""
    i = tl.program_id(0).to(tl.int64)
    loc = tl.load(LOCS + i).to(tl.int64)
    page = loc // P
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    head_ok = h < H
    mask = head_ok[:, None] & (d < D)[None, :]
    block = tl.load(BLOCK_OFFSET + (page * NUM_LAYERS + layer) * H + h, mask=head_ok, other=0)
    row = (block // ELEMENT_BYTES + (loc % P) * D)[:, None] + d[None, :]
    keys = tl.load(K + i * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    values = tl.load(V + i * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(KV + row, keys, mask=mask)
    tl.store(KV + row + VALUES_START, values, mask=mask)


def write_tokens(kv: BlockView, layer: int, locs: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Store ``keys``, ``values`` ``[m, H, D]`` (cast to the model dtype; head_dim contiguous) of the token slots
    ``locs`` ``[m]`` (int, on the arena's device, in STAGED pages) into ``layer``'s staged blocks."""
    heads, dim = kv.num_kv_heads, kv.head_dim
    m = locs.numel()
    for name, x in (("keys", keys), ("values", values)):
        if tuple(x.shape) != (m, heads, dim) or x.stride(-1) != 1 or x.device != kv.device:
            raise ValueError(f"{name} must be [{m}, {heads}, {dim}] with a contiguous last dim on {kv.device}, got "
                             f"{tuple(x.shape)} on {x.device}")
    if m == 0:
        return
    # cast in torch (round to nearest even everywhere; Triton's interpreter truncates): a no-op for a model's K/V
    keys, values = (x if x.dtype == kv.dtype else x.to(kv.dtype) for x in (keys, values))
    staged = kv.formats.staged
    _write_tokens_kernel[(m,)](
        kv.typed(kv.dtype), kv.block_offset, locs, keys, values, keys.stride(0), keys.stride(1), values.stride(0),
        values.stride(1), layer, VALUES_START=staged.values_start // staged.element_bytes, NUM_LAYERS=kv.num_layers,
        H=heads, P=kv.page_size, D=dim, ELEMENT_BYTES=staged.element_bytes, BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_D=triton.next_power_of_2(dim), num_warps=4)
