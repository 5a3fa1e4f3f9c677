"""The DIFFKV_KERNELS switch (diffkv_sglang/backend_select.py) and the core running on the kernels.

The same operations replayed on two stores, one on the torch reference and one on the Triton kernels (the
interpreter on CPU), must leave byte-identical arenas and tables (seal, release, compaction), and the decode
wrapper must give the same outputs and staged-token importance on both (float32 rounding order apart), with
a per-layer softmax scale, GQA, rotation and a per-layer tier override, across batches that grow the kernel
plan's capacity. On a CUDA machine these tests skip (they need the interpreter); the test_kernel_* tests run the
kernels natively there.
"""

import logging
import math

import pytest
import torch

from diffkv_sglang.attention import DecodeAttentionWrapper
from diffkv_sglang.backend_select import KERNELS_ENV, kernel_mode, use_kernels
from diffkv_sglang.config import DiffKVConfig
from diffkv_sglang.store import CompressedKVStore, PageState
from decode_bound import error_bound
from kernel_stores import needs_interpreter

pytestmark = needs_interpreter      # every test here runs the kernels on CPU stores

P, D, LAYERS, HEADS = 16, 32, 2, 2
CONFIG = DiffKVConfig.from_dict({"page_size": P, "alpha_low": 0.02, "window": 0, "compaction_trigger": 0.0,
                                 "value_rotation": "hadamard",
                                 "layer_tiers": {1: ["k4v2g2", "k2v2"]}})


def test_mode_parsing(monkeypatch, caplog):
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    assert kernel_mode() == "auto"
    assert use_kernels("cuda", 128) and not use_kernels("cpu", 128)
    with caplog.at_level(logging.WARNING):
        assert not use_kernels("cuda", 80)                         # auto falls back for a head_dim the kernels lack
    assert "power-of-two head_dim" in caplog.text
    monkeypatch.setenv(KERNELS_ENV, "torch")
    assert not use_kernels("cuda", 128)
    monkeypatch.setenv(KERNELS_ENV, " Triton ")
    assert use_kernels("cpu", 64)
    with pytest.raises(ValueError, match="power-of-two"):
        use_kernels("cpu", 80)
    monkeypatch.setenv(KERNELS_ENV, "tpu")
    with pytest.raises(ValueError, match="auto, torch, triton, cuda"):
        kernel_mode()


def _three_way_importance(tokens: int, gen: torch.Generator) -> torch.Tensor:
    """Importance ``[tokens, HEADS]`` float32 that lands a third of the tokens in each class when sealed with a
    context of 100 (thresholds alpha_high/100 = 1e-2 and alpha_low/100 = 2e-4): tier 0, tier 1, pruned."""
    levels = torch.tensor([5e-2, 5e-3, 1e-5])
    jitter = 0.5 + torch.rand(tokens, HEADS, generator=gen)               # x0.5 .. x1.5 keeps each class
    return levels[torch.randint(0, 3, (tokens, HEADS), generator=gen)] * jitter


def _replay(seed: int, steps: list) -> tuple[CompressedKVStore, int]:
    """Build a store and apply ``steps`` (stage, write, importance, seal, release, compact) with inputs drawn
    from ``seed``: the same bytes whichever path the store uses. Returns the store and the bytes compacted."""
    gen = torch.Generator().manual_seed(seed)
    store = CompressedKVStore(CONFIG, LAYERS, HEADS, D, num_pages=16, arena_bytes=1 << 18, dtype=torch.bfloat16)
    store.arena.data.copy_(torch.randint(0, 256, store.arena.data.shape, generator=gen, dtype=torch.uint8))
    moved = 0
    for op, pages in steps:
        pages = torch.tensor(pages)
        if op == "stage":
            store.stage(pages)
            locs = (pages[:, None] * P + torch.arange(P)).reshape(-1)
            for layer in range(LAYERS):
                k, v = torch.randn(2, locs.numel(), HEADS, D, generator=gen) * 3
                store.write_tokens(layer, locs, k, v)
                store.add_importance(layer, locs, _three_way_importance(locs.numel(), gen), torch.ones(locs.numel()))
        elif op == "seal":
            store.seal(pages, torch.full((len(pages),), 100))
        elif op == "release":
            store.release(pages)
        elif op == "compact":
            moved += store.arena.compact(max_move_bytes=pages.item()).moved_bytes
    return store, moved


STEPS = [("stage", [1, 2, 3, 4, 5, 6]), ("seal", [2, 3, 5]), ("release", [1, 4]), ("compact", 4096),
         ("stage", [7, 8]), ("seal", [6, 7]), ("release", [3]), ("compact", 1 << 20)]


