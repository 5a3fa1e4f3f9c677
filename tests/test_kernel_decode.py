"""Triton decode attention (kernels/decode_attention.py) against the torch reference DecodeAttentionWrapper.

Fresh random stores built through the store's own API (stage, write, importance, seal): sealed and staged pages
mixed, tiers steered per page (mixed tiers, one tier only so the others are empty, every token pruned), requests
of different lengths, several splits, 1 to 3 tiers with groups > 1, per-channel key tiers (``+kc``) beside token
tiers or alone, Hadamard rotation of keys and/or values, a per-layer tier override, pages larger than a tile, a
sealed last page only partly inside its request, a per-call softmax scale (odd layers). Even layers run a
bfloat16 query (the model's path: one float16 product per operand), odd layers a float32 one (float16 pairs).
On CPU the kernels run in the Triton interpreter at small sizes; on CUDA the same tests run natively at larger
sizes. Stores are built and the reference runs on the CPU (its dense fp32 copies stay cheap there); the kernel
runs on a copy of the store on the test device.

Tolerance, derived from the kernel's 16-bit operands. For one query head let ``x_n = sigma q . k_n`` be the
reference's logits over the kept tokens (``k``, ``v`` the dequantized keys and values in the space the kernel
reads them: rotated for Hadamard formats), ``pi = softmax(x)``, ``o = sum_n pi_n v_n``. The kernel's products
are exact (16-bit operands, float32 accumulation: codes are exact in float16); its operands differ from the
reference's in two places.

1. Sealed keys see the query as float16: ``q~`` with ``|q~_d - q_d| <= u |q_d| + eta``, after an exact
   power-of-two scaling that puts ``max |q|`` in [2^14, 2^15). ``u = 2^-11`` (float16 rounding) for a 16-bit
   query, ``2^-22`` for a float32 one (a float16 pair: high part plus the rounded remainder);
   ``eta = 2^-39 max |q|`` covers float16 subnormals (``2^-25`` absolute in scaled units). Scale and zero
   point are applied around the product over ``q~`` itself, so the logit is ``sigma q~ . k_n`` exactly.
   Staged keys use IEEE float32 products here (float32 stores). Hence ``|x~_n - x_n| <= e_n = sigma (u sum_d
   |q_d||k_nd| + eta sum_d |k_nd|)`` and, with ``E = max_n e_n``, every probability moves by a factor in
   ``[e^-2E, e^2E]``: ``|pi~_n - pi_n| <= (e^2E - 1) pi_n``, so (``sum_n (pi~_n - pi_n) = 0``)
   ``|d o_e| <= (e^2E - 1) sum_n pi_n |v_ne - o_e|``.

   Per-channel key tiers (``+kc``) round ``q o s`` instead (``s``, ``z``: the tier's per-channel scale and zero
   of the block, ``m`` its meta scale): the logit is ``sigma m ((q o s)~ . c_n + q . z)`` with the zero term in
   float32 over the exact query, and ``(q o s)~`` within ``u' |q_d s_d| + 2^-39 max_d |q_d s_d|`` of ``q o s``
   (``u' = u + 2^-23``: the float16 rounding, as for ``q``, and the float32 product ``q_d * s_d``; the power of
   two is per query row). The rounding multiplies the code part ``m s_d c_nd = k_nd - m z_d`` of the key, not
   ``k_nd``, so it is bounded through the quantizer (``quant._minmax_codes``): with ``x`` the tier's keys of the
   block in meta-scale units, ``X_d = max_n |x_nd|``, the zero point ``z_d`` is ``min_n x_nd`` rounded down to
   float16 and ``s_d = (max_n x_nd - z_d) / qmax`` rounded up, so ``s_d c_nd <= s_d qmax <= 2 X_d (1 + 2^-9)`` up
   to float16 subnormals; and ``X_d <= R_d / m + s_d / 2`` with ``R_d`` the largest dequantized ``|k_nd|`` over
   the tier's tokens of the block (each within ``s_d / 2`` of the original), hence with ``qmax >= 3``
   ``X_d <= 1.51 R_d / m`` and ``m s_d c_nd <= 3.03 R_d``. We use ``K_d = 4 R_d + 2^-20 M`` (``M`` the block's
   largest ``|k|``; the absolute term covers the float16 subnormal parts of ``s`` and ``z``, 2^-24 each in units
   of ``m <= 2 max |k|``), so ``e_n = sigma (u' sum_d |q_d| K_d + 2^-39 max |q| D max_d K_d)`` for such a token
   (the subnormal term: ``m |q_d' s_d'| c_nd <= max |q| m s_d' qmax <= max |q| K_d'`` at the row's largest
   ``|q_d' s_d'|``). Tokens past a request's end still count in ``R_d``: they set the block's scale and zero.
2. A sealed value's weight ``p s`` (probability times scale, times an exact 2^16) enters as float16: relative
   error ``u`` as above, absolute ``2^-41`` in float16's subnormal range. It multiplies the code part
   ``m s c = v - m z`` of the value (meta scale ``m``), and ``|m s c_e| <= |v_e| + |m z| <= 4 max_d |v_nd| =:
   V_n`` (the zero point is the group minimum rounded down, within half a step plus a float16 ulp of the
   dequantized values). The zero-point part ``p z m`` is float32. Hence ``|d o_e| <= e^2E u sum_n pi_n V_n
   + 2^-33 sum_n V_n`` over sealed tokens.

Float32 arithmetic (accumulation order, exp2 against exp, FMA contraction) adds a few 1e-7 relative, as the
float32-accurate kernel before this one showed; we allow ``1e-5 max |ref|`` for it (it also covers the float32
sum ``q . z`` of per-channel tiers, a few ulps of ``sum_d |q_d| |m z_d|``, terms of the size of ``|k|`` here).
The check is elementwise, ``|out - ref| <= bound`` (with value rotation, where the output is the rotated-space
result times the orthonormal ``H``, on each head's 2-norm). Staged-token importance moves like the
probabilities: ``rtol = e^2E - 1 + 1e-5``; ``seen`` must match exactly. At these sizes (``|q| ~ N(0, 1)``, keys
``~ 2 N(0, 1)``) the bfloat16 query's ``E`` is about 1e-3 (``u = 2^-11``); observed errors are several times below
the bound, as rounding errors do not align.
"""

