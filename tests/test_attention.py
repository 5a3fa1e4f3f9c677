import math

import pytest
import torch

from diffkv_sglang.attention import DecodeAttentionWrapper, ExtendAttentionWrapper
from diffkv_sglang.config import DiffKVConfig
from diffkv_sglang.policy import group_max, window_seen_counts
from diffkv_sglang.store import CompressedKVStore

P, D = 16, 32


def make_store(config, heads, layers=2, num_pages=64):
    store = CompressedKVStore(config, num_layers=layers, num_kv_heads=heads, head_dim=D, num_pages=num_pages,
                              arena_bytes=1 << 23, dtype=torch.float32)
    store.arena.data.random_(0, 256)
    return store


@pytest.fixture(autouse=True)
def _both_paths(kernels):
    """Every test runs on the torch reference and on the Triton kernels (decode attention, seal)."""


class Request:
    """A request's pages and the K/V it wrote (positions = token index)."""

    def __init__(self, store, pages, seq_len):
        self.pages, self.seq_len = torch.tensor(pages), seq_len
        store.stage(self.pages)
        self.locs = (self.pages[:, None] * P + torch.arange(P)).reshape(-1)[:seq_len]
        layers, heads = store.num_layers, store.num_kv_heads
        self.k = torch.randn(layers, seq_len, heads, D) * 2
        self.v = torch.randn(layers, seq_len, heads, D)
        for layer in range(layers):
            store.write_tokens(layer, self.locs, self.k[layer], self.v[layer])


def page_table(requests):
    """``[B, max_pages]`` the requests' pages, padded with page 0 (ignored past each request's pages)."""
    width = max(len(r.pages) for r in requests)
    return torch.stack([torch.nn.functional.pad(r.pages, (0, width - len(r.pages))) for r in requests])


def kept_and_dequantized(store, req, layer):
    """What the store holds for the request: K, V ``[T, H, D]`` and keep mask ``[H, T]``."""
    keys, values, present = store.read_pages(layer, req.pages)
    t = req.seq_len
    k = keys.permute(0, 2, 1, 3).reshape(-1, store.num_kv_heads, D)[:t]
    v = values.permute(0, 2, 1, 3).reshape(-1, store.num_kv_heads, D)[:t]
    return k, v, present.permute(1, 0, 2).reshape(store.num_kv_heads, -1)[:, :t]


@pytest.mark.parametrize("gqa", [1, 3, 4])
def test_decode_over_staged_pages_is_exact(gqa, seeded, reference_attention):
    heads = 2
    store = make_store(DiffKVConfig(page_size=P), heads)
    reqs = [Request(store, [1, 2, 3], 40), Request(store, [7], 5), Request(store, [9, 4], 32)]
    wrapper = DecodeAttentionWrapper(store, num_q_heads=heads * gqa)
    wrapper.plan(page_table(reqs), torch.tensor([r.seq_len for r in reqs]))
    q = torch.randn(len(reqs), heads * gqa, D)
    for layer in range(2):
        out = wrapper.run(q, layer)
        for b, r in enumerate(reqs):
            ref, _ = reference_attention(q[b:b + 1], r.k[layer], r.v[layer], torch.tensor([r.seq_len - 1]))
            assert torch.allclose(out[b].double(), ref[0], atol=1e-5, rtol=0)       # float32 arithmetic only


def _logit_and_value_bounds(q, k, k_hat, v, v_hat, sm_scale):
    """Rigorous perturbation bound: logits move by at most delta = scale * |q|_1 * max|k - k_hat|;
    then |out - ref| <= max|v - v_hat| + (exp(2 delta) - 1) * max|v|."""
    delta = sm_scale * q.abs().sum(-1).max() * (k - k_hat).abs().max()
    return float((v - v_hat).abs().max() + (math.exp(2 * delta) - 1) * v.abs().max())