@pytest.mark.triton
def test_store_kernels_leave_the_same_bytes(monkeypatch, seeded):
    stores = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv(KERNELS_ENV, mode)
        stores[mode], moved = _replay(seeded, STEPS)
        assert stores[mode].kernels == (mode == "triton") and stores[mode].arena.kernels == (mode == "triton")
        assert moved > 0 and stores[mode].arena.fragmented_bytes == 0       # compactions moved blocks, then packed
    ref, got = stores["torch"], stores["triton"]
    counts = ref.tier_counts[ref.page_state == PageState.SEALED]
    assert (counts > 0).flatten(0, -2).any(0).all() and (counts.sum(-1) < P).any()   # every tier used, some pruned
    for name in ("data", "block_offset", "block_nbytes"):
        assert torch.equal(getattr(got.arena, name), getattr(ref.arena, name)), name
    assert torch.equal(got.tier_counts, ref.tier_counts) and torch.equal(got.page_state, ref.page_state)
    assert got.stats() == ref.stats()


@pytest.mark.triton
def test_decode_wrapper_kernels_match_torch(monkeypatch, seeded):
    steps = [("stage", [1, 2, 3, 4, 5, 6, 7, 8, 9]), ("seal", [1, 2, 4, 5, 7])]
    stores, wrappers = {}, {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv(KERNELS_ENV, mode)
        stores[mode], _ = _replay(seeded, steps)
    gqa = 3
    for mode in stores:
        wrappers[mode] = DecodeAttentionWrapper(stores[mode], num_q_heads=HEADS * gqa)
    # two batches: the second has more requests and pages than the first plan's capacity
    batches = [([[1, 2, 3]], [40]), ([[4, 5, 6], [7, 8], [9], [1, 2, 3]], [48, 20, 9, 41])]
    for tables, lens in batches:
        table = torch.nn.utils.rnn.pad_sequence([torch.tensor(t) for t in tables], batch_first=True)
        indices = torch.tensor([p for t in tables for p in t])
        staged = indices[stores["torch"].page_state[indices] == PageState.STAGED]
        for mode in wrappers:
            wrappers[mode].plan(table, torch.tensor(lens), sm_scale=0.2)
        for layer in range(LAYERS):
            q = torch.randn(len(lens), HEADS * gqa, D).to(torch.bfloat16)
            scale = None if layer == 0 else 0.05                          # plan's scale, then a per-layer one
            ref = wrappers["torch"].run(q, layer, sm_scale=scale)
            out = wrappers["triton"].run(q, layer, sm_scale=scale)
            assert out.dtype == q.dtype and out.shape == q.shape
            # the kernel's bound for a bfloat16 query over a bfloat16 store (tests/test_kernel_decode.py), plus
            # both sides rounding their float32 result to bfloat16 (2^-8 relative each)
            bound, logit_err = error_bound(stores["torch"], table, torch.tensor(lens), layer, q.float(),
                                           0.2 if scale is None else scale, 2 ** -11, ref.float(), staged_u=2 ** -8)
            err = (out.double() - ref.double()).abs()
            bound = bound + 2 ** -7 * ref.double().abs()
            assert torch.all(err.norm(dim=-1) <= bound.norm(dim=-1))        # per head: values are rotated
            score, seen = stores["triton"].staged_importance(layer, staged)
            ref_score, ref_seen = stores["torch"].staged_importance(layer, staged)
            torch.testing.assert_close(score, ref_score, rtol=math.expm1(2 * float(logit_err.max())) + 1e-5,
                                       atol=1e-7)
            assert torch.equal(seen, ref_seen)
    max_batch, max_pages = wrappers["triton"].capacity
    assert max_batch >= 4 and max_pages >= 3


@pytest.mark.triton
def test_decode_wrapper_kernels_float32_outputs(monkeypatch, seeded):
    """With float32 queries the outputs agree to float32 rounding (1e-5 of the largest output)."""
    steps = [("stage", [1, 2, 3, 4]), ("seal", [1, 2])]
    outs = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv(KERNELS_ENV, mode)
        store, _ = _replay(seeded, steps)
        wrapper = DecodeAttentionWrapper(store, num_q_heads=HEADS * 2)
        wrapper.plan(torch.tensor([[1, 2, 3], [4, 0, 0]]), torch.tensor([45, 16]))
        torch.manual_seed(seeded)
        outs[mode] = [wrapper.run(torch.randn(2, HEADS * 2, D), layer, sm_scale=0.3) for layer in range(LAYERS)]
    for ref, out in zip(outs["torch"], outs["triton"]):
        assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.triton
def test_decode_wrapper_run_writes_into_out(monkeypatch, seeded):
    """``run(out=)`` writes the result into ``out`` (what a captured CUDA graph replays) and returns it; it equals
    the result ``run`` allocates."""
    monkeypatch.setenv(KERNELS_ENV, "triton")
    store, _ = _replay(seeded, [("stage", [1, 2, 3]), ("seal", [1, 2])])
    wrapper = DecodeAttentionWrapper(store, num_q_heads=HEADS * 2)
    wrapper.plan(torch.tensor([[1, 2, 3]]), torch.tensor([40]))
    q = torch.randn(1, HEADS * 2, D)
    out = torch.full_like(q, float("nan"))
    assert wrapper.run(q, 0, out=out) is out
    wrapper.plan(torch.tensor([[1, 2, 3]]), torch.tensor([40]))        # the same batch: the same importance added
    torch.testing.assert_close(wrapper.run(q, 0), out, rtol=0, atol=0)
