"""The Triton extend kernels (kernels/extend_attention.py) against the torch extend reference.

Fresh random stores built through the store's own API (tests/kernel_support/kernel_stores.py): each request's
pages sealed with steered tiers (mixed, one tier, all pruned) except its last ``staged`` pages, which hold the
chunk's new tokens and possibly a staged part of the prefix (chunked prefill, a new turn over a cached prefix).
Cases cover GQA ratios 1, 3 and 4, several query tiles per request, key tiles spanning pages and pages spanning
tiles, observation windows longer than the chunk and than one importance chunk, Hadamard rotation and a
per-layer tier override. The reference (``ExtendAttentionWrapper`` on the torch path) runs on the CPU store; the
kernels run through :class:`ExtendPlan` on a copy on the test device, with the output, log-sum-exp, score and
seen buffers poisoned with NaN first. Under ``TRITON_INTERPRET=1`` on CPU at small sizes; natively on CUDA.

Tolerance. float32 queries: both sides compute float32 attention over the same dequantized float32 keys and
values (IEEE products in the kernel), so they differ by float32 rounding order: we allow ``1e-5 max |ref|`` on
outputs and ``rtol=1e-5, atol=1e-7`` on scores. bfloat16 queries over a bfloat16 store (the model's path): the
kernel rounds sealed keys and values to bfloat16 (staged ones are stored in it) and the probabilities to
bfloat16 for the value product; ``u = 2^-8`` is bfloat16's unit roundoff. For one query head with reference
logits ``x_n = sigma q . k_n``, probabilities ``pi``, output ``o``: a rounded key moves a logit by at most
``e_n = sigma u sum_d |q_d| |k_nd|``; with ``E = max_n e_n`` every probability moves by a factor in
``[e^-2E, e^2E]``, so ``|d o| <= (e^2E - 1) sum_n pi_n |v_n - o|``. The rounded values and weights add at most
``e^2E (2u + u^2) sum_n pi_n |v_n|``, and both sides round their output to bfloat16, ``2 u |o|``. Scores move like the
probabilities: ``rtol = e^2E - 1`` plus the float32 slack.
"""

import math

import pytest
import torch

from diffkv_sglang.attention import ExtendAttentionWrapper
from diffkv_sglang.config import DiffKVConfig
from diffkv_sglang.kernels.extend_attention import ExtendPlan
from diffkv_sglang.store import PageState
from kernel_stores import PRUNING, build, csr

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("torch_reference")]

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
RTOL = 1e-5
BF16_U = 2.0 ** -8
POISON = -7.0                   # staged statistics before the reference run: tokens it does not write keep it



def reference_bound(store, table, seq_lens, extend_lens, layer, q, sm_scale):
    """The docstring's bound for bfloat16 queries: ``(bound [total, Hq, D], E [total, Hq])`` around the
    reference output, from the store's dequantized keys and values (float64)."""
    page, heads = store.page_size, store.num_kv_heads
    group = q.shape[1] // heads
    bound = torch.zeros(q.shape, dtype=torch.float64)
    logit_err = torch.zeros(q.shape[:2], dtype=torch.float64)
    row = 0
    for b, (n, ext) in enumerate(zip(seq_lens.tolist(), extend_lens.tolist())):
        pages = table[b, :math.ceil(n / page)]
        keys, values, present = store.read_pages(layer, pages)
        sealed = (store.page_state[pages] == PageState.SEALED)[:, None, None].expand_as(present)
        flat = lambda x: x.transpose(0, 1).reshape(heads, -1, *x.shape[3:])[:, :n].double()   # noqa: E731
        keys, values, present, sealed = flat(keys), flat(values), flat(present).bool(), flat(sealed).bool()
        for i in range(ext):
            pos = n - ext + i
            for hq in range(q.shape[1]):
                h = hq // group
                keep = present[h, :pos + 1]
                k, v = keys[h, :pos + 1][keep], values[h, :pos + 1][keep]
                qd = q[row + i, hq].double()
                pi = torch.softmax(sm_scale * (k @ qd), 0)
                o = pi @ v
                e = float((sm_scale * BF16_U * (k.abs() @ qd.abs()) * sealed[h, :pos + 1][keep]).max())
                bound[row + i, hq] = ((math.exp(2 * e) - 1) * (pi[:, None] * (v - o).abs()).sum(0)
                                      + math.exp(2 * e) * (2 * BF16_U + BF16_U ** 2) * (pi @ v.abs())
                                      + 2 * BF16_U * o.abs())
                logit_err[row + i, hq] = e
        row += ext
    return bound, logit_err


