"""Token importance and tier classification (DiffKV's policy, per request / layer / KV head).

Importance is the attention a token receives, tracked per KV head as two numbers per staged token:
``score_sum`` (attention mass accumulated so far) and ``seen`` (how many queries contributed).

* Prefill (and every extend chunk): the last ``obs_window`` queries of the chunk observe; each KV head takes
  the **max over its GQA query heads of the per-head sum over window queries**; ``seen`` grows by the number of
  window queries that can see the token causally (``min(L - i, W)`` for a whole prompt of ``L`` tokens).
* Decode: every step adds the **max over the GQA query heads** of that step's probability; ``seen`` grows by 1.

At sealing time, ``relative importance r = score_sum / seen * N`` (``N``: the request's context length) compares
the token's mean attention with the uniform share ``1 / N``. :func:`classify` maps ``r`` to a tier or to pruning
with the config's thresholds (DiffKV: ``alpha_low / N`` and ``alpha_high / N``).
"""

from __future__ import annotations

import torch

from .config import DiffKVConfig

PRUNED = -1


def group_max(per_query_head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Max over the query heads of each GQA group.

    Args:
        per_query_head: ``[..., Hq, N]`` float, query heads grouped contiguously (head ``h`` serves KV head
            ``h // (Hq / Hkv)``, as in SGLang and HF models).
    Returns:
        ``[..., Hkv, N]``.
    """
    num_q_heads = per_query_head.shape[-2]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads cannot be grouped over {num_kv_heads} KV heads")
    grouped = per_query_head.reshape(*per_query_head.shape[:-2], num_kv_heads, num_q_heads // num_kv_heads, -1)
    return grouped.amax(-2)


def window_importance(window_probs: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Prefill importance of one request: sum over observation queries, then max over the GQA group.

    Args:
        window_probs: ``[Hq, W, N]`` softmax probabilities of the ``W`` observation queries (0 where masked).
    Returns:
        ``[Hkv, N]`` float32 score sums.
    """
    return group_max(window_probs.float().sum(-2), num_kv_heads)


def decode_importance(step_probs: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """One decode step's contribution: ``[..., Hq, N]`` probabilities -> ``[..., Hkv, N]`` (max over the group)."""
    return group_max(step_probs.float(), num_kv_heads)


def window_seen_counts(key_positions: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """How many observation queries see each key causally: ``#{q : q_pos >= k_pos}``.

    Args:
        key_positions: ``[N]`` int positions; query_positions: ``[W]`` int positions of the window queries.
    Returns:
        ``[N]`` float32 counts (``min(L - i, W)`` for the last ``W`` queries of an ``L``-token prompt).
    """
    return (query_positions[None, :] >= key_positions[:, None]).sum(-1).to(torch.float32)


def relative_importance(score_sum: torch.Tensor, seen: torch.Tensor, context_len: torch.Tensor) -> torch.Tensor:
    """``r = score_sum / seen * N``: mean attention relative to uniform (1.0 = uniform).

    Shapes broadcast; ``context_len`` is per request (e.g. ``[n, 1, 1]`` against ``[n, H, P]`` scores). Tokens
    never observed (``seen == 0``) get ``r = inf`` so they are kept in the first tier rather than pruned blindly.
    """
    mean = score_sum.float() / seen.float()
    return torch.where(seen > 0, mean * context_len.float(), torch.full_like(mean, float("inf")))


def classify(r: torch.Tensor, thresholds: tuple[float, ...], alpha_prune: float, prune_scope: str = "head") -> torch.Tensor:
    """Tier per token from relative importance.

    Args:
        r: ``[..., H, P]`` relative importance (H: KV heads of one layer, P: tokens).
        thresholds: non-increasing tier thresholds (``len(tiers) - 1`` values).
        alpha_prune: prune where ``r < alpha_prune`` (0 disables pruning).
        prune_scope: ``"head"`` (each head decides) or ``"layer"`` (prune only where every head of the layer
            would; elsewhere such tokens go to the last tier).
    Returns:
        ``[..., H, P]`` int8: tier index, or ``PRUNED`` (-1).
    """
    tier = torch.zeros(r.shape, dtype=torch.int8, device=r.device)
    for threshold in thresholds:
        tier += (r < threshold).to(torch.int8)
    prune = r < alpha_prune
    if prune_scope == "layer":
        prune = prune.all(dim=-2, keepdim=True).expand_as(prune)
    elif prune_scope != "head":
        raise ValueError(f"prune_scope={prune_scope!r}; allowed: 'head', 'layer'")
    return torch.where(prune, torch.full_like(tier, PRUNED), tier)


def classify_with_config(r: torch.Tensor, config: DiffKVConfig) -> torch.Tensor:
    """:func:`classify` with the thresholds of ``config``."""
    return classify(r, config.thresholds, config.alpha_prune, config.prune_scope)


def sealable_pages(seq_len: torch.Tensor, page_size: int, window: int) -> torch.Tensor:
    """Number of leading pages of a request whose tokens are all older than the protected window.

    Args:
        seq_len: ``[B]`` int tokens in each request.
    Returns:
        ``[B]`` int64: pages ``[0, result)`` may be sealed; the last ``window`` tokens and the incomplete last
        page always stay staged.
    """
    return torch.clamp(seq_len.to(torch.int64) - window, min=0) // page_size
