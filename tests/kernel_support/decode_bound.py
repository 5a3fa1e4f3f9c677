"""The error bound of the decode kernel's 16-bit products (derived in ``tests/test_kernel_decode.py``'s docstring),
shared by the kernel tests and the dispatch tests."""

import math

import torch

from diffkv_sglang.quant import rotate
from diffkv_sglang.store import PageState


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
        sealed = (store.page_state[pages] == PageState.SEALED)[:, None, None].expand_as(present)
        flat = lambda x: x.transpose(0, 1).reshape(store.num_kv_heads, -1, *x.shape[3:])[:, :n]   # noqa: E731
        keys, values, present, sealed = flat(keys), flat(values), flat(present), flat(sealed)
        for h in range(q.shape[1]):
            kv = h // group
            keep = present[kv]
            q_key = rotate(q[b, h][None], fmt.key_rotation)[0].double()
            k, v, is_sealed = keys[kv][keep], values[kv][keep], sealed[kv][keep]
            x = sm_scale * (k @ q_key)
            pi = torch.softmax(x, 0)
            o = pi @ v
            eps = sm_scale * (u * (k.abs() @ q_key.abs()) + 2 ** -39 * float(q_key.abs().max()) * k.abs().sum(1))
            e = float(torch.where(is_sealed, eps, 0.0).max()) if keep.any() else 0.0
            big_v = 4 * v.abs().amax(1) * is_sealed
            staged_v = staged_u * (pi[:, None] * v.abs() * ~is_sealed[:, None]).sum(0)
            bound[b, h] = ((math.exp(2 * e) - 1) * (pi[:, None] * (v - o).abs()).sum(0)
                           + math.exp(2 * e) * (u * float(pi @ big_v) + staged_v) + 2 ** -33 * float(big_v.sum()))
            logit_err[b, h] = e
    return bound + float32_slack * float(ref.abs().max()), logit_err
