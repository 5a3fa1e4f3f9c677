"""Decode attention on the packed codes (diffkv_sglang/cpu_attention.py, the decode path off the kernels) against the
float64 dense reference over what the store holds.

Fresh random stores (``kernel_stores.build``: per page mixed tiers, one tier only, or every token pruned; the last
page of each request staged), then changed so that a batch also holds a sealed page only partly inside its
request's length, a column beyond a request's pages (a written staged page) and an EMPTY page; every tier format
the config allows (bits 8/4/2, quantization groups, per-channel keys, Hadamard rotation of keys and/or values, 1 to
4 tiers, a per-layer override); GQA groups of 1 and 3. Per-channel key tiers come out full, partial and empty
(the metadata section absent) in some blocks; that one of these cases is missing has odds below 1e-4 (about 45
sealed (page, layer) draws).

Tolerances. Against attention over the *dequantized* K/V (``store.read_pages``, float32) the path differs only in
float32 rounding: codes (< 256) are exact in float32, and the scale and zero point are applied around float32
products instead of before them (per-channel keys: ``code * scale + zero`` before, the same float32 operations as
the reference's, the meta scale around), so each logit and output element moves by a few float32 ulps of the
magnitudes summed (``|q| |k|`` terms of size ~10 here): ``atol = 1e-5``, as the existing reference tests use.
Against the original K/V the rigorous perturbation bound of ``tests/test_attention.py`` (logit error ``delta =
sigma |q|_1 max |k - k_hat|``, output ``max |v - v_hat| + (e^(2 delta) - 1) max |v|``) bounds the quantization
error of every bit width. Importance: the staged tokens' ``score_sum`` is the group max of the same probabilities
(``atol 1e-6``, probabilities <= 1) and ``seen`` counts the decode steps exactly.
"""

import math

import pytest
import torch

from diffkv_sglang import cpu_attention
from diffkv_sglang.attention import DecodeAttentionWrapper
from diffkv_sglang.config import DiffKVConfig
from diffkv_sglang.policy import group_max
from diffkv_sglang.store import PageState
from kernel_stores import PRUNING, build

P, D, LAYERS = 16, 32, 3

TIER_OPTIONS = {
    "k8v8": {"tiers": ["k8v8"]},
    "k8v4-k4v2": {"tiers": ["k8v4", "k4v2"], "alpha_high": 1.0, **PRUNING},
    "groups-hadamard": {"tiers": ["k8v4g2", "k4v2g2x4"], "alpha_high": 1.0, **PRUNING,
                        "key_rotation": "hadamard", "value_rotation": "hadamard"},
    "four-tiers-2bit": {"tiers": ["k8v8", "k8v4g2x1", "k4v4g1x2", "k2v2g4"], "thresholds": [2.0, 1.0, 0.5],
                        **PRUNING, "key_rotation": "hadamard"},
    "per-layer": {"tiers": ["k4v2", "k2v2g2"], "alpha_high": 1.0, "value_rotation": "hadamard",
                  "layer_tiers": {"1": ["k8v8", "k8v4g4x2"]}},
    "channel-keys": {"tiers": ["k8v4", "k4v2+kc"], "alpha_high": 1.0, **PRUNING,
                     "layer_tiers": {"2": ["k8v4+kc", "k2v2+kc"]}},
    "channel-3-tiers-hadamard": {"tiers": ["k8v4+kc", "k4v2g2x4", "k2v2+kc"], "thresholds": [2.0, 0.5], **PRUNING,
                                 "key_rotation": "hadamard", "value_rotation": "hadamard"},
}


@pytest.fixture(autouse=True)
def _torch_path(torch_reference):
    """These tests are about the path off the kernels, whatever DIFFKV_KERNELS says outside."""


def _held(store, pages, seq_len, layer):
    """What the store holds for a request: K, V ``[T, H, D]`` (dequantized) and keep mask ``[H, T]``."""
    keys, values, present = store.read_pages(layer, pages)                   # [n, H, P(, D)]
    flat = lambda x: x.transpose(0, 1).reshape(store.num_kv_heads, -1, *x.shape[3:])[:, :seq_len]   # noqa: E731
    return flat(keys).transpose(0, 1), flat(values).transpose(0, 1), flat(present)