def test_decode_8_bit_no_pruning_matches_dense(seeded, reference_attention):
    heads, gqa = 2, 4
    store = make_store(DiffKVConfig.from_dict({"tiers": ["k8v8"], "alpha_low": 0, "page_size": P, "window": 0}), heads)
    req = Request(store, [3, 8, 5, 6], 64)
    store.seal(req.pages, torch.tensor([64] * 4))
    wrapper = DecodeAttentionWrapper(store, num_q_heads=heads * gqa)
    wrapper.plan(page_table([req]), torch.tensor([req.seq_len]))
    q = torch.randn(1, heads * gqa, D)
    for layer in range(2):
        out = wrapper.run(q, layer)
        ref, _ = reference_attention(q, req.k[layer], req.v[layer], torch.tensor([63]))
        k_hat, v_hat, keep = kept_and_dequantized(store, req, layer)
        assert keep.all()
        bound = _logit_and_value_bounds(q, req.k[layer], k_hat, req.v[layer], v_hat, D ** -0.5)
        err = float((out.double() - ref).abs().max())
        assert err <= bound, (err, bound)
        assert err / float(ref.abs().max()) < 0.05       # 8-bit codes: a few per cent at most, far from noise


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_decode_with_pruning_equals_attention_over_kept_tokens(rotation, seeded, reference_attention):
    heads, gqa = 3, 3
    cfg = DiffKVConfig.from_dict({"tiers": ["k8v4", "k4v2"], "alpha_high": 1.0, "alpha_low": 0.5, "page_size": P,
                                  "key_rotation": rotation, "value_rotation": rotation})
    store = make_store(cfg, heads)
    req = Request(store, [10, 11, 12], 48)
    sealed = req.pages[:2]
    for layer in range(2):                                  # random importance: a mix of tiers and pruning
        seen = torch.full((32,), 2.0)
        store.add_importance(layer, req.locs[:32], torch.rand(32, heads) * 2 / 48 * 2, seen)
    store.seal(sealed, torch.tensor([48, 48]))
    wrapper = DecodeAttentionWrapper(store, num_q_heads=heads * gqa)
    wrapper.plan(page_table([req]), torch.tensor([48]))
    q = torch.randn(1, heads * gqa, D)
    for layer in range(2):
        out = wrapper.run(q, layer)
        k_hat, v_hat, keep = kept_and_dequantized(store, req, layer)
        assert 0 < int((~keep).sum()) < keep.numel()        # some pruned, some kept
        exact, _ = reference_attention(q, k_hat, v_hat, torch.tensor([47]), keep=keep)
        assert torch.allclose(out.double(), exact, atol=1e-5, rtol=0)
        orig, _ = reference_attention(q, req.k[layer], req.v[layer], torch.tensor([47]), keep=keep)
        k_orig = torch.where(keep.T[..., None], req.k[layer], k_hat)   # bound only over kept tokens
        v_orig = torch.where(keep.T[..., None], req.v[layer], v_hat)
        bound = _logit_and_value_bounds(q, k_orig, k_hat, v_orig, v_hat, D ** -0.5)
        assert float((out.double() - orig).abs().max()) <= bound


def test_decode_accumulates_group_max_into_staged_tokens(seeded, reference_attention):
    heads, gqa = 2, 3
    store = make_store(DiffKVConfig(page_size=P), heads, layers=1)
    req = Request(store, [1, 2], 20)
    wrapper = DecodeAttentionWrapper(store, num_q_heads=heads * gqa)
    wrapper.plan(page_table([req]), torch.tensor([20]))
    q = torch.randn(1, heads * gqa, D)
    wrapper.run(q, 0)
    wrapper.run(q, 0)
    _, probs = reference_attention(q, req.k[0], req.v[0], torch.tensor([19]))        # [Hq, 1, T]
    expected = 2 * group_max(probs[:, 0].float(), heads)                             # [H, T]
    score, seen = store.staged_importance(0, req.pages)
    score = score.permute(1, 0, 2).reshape(heads, -1)[:, :20]
    seen = seen.permute(1, 0, 2).reshape(heads, -1)[:, :20]
    assert torch.allclose(score, expected, atol=1e-6)
    assert torch.all(seen == 2)