import math

import pytest
import torch

from diffkv_sglang.attention import DecodeAttentionWrapper
from diffkv_sglang.config import DiffKVConfig
from diffkv_sglang.kernels.decode_attention import DecodeConfig, DecodePlan
from diffkv_sglang.store import PageState
from decode_bound import error_bound
from kernel_stores import CONTEXT, PRUNING, build

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("torch_reference")]

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
RTOL = 1e-5


# per device: (page_size, heads, seq_lens); CPU sizes keep the interpreter fast
SIZES = {"cpu": (16, 2, [1, 37, 70, 130]), "cuda": (32, 4, [1, 100, 700, 1500, 2900, 64, 333, 2048])}


def compare(store, table, seq_lens, num_q_heads, num_splits=None, config=None):
    """Run the reference (on ``store``) and the kernel (on a copy on DEVICE) for every layer; assert that outputs
    and staged-token importance agree within the derived bound (module docstring). Even layers: bfloat16 query,
    odd layers: float32 query and a per-call softmax scale. Returns the kernel's plan and the largest ratio of
    error to bound."""
    page = store.page_size
    staged = table[(store.page_state[table] == PageState.STAGED)
                   & (torch.arange(table.shape[1]) < (seq_lens[:, None] + page - 1) // page)]
    reference = DecodeAttentionWrapper(store, num_q_heads)
    reference.plan(table, seq_lens)
    kernel_store = store.to(DEVICE)
    plan = DecodePlan(kernel_store.view, num_q_heads, max_batch=len(seq_lens) + 1, max_pages=table.shape[1] + 1,
                      num_splits=num_splits, config=config)
    plan.plan(table.to(DEVICE), seq_lens.to(DEVICE))
    for workspace in (plan._part_m, plan._part_l, plan._part_acc, plan._logits):
        workspace.fill_(float("nan"))                       # nothing unwritten may be read
    worst = 0.0
    for layer in range(store.num_layers):
        bf16 = layer % 2 == 0
        q = torch.randn(len(seq_lens), num_q_heads, store.head_dim)
        q_kernel = q.to(torch.bfloat16) if bf16 else q
        q = q_kernel.float()                                # the values the kernel sees
        sm_scale = None if bf16 else 0.3 / math.sqrt(store.head_dim)              # odd layers override it
        ref = reference.run(q, layer, sm_scale=sm_scale)
        ref_score, ref_seen = store.staged_importance(layer, staged)
        out = torch.full_like(q, float("nan"), device=DEVICE)                     # float32 output either way
        assert plan.run(q_kernel.to(DEVICE), layer, out=out, sm_scale=sm_scale) is out
        out = out.cpu()
        score, seen = (x.cpu() for x in kernel_store.staged_importance(layer, staged.to(DEVICE)))
        bound, logit_err = error_bound(store, table, seq_lens, layer, q, plan.sm_scale if sm_scale is None
                                       else sm_scale, 2 ** -11 if bf16 else 2 ** -22, ref, float32_slack=RTOL)
        err = (out - ref).double().abs()
        if store.formats[layer].value_rotation == "hadamard":
            err, bound = err.norm(dim=-1), bound.norm(dim=-1)
        assert torch.all(err <= bound), (layer, float((err / bound).max()))
        worst = max(worst, float((err / bound).max()))
        rtol = math.expm1(2 * float(logit_err.max())) + RTOL
        torch.testing.assert_close(score, ref_score, rtol=rtol, atol=1e-7)
        assert torch.equal(seen, ref_seen)
    return plan, worst


CASES = {
    # name: (config, head_dim, gqa, num_splits, decode config)
    "k8v4+k4v2": (dict(), 32, 4, 3, None),
    "3 tiers, groups, hadamard": (dict(tiers=["k8v4g2x1", "k4v2g2x4", "k2v2"], thresholds=[2.0, 0.5],
                                       key_rotation="hadamard", value_rotation="hadamard"), 64, 1, 2, None),
    "1 tier, key rotation": (dict(tiers=["k4v4g4"], key_rotation="hadamard"), 32, 3, None, None),
    "layer override, value rotation": (dict(layer_tiers={1: ["k4v2g2", "k2v2"]}, value_rotation="hadamard"),
                                       64, 3, 4, DecodeConfig(min_pages_per_split=1)),
    "pages in two tiles": (dict(page_size=64), 32, 3, 2, DecodeConfig(block_n=32)),
    "16-row tiles": (dict(), 32, 4, 2, DecodeConfig(block_n=16)),
    # per-channel key tiers (``+kc``): their own product per tier and block, beside token tiers or alone
    "k8v4,k4v2+kc": (dict(tiers=["k8v4", "k4v2+kc"]), 64, 4, 3, None),
    "k8v8,k4v4+kc,k2v2+kc, hadamard keys": (dict(tiers=["k8v8", "k4v4+kc", "k2v2+kc"], thresholds=[2.0, 0.5],
                                                 key_rotation="hadamard"), 64, 1, 2, None),
    "channel tiers only, head_dim 128, value rotation": (dict(tiers=["k8v4+kc", "k2v2+kc"],
                                                              value_rotation="hadamard"), 128, 5, None, None),
    "channel beside groups, layer override": (dict(tiers=["k8v4g2x1", "k4v2+kc"],
                                                   layer_tiers={1: ["k4v2+kc", "k2v2g2x4"]}),
                                              64, 3, 4, DecodeConfig(min_pages_per_split=1)),
    "channel, pages in two tiles": (dict(page_size=64, tiers=["k8v4", "k4v2+kc"]), 64, 3, 2,
                                    DecodeConfig(block_n=32)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_decode_kernel_matches_reference(case, seeded):
    overrides, dim, gqa, splits, decode_config = CASES[case]
    page, heads, seq_lens = SIZES[DEVICE]
    if CUDA:
        dim = min(2 * dim, 128)
    config = DiffKVConfig.from_dict({"page_size": page, **PRUNING, **overrides})
    store, table, lens = build(config, heads, dim, seq_lens)
    sealed = store.page_state[table] == PageState.SEALED
    assert sealed.any() and (store.page_state[table] == PageState.STAGED).any()
    plan, _ = compare(store, table, lens, heads * gqa, num_splits=splits, config=decode_config)
    if splits:
        assert plan.num_splits == splits


@pytest.mark.parametrize("tiers", [["k8v4", "k4v2"], ["k8v4", "k4v2+kc"]])
def test_sealed_last_page_partly_inside_the_request(tiers, seeded):
    """A request whose last page is sealed and only partly inside its length (a shorter request over sealed
    pages): the kernel reads the tokens' in-page indices and drops those past the end, which still count in the
    block's tiers (and in a per-channel tier's scale and zero)."""
    page, heads, dim = 16, 2, 64
    config = DiffKVConfig.from_dict({"page_size": page, **PRUNING, "tiers": tiers})
    store, table, lens = build(config, heads, dim, [70, 64, 37], layers=2)
    lens = torch.tensor([2 * page + 5, 3 * page - 3, 37])     # 0 and 1 end in their sealed third page, 2 staged
    assert bool((store.page_state[table[:2, 2]] == PageState.SEALED).all())
    compare(store, table, lens, heads * 4, num_splits=2)


def _serving_lens(batch: int, longest: int, seed: int) -> list[int]:
    """``batch`` lengths: two requests of ``longest`` tokens, one of 1, the rest uniform in [1, 2048]."""
    gen = torch.Generator().manual_seed(seed)
    return [longest, 1, longest] + torch.randint(1, 2049, (batch - 3,), generator=gen).tolist()


SERVING = {
    # name: (kv heads, head_dim, gqa, batch, longest context); the shapes of real models, at serving sizes
    "qwen2.5-7b 28/4 heads (gqa 7), batch 256, 32k": (4, 128, 7, 256, 32768),
    "llama-3-8b 32/8 heads (gqa 8), batch 16, 32k": (8, 128, 8, 16, 32768),
    "smollm2 9/3 heads (gqa 3), head_dim 64, batch 64, 16k": (3, 64, 3, 64, 16384),
}


@pytest.mark.skipif(not CUDA, reason="serving sizes: natively on a GPU only (the interpreter would take hours)")
@pytest.mark.parametrize("case", list(SERVING))
def test_decode_kernel_at_serving_sizes(case, seeded):
    """The issue's sizes on the GPU: GQA 7 and 8, contexts up to 32k, batch up to 256, DiffKV's default tiers with
    pruning, every page mode (mixed tiers, one tier, all pruned) and a staged tail, one layer."""
    heads, dim, gqa, batch, longest = SERVING[case]
    config = DiffKVConfig.from_dict({"page_size": 32, **PRUNING})
    store, table, lens = build(config, heads, dim, _serving_lens(batch, longest, seeded), layers=1)
    plan, _ = compare(store, table, lens, heads * gqa)
    assert plan.batch == batch


def test_requests_with_nothing_kept_give_zero(seeded):
    """A request whose every page is sealed and fully pruned attends over nothing: output 0, like the reference.
    (Only full pages are sealed, as the store does: the last page of a request always stays staged.)"""
    page, heads, dim = 16, 2, 32
    config = DiffKVConfig.from_dict({"page_size": page, "alpha_low": 0.5, "window": 0})
    store, table, lens = build(config, heads, dim, [48, 32], layers=1, staged_pages=0)
    store.release(table[1, :2])                             # re-seal request 1 with every token pruned
    store.stage(table[1, :2])
    locs = (table[1, :2, None] * page + torch.arange(page)).reshape(-1)
    store.write_tokens(0, locs, torch.randn(32, heads, dim), torch.randn(32, heads, dim))
    store.add_importance(0, locs, torch.zeros(32, heads), torch.ones(32))
    store.seal(table[1, :2], torch.full((2,), CONTEXT))
    assert int(store.tier_counts[table[1, :2]].sum()) == 0
    plan, _ = compare(store, table, lens, heads * 2, num_splits=2)
    out = plan.run(torch.randn(2, heads * 2, dim, device=DEVICE), 0)
    assert torch.all(out[1] == 0)


def test_plan_checks_and_fixed_capacity(seeded):
    page, heads, dim = 16, 2, 32
    store, table, lens = build(DiffKVConfig.from_dict({"page_size": page, **PRUNING}), heads, dim, [40, 20], layers=1,
                               staged_pages=2)
    store, table, lens = store.to(DEVICE), table.to(DEVICE), lens.to(DEVICE)
    plan = DecodePlan(store.view, heads, max_batch=2, max_pages=3, max_staged_pages=1)
    with pytest.raises(ValueError, match="max_staged_pages"):
        plan.plan(table, lens)
    with pytest.raises(ValueError, match="fewer pages"):
        DecodePlan(store.view, heads, max_batch=2, max_pages=3).plan(table[:, :1], lens)
    with pytest.raises(ValueError, match="exceed"):
        DecodePlan(store.view, heads, max_batch=1, max_pages=3).plan(table, lens)
    with pytest.raises(ValueError, match="multiple"):
        DecodePlan(store.view, 3, max_batch=2, max_pages=3)
    plan = DecodePlan(store.view, heads, max_batch=4, max_pages=8, max_staged_pages=2)
    with pytest.raises(RuntimeError, match="plan"):
        plan.run(torch.randn(2, heads, dim, device=DEVICE), 0)
    plan.plan(table, lens)
    with pytest.raises(ValueError, match="expected"):
        plan.run(torch.randn(2, heads + 1, dim, device=DEVICE), 0)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_run_is_capturable_in_a_cuda_graph(seeded):
    page, heads, dim = 32, 4, 128
    config = DiffKVConfig.from_dict({"page_size": page, **PRUNING, "key_rotation": "hadamard", "value_rotation": "hadamard"})
    store, table, lens = build(config, heads, dim, [700, 100, 1500], layers=1)
    store, table, lens = store.to(DEVICE), table.to(DEVICE), lens.to(DEVICE)
    plan = DecodePlan(store.view, heads * 4, max_batch=3, max_pages=table.shape[1], max_staged_pages=2)
    plan.plan(table, lens)
    q = torch.randn(3, heads * 4, dim, device=DEVICE)
    out = torch.empty_like(q)
    plan.run(q, 0, out=out)                                 # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.run(q, 0, out=out)
    expected = plan.run(q, 0)
    out.fill_(float("nan"))
    graph.replay()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_decode_step_through_the_wrapper_is_capturable(monkeypatch, seeded):
    """SGLang's decode-graph protocol on the core: a whole decode step (write each layer's new K/V, then attention)
    captured once through a DecodeAttentionWrapper of fixed capacities (batch, pages, staged pages), then replayed
    for two more steps, each after host-side work outside the graph: sealing pages (the first step seals each
    request's oldest staged page) and ``plan`` with the new lengths. One lane is padding, as in SGLang's padded
    graphs: request row of zeros, length 1, writing to and attending over a staged padding page 0. Outputs of the
    real lanes and the staged statistics equal an eager run of the same steps on a copy of the store, bit for
    bit."""
    page, heads, dim, gqa, layers = 32, 4, 128, 4, 2
    lens = [700, 100, 1500]
    store, table, _ = build(DiffKVConfig.from_dict({"page_size": page, **PRUNING}), heads, dim, lens, layers,
                            staged_pages=2)
    monkeypatch.setenv("DIFFKV_KERNELS", "auto")                            # CUDA stores run the kernels
    stores = {mode: store.to(DEVICE) for mode in ("graph", "eager")}
    for kernel_store in stores.values():
        assert kernel_store.kernels
        kernel_store.stage(torch.tensor([0]))                              # the padding page
    table = torch.cat([table, torch.zeros(1, table.shape[1], dtype=table.dtype)]).to(DEVICE)   # padded lane last
    lanes = len(lens) + 1
    oldest_staged = table[torch.arange(len(lens)), torch.tensor(lens) // page - 1]
    gen = torch.Generator().manual_seed(seeded)
    steps = [torch.tensor(lens + [1]) + i for i in range(3)]               # seq lens; the padded lane stays at 1
    steps = [torch.where(torch.arange(lanes) < len(lens), s, 1) for s in steps]
    shapes = [(layers, lanes, heads * gqa, dim), (layers, lanes, heads, dim), (layers, lanes, heads, dim)]  # q, k, v
    inputs = [[torch.randn(shape, generator=gen) for shape in shapes] for _ in steps]
    results = {}
    for mode, kernel_store in stores.items():
        wrapper = DecodeAttentionWrapper(kernel_store, heads * gqa, max_batch=lanes, max_pages=table.shape[1],
                                         max_staged_pages=3)
        q, k, v = (torch.empty(x.shape, device=DEVICE) for x in inputs[0])
        locs = torch.empty(lanes, dtype=torch.int64, device=DEVICE)
        out = torch.empty(layers, lanes, heads * gqa, dim, device=DEVICE)
        outputs = []

        def step():
            for layer in range(layers):
                kernel_store.write_tokens(layer, locs, k[layer], v[layer])
                wrapper.run(q[layer], layer, out=out[layer])

        for i, step_lens in enumerate(steps):
            if i == 1:                                                      # host-side work between replays
                kernel_store.seal(oldest_staged.to(DEVICE), torch.full((len(lens),), CONTEXT))
            for static, fresh in zip((q, k, v), inputs[i]):
                static.copy_(fresh)
            pos = step_lens.to(DEVICE) - 1
            locs.copy_(table[torch.arange(lanes, device=DEVICE), pos // page] * page + pos % page)
            wrapper.plan(table, step_lens.to(DEVICE))
            if mode == "graph" and i > 0:
                out.fill_(float("nan"))
                graph.replay()
            else:
                step()
            if mode == "graph" and i == 0:                                  # capture after the eager first step
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
            outputs.append(out[:, :len(lens)].clone())
        staged = kernel_store.page_state[table[:len(lens)]] == PageState.STAGED
        results[mode] = (outputs, [kernel_store.staged_importance(layer, table[:len(lens)][staged])
                                   for layer in range(layers)])
    assert torch.equal(stores["graph"].page_state, stores["eager"].page_state)
    for got, expected in zip(results["graph"][0], results["eager"][0]):
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for (score, seen), (ref_score, ref_seen) in zip(results["graph"][1], results["eager"][1]):
        assert torch.equal(score, ref_score) and torch.equal(seen, ref_seen)

def test_capacity_does_not_change_the_arithmetic(seeded):
    """A plan's capacities (the growing eager wrapper's against a CUDA graph's fixed ones) leave a request's splits,
    hence its float32 summation order, unchanged: the same batch gives bit-identical outputs and importance."""
    page, heads, dim = 16, 2, 32
    store, table, lens = build(DiffKVConfig.from_dict({"page_size": page}), heads, dim, [70, 37, 130], layers=1,
                               staged_pages=2)
    outs = []
    for max_batch, max_pages in ((3, table.shape[1]), (16, 4 * table.shape[1])):
        copy = store.to(DEVICE)
        plan = DecodePlan(copy.view, heads * 2, max_batch=max_batch, max_pages=max_pages, max_staged_pages=4)
        plan.plan(table.to(DEVICE), lens.to(DEVICE))
        q = torch.randn(3, heads * 2, dim, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
        staged = table[store.page_state[table] == PageState.STAGED].to(DEVICE)
        outs.append((plan.num_splits, plan.run(q, 0).cpu(), *(x.cpu() for x in copy.staged_importance(0, staged))))
    (splits_a, *a), (splits_b, *b) = outs
    assert splits_a == splits_b
    for x, y in zip(a, b):
        assert torch.equal(x, y)