@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["all-layers-at-once", "layer-by-layer"])
@pytest.mark.parametrize("gqa", [1, 3])
@pytest.mark.parametrize("option", sorted(TIER_OPTIONS))
def test_decode_on_codes_matches_dense_reference(option, gqa, chunk_bytes, seeded, reference_attention, monkeypatch):
    """Layers run out of order (1, 0, 2), so a chunk is gathered for a layer after its first."""
    if chunk_bytes is not None:
        monkeypatch.setattr(cpu_attention, "GATHER_CHUNK_BYTES", chunk_bytes)
    heads = 2
    config = DiffKVConfig.from_dict({**TIER_OPTIONS[option], "page_size": P, "window": 0})
    store, table, seq_lens = build(config, heads, D, [70, 50, 33, 90, 20], layers=LAYERS)
    seq_lens[1] = 2 * P + P // 2              # its third (sealed) page half inside, the staged fourth beyond it
    store.release(table[3, 2:3])              # an EMPTY page inside request 3
    wrapper = DecodeAttentionWrapper(store, num_q_heads=heads * gqa)
    wrapper.plan(table, seq_lens)
    q = torch.randn(len(seq_lens), heads * gqa, D)
    staged = [table[b][store.page_state[table[b]] == PageState.STAGED] for b in range(len(seq_lens))]
    for layer in (1, 0, 2):
        before = [store.staged_importance(layer, pages) for pages in staged]
        scale = D ** -0.5 * (1 + layer / 4)
        out = wrapper.run(q, layer, sm_scale=scale)
        for b, n in enumerate(seq_lens.tolist()):
            pages = table[b, :math.ceil(n / P)]
            k_hat, v_hat, keep = _held(store, pages, n, layer)
            ref, probs = reference_attention(q[b:b + 1], k_hat, v_hat, torch.tensor([n - 1]), keep=keep, sm_scale=scale)
            ref, probs = ref.nan_to_num(0.0), probs.nan_to_num(0.0)        # every key pruned: zeros, as documented
            assert torch.allclose(out[b].double(), ref[0], atol=1e-5, rtol=0), (option, b)
            # staged tokens (visible ones) got the group max of their probability, and one more observation
            score, seen = store.staged_importance(layer, staged[b])
            columns = torch.cat([torch.arange(P) + int((table[b] == p).nonzero()) * P for p in staged[b].tolist()])
            visible = columns < n
            gained = (score - before[b][0]).transpose(0, 1).reshape(heads, -1)
            expected = group_max(probs[:, 0].float(), heads)[:, columns[visible]]
            assert torch.allclose(gained[:, visible], expected, atol=1e-6)
            added = (seen - before[b][1]).transpose(0, 1).reshape(heads, -1)
            assert torch.all(added[:, visible] == 1) and torch.all(gained[:, ~visible] == 0)


def test_every_key_pruned_gives_zeros_and_an_empty_batch_runs(seeded):
    config = DiffKVConfig.from_dict({"tiers": ["k8v4", "k4v2"], "alpha_high": 1.0, "alpha_low": 0.5, "page_size": P})
    store, table, seq_lens = build(config, 1, D, [P], layers=1)                  # one staged page
    store.add_importance(0, table[0, 0] * P + torch.arange(P), torch.zeros(P, 1), torch.ones(P), accumulate=False)
    store.seal(table[0], torch.tensor([P]))               # no attention received: every token pruned
    assert int(store.tier_counts[table[0]].sum()) == 0
    wrapper = DecodeAttentionWrapper(store, num_q_heads=2)
    wrapper.plan(table, seq_lens)
    assert torch.equal(wrapper.run(torch.randn(1, 2, D), 0), torch.zeros(1, 2, D))
    wrapper.plan(torch.zeros(0, 1, dtype=torch.int64), torch.tensor([], dtype=torch.int64))
    assert wrapper.run(torch.randn(0, 2, D), 0).shape == (0, 2, D)


def test_blocks_moved_between_plan_and_run_are_found(seeded, reference_attention):
    """A compaction after plan() moves the batch's blocks: run() notices and plans again."""
    config = DiffKVConfig.from_dict({"tiers": ["k8v4", "k4v2"], "page_size": P, "compaction_trigger": 0.0})
    store, table, seq_lens = build(config, 2, D, [40, 70], layers=1)
    store.release(table[0])                                # holes below request 1's blocks
    wrapper = DecodeAttentionWrapper(store, num_q_heads=2)
    wrapper.plan(table[1:], seq_lens[1:])
    moved = store.arena.block_offset.clone()
    store.arena.compact()
    assert not torch.equal(moved, store.arena.block_offset)
    q = torch.randn(1, 2, D)
    k_hat, v_hat, keep = _held(store, table[1, :5], 70, 0)
    ref, _ = reference_attention(q, k_hat, v_hat, torch.tensor([69]), keep=keep)
    assert torch.allclose(wrapper.run(q, 0).double(), ref, atol=1e-5, rtol=0)