@pytest.mark.parametrize("gqa", [1, 4])
def test_extend_with_sealed_prefix_and_window_scores(gqa, seeded, reference_attention):
    """Two requests extend over a compressed prefix: outputs are causal attention over what the store holds,
    and the last obs_window queries record max-over-group of summed probabilities into staged tokens."""
    heads, window = 2, 6
    cfg = DiffKVConfig.from_dict({"tiers": ["k8v8"], "alpha_low": 0, "page_size": P, "obs_window": window})
    store = make_store(cfg, heads)
    a = Request(store, [20, 21, 22], 45)                    # prefix 32 tokens (2 sealed pages) + 13 new
    b = Request(store, [30, 31], 19)                        # no prefix: 19 new tokens
    store.seal(a.pages[:2], torch.tensor([32, 32]))
    extend = torch.tensor([13, 19])
    qo_indptr = torch.tensor([0, 13, 32])
    wrapper = ExtendAttentionWrapper(store, num_q_heads=heads * gqa)
    wrapper.plan(qo_indptr, page_table([a, b]), torch.tensor([45, 19]))
    q = torch.randn(32, heads * gqa, D)
    for layer in range(2):
        out = wrapper.run(q, layer)
        for i, r in enumerate((a, b)):
            k_hat, v_hat, keep = kept_and_dequantized(store, r, layer)
            q_pos = torch.arange(r.seq_len - extend[i], r.seq_len)
            rows = slice(int(qo_indptr[i]), int(qo_indptr[i + 1]))
            ref, probs = reference_attention(q[rows], k_hat, v_hat, q_pos, keep=keep)
            assert torch.allclose(out[rows].double(), ref, atol=1e-5, rtol=0)
            # importance of staged tokens: window = the last `window` queries of the chunk
            score, seen = store.staged_importance(layer, r.pages)
            staged_from = 32 if r is a else 0
            flat = lambda x: x.permute(1, 0, 2).reshape(heads, -1)[:, staged_from:r.seq_len]   # noqa: E731
            expected = group_max(probs[:, -window:].sum(1).float(), heads)[:, staged_from:]
            assert torch.allclose(flat(score), expected, atol=1e-5)
            expected_seen = window_seen_counts(torch.arange(staged_from, r.seq_len), q_pos[-window:])
            assert torch.equal(flat(seen), expected_seen.expand(heads, -1))


def test_plan_rejects_too_few_pages():
    store = make_store(DiffKVConfig(page_size=P), 1, layers=1)
    with pytest.raises(ValueError, match="fewer pages"):
        DecodeAttentionWrapper(store, num_q_heads=1).plan(torch.tensor([[1]]), torch.tensor([17]))
    with pytest.raises(RuntimeError, match="plan"):
        DecodeAttentionWrapper(store, num_q_heads=1).run(torch.randn(1, 1, D), 0)
    with pytest.raises(ValueError, match="num_q_heads=3 must be a positive multiple of num_kv_heads=2"):
        DecodeAttentionWrapper(make_store(DiffKVConfig(page_size=P), 2, layers=1), num_q_heads=3)


def test_extend_window_replaces_and_decode_accumulates(seeded, reference_attention):
    """A later extend's window overwrites the statistics (last observation window decides); decode adds."""
    heads = 2
    store = make_store(DiffKVConfig.from_dict({"page_size": P, "obs_window": 4}), heads, layers=1)
    req = Request(store, [5, 6], 20)
    wrapper = ExtendAttentionWrapper(store, num_q_heads=heads)
    wrapper.plan(torch.tensor([0, 8]), page_table([req]), torch.tensor([20]))
    for _ in range(2):                                       # two different chunks observing the same tokens
        q = torch.randn(8, heads, D)
        wrapper.run(q, 0)
    _, probs = reference_attention(q, req.k[0], req.v[0], torch.arange(12, 20))
    score, seen = store.staged_importance(0, req.pages)
    flat = lambda x: x.permute(1, 0, 2).reshape(heads, -1)[:, :20]           # noqa: E731
    assert torch.allclose(flat(score), group_max(probs[:, -4:].sum(1).float(), heads), atol=1e-5)
    assert flat(seen).max() == 4
    decode = DecodeAttentionWrapper(store, num_q_heads=heads)
    decode.plan(page_table([req]), torch.tensor([20]))
    decode.run(torch.randn(1, heads, D), 0)
    assert flat(store.staged_importance(0, req.pages)[1]).max() == 5
