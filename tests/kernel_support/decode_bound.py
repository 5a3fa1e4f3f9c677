"""The error bound of the decode kernel's 16-bit products (derived in ``tests/test_kernel_decode.py``'s docstring),
shared by the kernel tests and the dispatch tests."""

import math

import torch

from diffkv_sglang.quant import read_sealed_blocks, rotate
from diffkv_sglang.store import PageState


def _channel_bounds(store, layer: int, pages: torch.Tensor) -> torch.Tensor:
    """``[p, H, P, D]`` float64: for a token of a per-channel key tier of a sealed block, the bound ``K_c`` on
    ``|m s_c c_c|`` (the code part of its key, channel ``c``) derived in the test's docstring, ``4 R_c + 2^-20 M``
    with ``R_c`` the largest ``|k_c|`` over the tier's tokens of the block and ``M`` the block's largest ``|k|``
    (dequantized keys in the space the codes live in); 0 for every other token."""
    fmt = store.formats[layer]
    heads, page, dim = store.num_kv_heads, store.page_size, store.head_dim
    bounds = torch.zeros(pages.numel(), heads, page, dim, dtype=torch.float64)
    channel = [t for t, layout in enumerate(fmt.tiers) if layout.channel_keys]
    sealed = (store.page_state[pages] == PageState.SEALED).nonzero(as_tuple=True)[0]
    if not channel or not sealed.numel():
        return bounds
    slots = store.slots(pages[sealed], layer).reshape(-1)
    counts = store.tier_counts[pages[sealed], layer].reshape(-1, fmt.num_tiers)
    keys, _, tier = read_sealed_blocks(fmt, store.arena.data, store.arena.block_offset[slots], counts,
                                       undo_rotation=False)                 # [n, P, D] in the codes' space
    keys, tier = keys.double().abs(), tier.long()
    largest = keys.amax((1, 2))                                              # M per block
    out = torch.zeros_like(keys)
    for t in channel:
        member = (tier == t)[..., None]
        r = torch.where(member, keys, 0.0).amax(1, keepdim=True)             # R_c per block: [n, 1, D]
        out = torch.where(member, 4 * r + 2 ** -20 * largest[:, None, None], out)
    bounds[sealed] = out.reshape(sealed.numel(), heads, page, dim)
    return bounds


def error_bound(store, table, seq_lens, layer: int, q: torch.Tensor, sm_scale: float, u: float, ref: torch.Tensor,
                staged_u: float = 0.0, float32_slack: float = 1e-5):
    """The bound derived in ``tests/test_kernel_decode.py``'s docstring for the kernel's output against ``ref``
    (``[B, Hq, D]``) in ``layer``, for the query ``q`` (float32 values) and the query's rounding ``u``:
    ``(bound, E)``, ``bound`` ``[B, Hq, D]`` (in the rotated space with value rotation) and ``E`` ``[B, Hq]`` the
    largest logit error. ``staged_u``: the rounding of staged tokens' probabilities (0 for float32 stores; a
    16-bit store's unit roundoff when the query is 16-bit, since the kernel then multiplies staged values by
    probabilities in the model dtype); ``float32_slack``: float32 rounding-order slack, relative to ``max |ref|``."""
    page, fmt = store.page_size, store.formats[layer]
    group = q.shape[1] // store.num_kv_heads
    bound, logit_err = torch.zeros(q.shape, dtype=torch.float64), torch.zeros(q.shape[:2], dtype=torch.float64)
    for b, n in enumerate(seq_lens.tolist()):
        pages = table[b, :math.ceil(n / page)]
        keys, values, present = store.read_pages(layer, pages)                     # [p, H, P(, D)], model space
        keys = rotate(keys, fmt.key_rotation).double()
        values = rotate(values, fmt.value_rotation).double()
        channel = _channel_bounds(store, layer, pages)                             # [p, H, P, D]
        sealed = (store.page_state[pages] == PageState.SEALED)[:, None, None].expand_as(present)
        flat = lambda x: x.transpose(0, 1).reshape(store.num_kv_heads, -1, *x.shape[3:])[:, :n]   # noqa: E731
        keys, values, present, sealed, channel = flat(keys), flat(values), flat(present), flat(sealed), flat(channel)
        for h in range(q.shape[1]):
            kv = h // group
            keep = present[kv]
            q_key = rotate(q[b, h][None], fmt.key_rotation)[0].double()
            k, v, is_sealed, big_k = keys[kv][keep], values[kv][keep], sealed[kv][keep], channel[kv][keep]
            x = sm_scale * (k @ q_key)
            pi = torch.softmax(x, 0)
            o = pi @ v
            top = float(q_key.abs().max())
            eps = sm_scale * (u * (k.abs() @ q_key.abs()) + 2 ** -39 * top * k.abs().sum(1))
            # tokens of per-channel key tiers (K_c > 0 unless the block's keys are all 0, when both bounds are 0)
            eps_channel = sm_scale * ((u + 2 ** -23) * (big_k @ q_key.abs()) + 2 ** -39 * top * k.shape[1]
                                      * big_k.amax(1))
            eps = torch.where(big_k.amax(1) > 0, eps_channel, eps)
            e = float(torch.where(is_sealed, eps, 0.0).max()) if keep.any() else 0.0
            big_v = 4 * v.abs().amax(1) * is_sealed
            staged_v = staged_u * (pi[:, None] * v.abs() * ~is_sealed[:, None]).sum(0)
            bound[b, h] = ((math.exp(2 * e) - 1) * (pi[:, None] * (v - o).abs()).sum(0)
                           + math.exp(2 * e) * (u * float(pi @ big_v) + staged_v) + 2 ** -33 * float(big_v.sum()))
            logit_err[b, h] = e
    return bound + float32_slack * float(ref.abs().max()), logit_err