def compare(config, heads, gqa, dim, seq_lens, extend_lens, staged_pages, dtype, extend_config=None):
    """Reference (CPU store) against the kernels (device copy) in every layer; every request's pages from the one
    holding its first new token on are staged, and at least its last ``staged_pages``. Returns the plan."""
    page = config.page_size
    needed = max(math.ceil(n / page) - (n - ext) // page for n, ext in zip(seq_lens, extend_lens))
    store, table, lens = build(config, heads, dim, seq_lens, staged_pages=max(staged_pages, needed), dtype=dtype)
    extend = torch.tensor(extend_lens)
    assert torch.all(extend <= lens) and torch.all(extend > 0)
    qo_indptr = torch.cat([extend.new_zeros(1), extend.cumsum(0)])
    kv_indptr, kv_indices = csr(table, lens, page)
    staged = kv_indices[store.page_state[kv_indices] == PageState.STAGED]
    locs = (staged[:, None] * page + torch.arange(page)).reshape(-1)
    for layer in range(store.num_layers):
        store.add_importance(layer, locs, torch.full((locs.numel(), heads), POISON),
                             torch.full((locs.numel(),), POISON), accumulate=False)
    kernel_store = store.to(DEVICE)
    reference = ExtendAttentionWrapper(store, heads * gqa)
    reference.plan(qo_indptr, table, lens)
    plan = ExtendPlan(kernel_store.view, heads * gqa, config=extend_config)
    plan.plan(*(x.to(DEVICE) for x in (qo_indptr, kv_indptr, kv_indices, lens)), config.obs_window)
    for layer in range(store.num_layers):
        q = torch.randn(int(qo_indptr[-1]), heads * gqa, dim).to(dtype)
        sm_scale = dim ** -0.5 if layer % 2 == 0 else 0.3 / math.sqrt(dim)
        ref = reference.run(q, layer, sm_scale=sm_scale).double()
        ref_score, ref_seen = store.staged_importance(layer, staged)                     # [n, H, P], [n, H, P]
        for buffer in (plan.lse, plan.score, plan.seen):
            buffer.fill_(float("nan"))
        out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
        keys, values, present = kernel_store.read_pages(layer, kv_indices.to(DEVICE))
        got, score, seen = plan.run(q.to(DEVICE), keys.to(dtype), values.to(dtype), present, sm_scale, out=out)
        assert got is out
        err = (out.cpu().double() - ref).abs()
        if dtype == torch.float32:
            assert float(err.max()) <= RTOL * float(ref.abs().max()), (layer, float(err.max()))
            rtol = RTOL
        else:
            bound, logit_err = reference_bound(store, table, lens, extend, layer, q.float(), sm_scale)
            bound = bound + RTOL * float(ref.abs().max())
            if config.value_rotation == "hadamard":           # the bound holds in the rotated space: per head
                err, bound = err.norm(dim=-1), bound.norm(dim=-1)
            assert torch.all(err <= bound), (layer, float((err / bound).max()))
            rtol = math.expm1(2 * float(logit_err.max())) + RTOL
        # score / seen of staged tokens, as the wrapper would store them (seen > 0)
        score, seen = score.cpu(), seen.cpu()
        for b in range(len(seq_lens)):
            for j, p in enumerate(table[b, :math.ceil(seq_lens[b] / page)].tolist()):
                if store.page_state[p] != PageState.STAGED:
                    continue
                k = int((staged == p).nonzero())
                valid = torch.arange(page) < seq_lens[b] - j * page
                cols = slice(j * page, (j + 1) * page)
                written = valid & (seen[b, cols] > 0)
                expect_written = ref_seen[k, 0] != POISON
                assert torch.equal(written, expect_written & valid), (b, j)
                assert torch.equal(seen[b, cols][written], ref_seen[k, 0][written])
                torch.testing.assert_close(score[b, :, cols][:, written], ref_score[k][:, written], rtol=rtol,
                                           atol=1e-7)
    return plan


# name: (config overrides, heads, gqa, seq_lens, extend_lens, least staged pages per request, extend config)
CASES = {
    "gqa 1, prefill and chunk": (dict(), 2, 1, [37, 70], [37, 40], 3, None),
    "gqa 4, sealed prefix, long window": (dict(obs_window=80), 1, 4, [130, 50], [20, 50], 2, None),
    "gqa 3, many tiles, 32-row key tiles": (dict(obs_window=40), 2, 3, [150, 45], [90, 45], 6,
                                           dict(block_q=32, block_n=32, window_rows=32)),
    "rotation, layer override": (dict(key_rotation="hadamard", value_rotation="hadamard",
                                      layer_tiers={1: ["k4v2g2", "k2v2"]}), 2, 2, [100], [33], 3, None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_extend_kernel_matches_reference(case, dtype, seeded):
    overrides, heads, gqa, seq_lens, extend_lens, staged, extend_config = CASES[case]
    page = 16
    config = DiffKVConfig.from_dict({"page_size": page, **PRUNING, **overrides})
    if CUDA:                                                # real sizes: head_dim 128, longer requests
        seq_lens, extend_lens = [4 * n for n in seq_lens], [4 * n for n in extend_lens]
    dim = 128 if CUDA else 32
    plan = compare(config, heads, gqa, dim, seq_lens, extend_lens, staged * (4 if CUDA else 1), dtype, extend_config)
    assert plan._batch["tile_req"].numel() >= len(seq_lens)


def test_plan_and_run_checks(seeded):
    config = DiffKVConfig.from_dict({"page_size": 16, **PRUNING})
    store, table, lens = build(config, 2, 32, [40], layers=1, staged_pages=3)
    store = store.to(DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        ExtendPlan(store.view, 3)
    plan = ExtendPlan(store.view, 4)
    kv_indptr, kv_indices = csr(table, lens, 16)
    q = torch.randn(40, 4, 32, device=DEVICE)
    keys, values, present = store.read_pages(0, kv_indices.to(DEVICE))
    with pytest.raises(RuntimeError, match="plan"):
        plan.run(q, keys, values, present, 0.1)
    plan.plan(torch.tensor([0, 40]), kv_indptr, kv_indices, lens, 8)
    with pytest.raises(ValueError, match="q must be"):
        plan.run(q[:39], keys, values, present, 0.1)
    with pytest.raises(ValueError, match="dtype"):
        plan.run(q, keys.half(), values.half(), present, 0.1)
    with pytest.raises(ValueError, match="present"):
        plan.run(q, keys, values, present[:1], 0.1)
