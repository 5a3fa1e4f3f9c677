import pytest
import torch

from diffkv_sglang.config import DiffKVConfig
from diffkv_sglang.memory import ArenaOutOfMemory
from diffkv_sglang.store import CompressedKVStore, PageState

L, H, D, P = 3, 2, 32, 16


@pytest.fixture(autouse=True)
def _both_paths(kernels):
    """Every store test runs on the torch reference and on the Triton kernels (seal, compaction moves)."""


def make_store(config=None, num_pages=16, arena_bytes=1 << 22, dtype=torch.bfloat16):
    config = config or DiffKVConfig(page_size=P, alpha_prune=0.02)        # DiffKV's pruning: seals prune
    store = CompressedKVStore(config, num_layers=L, num_kv_heads=H, head_dim=D, num_pages=num_pages,
                              arena_bytes=arena_bytes, dtype=dtype)
    store.arena.data.random_(0, 256)                       # poison: nothing may rely on zeroed memory
    return store


def fill(store, pages):
    """Stage ``pages`` and write random K/V to every token in every layer. Returns k, v ``[L, n*P, H, D]``."""
    store.stage(pages)
    locs = (pages[:, None] * P + torch.arange(P)).reshape(-1)
    k = torch.randn(L, locs.numel(), H, D).to(store.dtype)
    v = torch.randn(L, locs.numel(), H, D).to(store.dtype)
    for layer in range(L):
        store.write_tokens(layer, locs, k[layer], v[layer])
    return locs, k, v


def as_pages(x, n):
    """``[n*P, H, D]`` token-major -> ``[n, H, P, D]`` page-major."""
    return x.reshape(n, P, H, -1).transpose(1, 2)


def test_staged_round_trip_is_exact(seeded):
    store = make_store()
    pages = torch.tensor([3, 1, 7])
    _, k, v = fill(store, pages)
    for layer in range(L):
        keys, values, present = store.read_pages(layer, pages)
        assert torch.equal(keys, as_pages(k[layer], 3).float()) and torch.equal(values, as_pages(v[layer], 3).float())
        assert present.all()
        score, seen = store.staged_importance(layer, pages)
        assert torch.all(score == 0) and torch.all(seen == 0)
    assert store.page_state[pages].tolist() == [PageState.STAGED] * 3


def test_planned_rows_write_what_per_layer_writes_do(seeded):
    """A batch's rows planned once for every layer (``token_rows(locs)``, what the backend passes each layer's
    write) put every byte where per-layer writes put it, and nothing else changes: a partial write over a
    poisoned arena, scattered slots in three pages, a float32 input cast like the model's bf16."""
    planned, per_layer = make_store(), make_store()
    per_layer.arena.data.copy_(planned.arena.data)
    pages = torch.tensor([6, 2, 9])
    for store in (planned, per_layer):
        store.stage(pages)
    locs = torch.tensor([6 * P + 3, 2 * P, 9 * P + P - 1, 2 * P + 5, 6 * P + 4])
    rows = planned.token_rows(locs)
    assert rows.shape == (L, locs.numel(), H) and rows.dtype == torch.int64
    for layer in range(L):
        assert torch.equal(rows[layer], planned.token_rows(locs, layer))
        k, v = torch.randn(locs.numel(), H * D), torch.randn(locs.numel(), H, D)
        planned.write_tokens(layer, locs, k, v, rows=rows)
        per_layer.write_tokens(layer, locs, k, v)
    assert torch.equal(planned.arena.data, per_layer.arena.data)
    keys, values, _ = planned.read_pages(L - 1, torch.tensor([9]))
    assert torch.equal(values[0, :, P - 1], v[2].to(torch.bfloat16).float())
    assert torch.equal(keys[0, :, P - 1], k[2].reshape(H, D).to(torch.bfloat16).float())


def test_seal_without_pruning_at_8_bits_is_close(seeded):
    store = make_store(DiffKVConfig.from_dict({"tiers": ["k8v8"], "alpha_low": 0, "page_size": P}))
    pages = torch.tensor([2, 5])
    locs, k, v = fill(store, pages)
    store.seal(pages, context_lens=torch.tensor([100, 100]))
    for layer in range(L):
        keys, values, present = store.read_pages(layer, pages)
        assert present.all()
        ref = as_pages(k[layer], 2).float()
        # per-token range / 255 / 2 (plus the float16 rounding of scale and zero)
        bound = (ref.amax(-1) - ref.amin(-1)) / 255 / 2 * 1.01 + 1e-3 * ref.abs().amax(-1)
        assert torch.all((keys - ref).abs() <= bound[..., None])
    assert (store.tier_counts[pages] == P).all()
    assert store.page_state[pages].tolist() == [PageState.SEALED] * 2
    store.arena.check_invariants()


