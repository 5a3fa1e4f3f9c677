import torch

from diffkv_sglang.config import DiffKVConfig
from diffkv_sglang.policy import (PRUNED, classify, classify_with_config, decode_importance, group_max,
                                  relative_importance, sealable_pages, window_importance, window_seen_counts)


def test_group_max_follows_gqa_grouping():
    # 4 query heads over 2 KV heads: heads 0,1 -> kv 0; heads 2,3 -> kv 1.
    probs = torch.tensor([[0.1, 0.9], [0.7, 0.3], [0.2, 0.2], [0.5, 0.4]])
    assert torch.equal(group_max(probs, 2), torch.tensor([[0.7, 0.9], [0.5, 0.4]]))


def test_prefill_is_max_of_sums_decode_is_sum_of_maxes():
    """The method reference's asymmetry: prefill max_j(sum_q p), decode sum_steps(max_j p)."""
    # two query heads in one group, two window queries, two keys
    probs = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],          # head 0: query 0 -> key 0, query 1 -> key 1
                          [[0.0, 1.0], [0.0, 1.0]]])         # head 1: both queries -> key 1
    assert torch.equal(window_importance(probs, 1), torch.tensor([[1.0, 2.0]]))      # max(1,0), max(1,2)
    steps = sum(decode_importance(probs[:, q], 1) for q in range(2))
    assert torch.equal(steps, torch.tensor([[1.0, 2.0]]))
    probs2 = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])
    assert torch.equal(window_importance(probs2, 1), torch.tensor([[2.0, 1.0]]))      # max(2,1), max(0,1)
    assert torch.equal(sum(decode_importance(probs2[:, q], 1) for q in range(2)), torch.tensor([[2.0, 1.0]]))


def test_seen_counts_are_min_of_remaining_and_window():
    # prompt of L = 6, window of the last W = 4 queries (positions 2..5): seen = min(L - i, W)
    seen = window_seen_counts(torch.arange(6), torch.arange(2, 6))
    assert seen.tolist() == [4, 4, 4, 3, 2, 1]


def test_diffkv_thresholds_hand_computed():
    """N = 100, DiffKV's alpha_high = 1, alpha_low = 0.02: mean attention 0.015 -> high, 0.005 -> low, 0.0001 ->
    pruned."""
    cfg = DiffKVConfig(alpha_prune=0.02)
    mean = torch.tensor([[0.015, 0.005, 0.0001, 0.01, 0.0002]])
    r = relative_importance(mean * 3, torch.full_like(mean, 3), torch.tensor(100))
    assert torch.allclose(r, mean * 100)
    # 0.01 * 100 = 1.0 is exactly alpha_high -> high tier; 0.0002 * 100 = 0.02 is exactly alpha_low -> kept (low)
    assert classify_with_config(r[None], cfg).tolist() == [[[0, 1, PRUNED, 0, 1]]]


def test_more_tiers_and_no_pruning():
    r = torch.tensor([[5.0, 1.5, 0.7, 0.2, 0.0]])
    assert classify(r, (2.0, 1.0, 0.5), alpha_prune=0.0).tolist() == [[0, 1, 2, 3, 3]]
    assert classify(r, (2.0, 1.0, 0.5), alpha_prune=0.3).tolist() == [[0, 1, 2, PRUNED, PRUNED]]


def test_layer_scope_prunes_only_where_every_head_agrees():
    r = torch.tensor([[0.01, 0.01, 3.0],
                      [0.01, 5.00, 0.01]])                   # [H=2, P=3]
    per_head = classify(r, (1.0,), 0.02, "head")
    per_layer = classify(r, (1.0,), 0.02, "layer")
    assert per_head.tolist() == [[PRUNED, PRUNED, 0], [PRUNED, 0, PRUNED]]
    assert per_layer.tolist() == [[PRUNED, 1, 0], [PRUNED, 0, 1]]


def test_unobserved_tokens_are_kept():
    r = relative_importance(torch.zeros(3), torch.zeros(3), torch.tensor(10))
    assert classify(r, (1.0,), 0.02).tolist() == [0, 0, 0]


def test_sealable_pages_protect_window_and_partial_page():
    seq = torch.tensor([0, 63, 64, 96, 200, 1000])
    assert sealable_pages(seq, page_size=32, window=64).tolist() == [0, 0, 0, 1, 4, 29]
    assert sealable_pages(seq, page_size=32, window=0).tolist() == [0, 1, 2, 3, 6, 31]
