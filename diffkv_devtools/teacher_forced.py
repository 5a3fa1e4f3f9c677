"""Teacher-forced comparison of two KV pools through SGLang's ``/generate`` (test and benchmark support).

Exact greedy tokens are a poor judge of a KV pool: two attention implementations that differ only in rounding
flip a near-tie, and from then on every token differs. Teacher forcing feeds both pools the same tokens (the
dense pool's greedy reply) and compares, position by position, the distributions each pool predicts:

    reference = greedy_continuation(dense_server, prompt, 40)
    a = score(dense_server, prompt, reference)
    b = score(diffkv_server, prompt, reference)
    print(compare(a, b))          # |d logprob| of the reference tokens, margin-aware top-1 agreement, KL

:func:`score` sends the prompt alone first (its pages are cached and, for the DiffKV pool, sealed, i.e.
compressed, by a few decode steps), then prompt + continuation with ``return_logprob`` and ``top_logprobs_num``
from the prompt's last token on, so the continuation is scored against the cached (compressed) prompt. Within
the continuation attention is an exact prefill, so the comparison measures the prompt's compression, as a
decode step would see it after the prompt's pages were sealed.
"""

from __future__ import annotations

import dataclasses
import math

TOP_K = 10            # alternatives per position returned by the server (the KL bound below uses them)
SEAL_STEPS = 4        # decode steps after the prompt alone: they seal its pages outside the protected window


@dataclasses.dataclass(frozen=True)
class Scored:
    """One pool's teacher-forced view of ``continuation`` after ``prompt``: per continuation position ``t``,
    ``target[t]`` is the log-probability of ``continuation[t]`` and ``top[t]`` the ``TOP_K`` most likely
    ``(token id, log-probability)`` pairs, most likely first. ``cached_tokens``: prompt tokens the server
    reused from its radix cache for the scoring request."""

    continuation: tuple[int, ...]
    target: tuple[float, ...]
    top: tuple[tuple[tuple[int, float], ...], ...]
    cached_tokens: int


def greedy_continuation(server, prompt_ids: list[int], new_tokens: int, ignore_eos: bool = True) -> list[int]:
    """Greedy reply of (up to, without ``ignore_eos``) ``new_tokens`` token ids to ``prompt_ids``."""
    out = server.post("/generate", {"input_ids": prompt_ids, "sampling_params": {
        "max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": ignore_eos}})
    return out["output_ids"]


def score(server, prompt_ids: list[int], continuation: list[int], top_k: int = TOP_K) -> Scored:
    """Teacher-forced log-probabilities of ``continuation`` after ``prompt_ids`` (see the module docstring). The
    server's cache should not hold the prompt yet (flush it after :func:`greedy_continuation`): cached pages
    would keep the tiers that an earlier request's importance decided."""
    greedy_continuation(server, prompt_ids, SEAL_STEPS)
    out = server.post("/generate", {
        "input_ids": prompt_ids + continuation, "sampling_params": {"max_new_tokens": 1, "temperature": 0},
        "return_logprob": True, "logprob_start_len": len(prompt_ids) - 1, "top_logprobs_num": top_k})
    meta = out["meta_info"]
    n = len(continuation)
    # entry j is the token at position logprob_start_len + j and the distribution that predicted it; the first
    # entry is the prompt's last token, so the continuation's entries are the last n
    target = [lp for lp, _, *_ in meta["input_token_logprobs"][-n:]]
    ids = [tid for _, tid, *_ in meta["input_token_logprobs"][-n:]]
    top_entries = meta["input_top_logprobs"][-n:]
    if ids != list(continuation) or None in target or None in top_entries or len(top_entries) != n:
        raise AssertionError(f"input logprobs not aligned with the continuation: {ids[:8]} vs {continuation[:8]}")
    top = [tuple((tid, lp) for lp, tid, *_ in entries) for entries in top_entries]
    return Scored(tuple(continuation), tuple(target), tuple(top), meta.get("cached_tokens", 0))


@dataclasses.dataclass(frozen=True)
class Comparison:
    """``candidate`` against ``reference`` over the same continuation positions.

    Attributes:
        positions: positions compared.
        max_abs_logprob_diff / mean_abs_logprob_diff: ``|log p_ref(x_t) - log p_cand(x_t)|`` of the continuation's
            tokens ``x_t``, the largest and the mean over positions.
        decided: positions whose reference top-1 beats its top-2 by more than ``margin`` nats (decisions that a
            difference below the margin cannot flip).
        top1_disagreements: decided positions where the candidate's top-1 token differs from the reference's.
        mean_kl: mean over positions of a lower bound of ``KL(p_ref || p_cand)``: the KL of both distributions
            coarse-grained to the tokens in both top-k lists plus one bucket for all other tokens (coarse-graining
            never increases a KL divergence, so this is a lower bound; with near-equal distributions the shared
            tokens hold nearly all the mass and the bound is tight).
    """

    positions: int
    max_abs_logprob_diff: float
    mean_abs_logprob_diff: float
    decided: int
    top1_disagreements: int
    mean_kl: float

    def as_dict(self) -> dict:
        return {k: round(v, 5) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


def coarse_kl(reference: tuple[tuple[int, float], ...], candidate: tuple[tuple[int, float], ...]) -> float:
    """Lower bound of ``KL(p || q)`` from the top-k ``(token, log-prob)`` lists of ``p`` and ``q`` (see
    :class:`Comparison`)."""
    q = dict(candidate)
    shared = [(math.exp(lp), math.exp(q[tid])) for tid, lp in reference if tid in q]
    p_rest = max(1.0 - sum(p for p, _ in shared), 0.0)
    q_rest = max(1.0 - sum(c for _, c in shared), 1e-12)
    kl = sum(p * math.log(p / c) for p, c in shared if p > 0)
    return max(kl + (p_rest * math.log(p_rest / q_rest) if p_rest > 0 else 0.0), 0.0)


def compare(reference: list[Scored] | Scored, candidate: list[Scored] | Scored, margin: float = 0.0) -> Comparison:
    """Compare two pools' teacher-forced scores of the same continuations (one :class:`Scored` or a list of them,
    one per prompt, in the same order); ``margin`` in nats (see :class:`Comparison`)."""
    reference = [reference] if isinstance(reference, Scored) else reference
    candidate = [candidate] if isinstance(candidate, Scored) else candidate
    diffs, kls, decided, flips = [], [], 0, 0
    for ref, cand in zip(reference, candidate, strict=True):
        if ref.continuation != cand.continuation:
            raise ValueError("the two pools scored different continuations")
        diffs += [abs(a - b) for a, b in zip(ref.target, cand.target)]
        for top_ref, top_cand in zip(ref.top, cand.top):
            kls.append(coarse_kl(top_ref, top_cand))
            if top_ref[0][1] - top_ref[1][1] > margin:
                decided += 1
                flips += top_ref[0][0] != top_cand[0][0]
    return Comparison(len(diffs), max(diffs), sum(diffs) / len(diffs), decided, flips, sum(kls) / len(kls))