def test_seal_classifies_from_accumulated_importance(seeded):
    """Tokens given attention above alpha_high/N go to tier 0, between go to tier 1, below alpha_low/N vanish."""
    store = make_store()
    pages = torch.tensor([4])
    locs, k, v = fill(store, pages)
    n_ctx = 200
    # relative importance r = score / seen * N: choose per token r in {5, 0.5, 0.001}
    r_target = torch.tensor([5.0, 0.5, 0.001, 5.0] * (P // 4))
    tiers_expected = torch.tensor([0, 1, -1, 0] * (P // 4), dtype=torch.int8)
    for layer in range(L):
        seen = torch.full((P,), 3.0)
        store.add_importance(layer, locs, (r_target / n_ctx * seen)[:, None].expand(P, H), seen)
    score, seen = store.staged_importance(0, pages)
    assert torch.allclose(score[0, 0] / seen[0, 0] * n_ctx, r_target)
    store.seal(pages, torch.tensor([n_ctx]))
    for layer in range(L):
        keys, values, present = store.read_pages(layer, pages)
        assert torch.equal(present[0], (tiers_expected >= 0).expand(H, P))
        assert torch.all(keys[0][~present[0]] == 0)
    assert store.tier_counts[4, 0, 0].tolist() == [P // 2, P // 4]
    stats = store.stats()
    assert stats.tokens_per_tier == (L * H * P // 2, L * H * P // 4)
    assert stats.pruned_tokens == L * H * P // 4
    assert stats.sealed_pages == 1 and stats.staged_pages == 0


def test_release_returns_every_byte(seeded):
    store = make_store()
    fill(store, torch.tensor([1, 2, 3]))
    store.seal(torch.tensor([2]), torch.tensor([64]))
    assert store.arena.used_bytes > 0
    store.release(torch.tensor([1, 2, 3]))
    store.release(torch.tensor([2]))                       # releasing twice is harmless
    assert store.arena.used_bytes == 0 and store.stats().used_bytes == 0
    assert (store.page_state == PageState.EMPTY).all()
    store.arena.check_invariants()


def test_stage_out_of_memory_changes_nothing(seeded):
    staged_page_bytes = L * H * make_store().formats.staged.nbytes
    store = make_store(arena_bytes=2 * staged_page_bytes + 100)
    fill(store, torch.tensor([1, 2]))
    before = (store.page_state.clone(), store.arena.used_bytes)
    with pytest.raises(ArenaOutOfMemory):
        store.stage(torch.tensor([3]))
    assert torch.equal(store.page_state, before[0]) and store.arena.used_bytes == before[1]
    with pytest.raises(ValueError, match="not EMPTY"):
        store.stage(torch.tensor([1]))


@pytest.mark.parametrize("headroom_pages", [0.0, 1.5])
def test_seal_succeeds_in_a_full_arena_and_writes_what_a_roomy_one_does(headroom_pages, seeded):
    """In place, a chunk's sealed blocks need room beside its staged ones; without it sealing goes on in halves
    and, for a single page that still does not fit, through a copy (freed first: a sealed block is never larger
    than a staged one), so it cannot run out of memory. Every path writes the same blocks as a roomy arena."""
    staged_page_bytes = L * H * make_store().formats.staged.nbytes
    pages = torch.tensor([5, 6, 7])
    stores = {}
    for name, arena_bytes in (("full", int((3 + headroom_pages) * staged_page_bytes)), ("roomy", 1 << 22)):
        store = stores[name] = make_store(arena_bytes=arena_bytes)
        torch.manual_seed(seeded)                          # after the poison, whose size differs
        locs, _, _ = fill(store, pages)
        for layer in range(L):
            store.add_importance(layer, locs, torch.rand(locs.numel(), H) / 50, torch.ones(locs.numel()))
    assert stores["full"].arena.free_bytes < (headroom_pages + 0.01) * staged_page_bytes
    for store in stores.values():
        store.seal(pages, torch.tensor([500, 500, 500]))
        store.arena.check_invariants()
    full, roomy = stores["full"], stores["roomy"]
    assert full.arena.free_bytes > staged_page_bytes      # K8V4 at head_dim 32 is 57 of 136 bytes per token
    assert torch.equal(full.tier_counts, roomy.tier_counts) and full.stats().sealed_bytes == roomy.stats().sealed_bytes
    for layer in range(L):
        for got, expected in zip(full.read_pages(layer, pages), roomy.read_pages(layer, pages)):
            assert torch.equal(got, expected)


def test_per_layer_override_and_rotation(seeded):
    config = DiffKVConfig.from_dict({"tiers": ["k4v2", "k2v2g2"], "alpha_low": 0, "page_size": P,
                                     "key_rotation": "hadamard", "layer_tiers": {"1": ["k8v8", "k8v4"]}})
    store = make_store(config)
    pages = torch.tensor([0, 9])
    locs, k, v = fill(store, pages)
    store.seal(pages, torch.tensor([40, 40]))                # unobserved tokens stay in tier 0
    errors = []
    for layer in range(L):
        keys, _, _ = store.read_pages(layer, pages)
        errors.append(float((keys - as_pages(k[layer], 2).float()).abs().mean()))
    assert errors[1] < errors[0] / 4 and errors[1] < errors[2] / 4      # 8-bit layer is far more precise
    assert errors[0] < 0.25                                              # 4-bit keys still track the data


def test_stats_ratio_counts_all_metadata():
    store = make_store(DiffKVConfig.from_dict({"tiers": ["k4v2"], "alpha_low": 0, "page_size": P}))
    pages = torch.arange(1, 9)
    fill(store, pages)
    store.seal(pages, torch.full((8,), 1000))
    stats = store.stats()
    per_token = 32 * 4 // 8 + 32 * 2 // 8 + 4 + 4 + 1                     # codes + 2 metas + index = 57 bytes
    block = -(-(P * per_token + 8) // 16) * 16
    expected_bytes = 8 * L * H * (block + store.descriptor_bytes_per_block)
    assert stats.sealed_bytes == 8 * L * H * block
    assert stats.compression_ratio == pytest.approx(8 * P * L * H * D * 4 / expected_bytes)
    assert 2.0 < stats.compression_ratio < D * 4 / per_token


def test_running_totals_match_a_table_scan_and_compaction_keeps_data(seeded):
    """stats() keeps running totals; after random stage/seal/release they equal a full scan, and bounded
    compaction steps move sealed blocks without changing what reads return."""
    store = make_store(DiffKVConfig.from_dict({"page_size": P, "compaction_trigger": 0.0}), num_pages=24)
    live = []
    for round_ in range(4):
        new = torch.tensor([p for p in torch.randperm(23).add(1).tolist() if p not in live][:5])
        locs, k, v = fill(store, new)
        for layer in range(L):
            store.add_importance(layer, locs, torch.rand(locs.numel(), H) / 50, torch.ones(locs.numel()))
        live += new.tolist()
        store.seal(new[:3], torch.full((3,), 100))
        drop = torch.tensor(live[: round_ + 1])
        store.release(drop)
        live = live[round_ + 1:]
        before = [store.read_pages(layer, torch.tensor(live)) for layer in range(L)]
        while store.maybe_compact() is not None:
            pass
        after = [store.read_pages(layer, torch.tensor(live)) for layer in range(L)]
        for b, a in zip(before, after):
            assert all(torch.equal(x, y) for x, y in zip(b, a))
        stats = store.stats()
        sealed = store.page_state == PageState.SEALED
        nbytes = store.block_nbytes(torch.arange(store.num_pages)).sum((1, 2))
        assert stats.sealed_bytes == int(nbytes[sealed].sum())
        assert stats.staged_bytes == int(nbytes[store.page_state == PageState.STAGED].sum())
        assert stats.tokens_per_tier == tuple(store.tier_counts.sum(dim=(0, 1, 2)).tolist())
        store.arena.check_invariants()
    assert store.compactions > 0 and store.arena.fragmented_bytes == 0


def test_to_copies_bytes_tables_and_allocation_state(seeded):
    """``store.to(device)`` (here the same device) is an independent copy that continues exactly where the store
    is: the same reads and stats, and the same next allocations (the arena's bump pointer and usage come along)."""
    store = make_store()
    fill(store, torch.tensor([1, 2, 3, 4]))
    store.add_importance(0, torch.arange(P, 2 * P), torch.rand(P, H), torch.ones(P))
    store.seal(torch.tensor([1, 2]), context_lens=torch.tensor([64, 64]))
    store.release(torch.tensor([1]))                                       # a hole below the bump pointer
    copy = store.to(store.device)
    assert copy.arena is not store.arena and copy.arena.data.data_ptr() != store.arena.data.data_ptr()
    assert (copy.arena.top, copy.arena.used_bytes, copy.arena.num_blocks) == \
           (store.arena.top, store.arena.used_bytes, store.arena.num_blocks)
    assert copy.stats() == store.stats() and copy.kernels == store.kernels
    for s in (store, copy):                                               # the same operations, the same results
        torch.manual_seed(seeded)
        fill(s, torch.tensor([5]))
        s.seal(torch.tensor([3]), context_lens=torch.tensor([64]))
    for name in ("data", "block_offset", "block_nbytes"):
        assert torch.equal(getattr(copy.arena, name), getattr(store.arena, name)), name
    assert torch.equal(copy.page_state, store.page_state) and torch.equal(copy.tier_counts, store.tier_counts)
    for layer in range(L):
        for got, expected in zip(copy.read_pages(layer, torch.tensor([2, 3, 4, 5])),
                                 store.read_pages(layer, torch.tensor([2, 3, 4, 5]))):
            assert torch.equal(got, expected)
