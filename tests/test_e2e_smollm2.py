"""The real SmolLM2-135M-Instruct through SGLang: DiffKV against dense, teacher-forced (server tests).

Exact greedy tokens are not compared: SGLang's dense pool attends in bf16 and ours in float32, so a near-tie can
flip on one CPU and not on another, and every later token then differs. Instead the dense pool's greedy reply to
each prompt is fed to every pool, and the log-probabilities each pool predicts along it are compared
(``teacher_forced.py``). Pages are 16 tokens and the protected window 16 tokens, so most of every prompt is sealed
(compressed) before the continuation is scored.

The K8V8 bound (no pruning, 8-bit keys and values), derived from the bit widths:

* 8-bit per-token min/max quantization moves an element by at most half a step, ``range / 510 <=
  max|x| / 255``: about one bf16 unit roundoff (``2**-8``) of the vector's largest element.
* SGLang's dense pool (``torch_native``: SDPA on bf16 tensors) rounds its attention probabilities to bf16 before
  ``P @ V``, one unit roundoff per element of one operand; ``ours-dense`` (our pool with nothing sealed) attends
  in float32 over the same bf16 K/V. That pair is the *precision control*, measured in the same run on the same
  CPU: how far one unit roundoff in attention moves this model's log-probabilities.
* K8V8 perturbs two operands (keys and values) by at most one unit roundoff of their largest element each, so
  against ``ours-dense`` (which isolates compression: same attention arithmetic) it may move log-probabilities
  by at most ``2x`` the control's largest and mean ``|d logprob|``, and its KL by ``4x`` the control's (KL grows
  with the square of a small perturbation).
* Top-1: a position's decision can only flip if its top-2 tokens move by more than their margin together, so
  every position whose ``ours-dense`` margin exceeds twice the allowed largest ``|d logprob|`` must keep its
  top-1 token.

The bound adapts to the machine (the control is measured on it) and is checked for power: the same checks must
fail on a pool whose values of one layer are zeroed (``e2e_support/broken_pool``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from diffkv_devtools import REPO
from diffkv_devtools.gauges import gauge
from diffkv_devtools.sglang_server import SGLangServer
from diffkv_devtools.teacher_forced import Comparison, compare, greedy_continuation, score

pytestmark = pytest.mark.server

NEW_TOKENS = 40
DENSE = ["--attention-backend", "torch_native", "--page-size", "16"]
DIFFKV = ["--kv-pool", "diffkv", "--diffkv-page-size", "16", "--diffkv-window", "16", "--enable-metrics"]
OURS_DENSE = [*DIFFKV, "--diffkv-window", "1000000", "--diffkv-calibration", "off"]   # nothing sealed: our
#                                                             attention over bf16 pages (tiers are never used)
K8V8 = [*DIFFKV, "--diffkv-tiers", "k8v8", "--diffkv-alpha-low", "0"]
BROKEN = {"PYTHONPATH": str(REPO / "tests" / "e2e_support" / "broken_pool"), "DIFFKV_TEST_ZERO_VALUES_LAYER": "5"}
OPERANDS = 2            # K8V8 perturbs keys and values; the control perturbs one operand (P)
ESSAY = (
    "The most important thing about a startup is growth. A startup is a company designed to grow fast. Being "
    "newly founded does not in itself make a company a startup, nor is it necessary for a startup to work on "
    "technology, or take venture funding, or have some sort of exit. The only essential thing is growth. "
    "Everything else we associate with startups follows from growth. If you want to start one it is important "
    "to understand that. Startups are so hard that you cannot be pointed off to the side and hope to succeed. "
)
PROMPTS = [
    "<|im_start|>user\n" + ESSAY + "\nWhat is the only essential thing about a startup?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a Python function that returns the n-th Fibonacci number, with a docstring."
    "<|im_end|>\n<|im_start|>assistant\n",
    ESSAY * 2 + "In summary, the text says that",
    "<|im_start|>user\nList the planets of the solar system in order from the sun, one per line, and give one "
    "fact about each.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def smollm2():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_model.py"), "smollm2-135m-instruct"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def prompt_ids(smollm2):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def teacher_forced(model, flags, prompts, continuations, env=None):
    """Every prompt's continuation scored by a fresh server with ``flags``; the pool's sealed pages afterwards."""
    with SGLangServer(model, flags, max_total_tokens=8192, env=env) as server:
        scores = [score(server, p, c) for p, c in zip(prompts, continuations)]
        sealed = gauge(server, "sealed_pages") if "diffkv" in flags else None
        assert not server.unexpected_errors(), server.unexpected_errors()
    assert all(s.cached_tokens > 0 for s in scores), "the scoring requests must reuse the cached prompt"
    return scores, sealed


@pytest.fixture(scope="module")
def dense(smollm2, prompt_ids):
    """SGLang's dense pool: its greedy replies (the continuations every pool is scored on) and its scores."""
    with SGLangServer(smollm2, DENSE, max_total_tokens=8192) as server:
        continuations = [greedy_continuation(server, p, NEW_TOKENS) for p in prompt_ids]
        server.post_text("/flush_cache?timeout=30")
        scores = [score(server, p, c) for p, c in zip(prompt_ids, continuations)]
        assert not server.unexpected_errors(), server.unexpected_errors()
    return continuations, scores


@pytest.fixture(scope="module")
def ours_dense(smollm2, prompt_ids, dense):
    scores, sealed = teacher_forced(smollm2, OURS_DENSE, prompt_ids, dense[0])
    assert sealed == 0
    return scores


@pytest.fixture(scope="module")
def control(dense, ours_dense) -> Comparison:
    """The precision control: SGLang's bf16 attention against our float32 attention, nothing compressed."""
    found = compare(ours_dense, dense[1])
    print("precision control (dense vs ours-dense):", found.as_dict())
    return found


def k8v8_violations(control: Comparison, ours_dense, candidate) -> list[str]:
    """The K8V8 bound of the module docstring applied to ``candidate`` against ``ours_dense``; the violated
    parts, empty if it holds."""
    allowed_max = OPERANDS * control.max_abs_logprob_diff
    found = compare(ours_dense, candidate, margin=2 * allowed_max)
    print("against ours-dense:", found.as_dict())
    checks = [
        (found.max_abs_logprob_diff <= allowed_max,
         f"max |d logprob| {found.max_abs_logprob_diff:.4f} > {allowed_max:.4f}"),
        (found.mean_abs_logprob_diff <= OPERANDS * control.mean_abs_logprob_diff,
         f"mean |d logprob| {found.mean_abs_logprob_diff:.4f} > {OPERANDS * control.mean_abs_logprob_diff:.4f}"),
        (found.mean_kl <= OPERANDS ** 2 * control.mean_kl,
         f"mean KL {found.mean_kl:.5f} > {OPERANDS ** 2 * control.mean_kl:.5f}"),
        (found.top1_disagreements == 0,
         f"top-1 changed at {found.top1_disagreements} of {found.decided} positions with margin > {2 * allowed_max:.3f}"),
    ]
    return [why for ok, why in checks if not ok]


def test_k8v8_without_pruning_matches_dense(smollm2, prompt_ids, dense, ours_dense, control):
    scores, sealed = teacher_forced(smollm2, K8V8, prompt_ids, dense[0])
    assert sealed > 0
    print("K8V8 against SGLang's dense pool:", compare(dense[1], scores).as_dict())
    assert k8v8_violations(control, ours_dense, scores) == []


def test_k8v8_bound_fails_on_a_broken_pool(smollm2, prompt_ids, dense, ours_dense, control):
    """Power: the same pool with the values of one of 30 layers zeroed must violate the bound."""
    scores, sealed = teacher_forced(smollm2, K8V8, prompt_ids, dense[0], env=BROKEN)
    assert sealed > 0
    violations = k8v8_violations(control, ours_dense, scores)
    print("broken pool violates:", violations)
    assert len(violations) >= 2, violations


def test_default_tiers_are_reported(smollm2, prompt_ids, dense, ours_dense):
    """The shipped defaults: the teacher-forced distance is a figure, printed; the pool must compress."""
    with SGLangServer(smollm2, DIFFKV, max_total_tokens=8192) as server:
        scores = [score(server, p, c) for p, c in zip(prompt_ids, dense[0])]
        ratio = gauge(server, "sealed_compression_ratio")
        assert not server.unexpected_errors(), server.unexpected_errors()
    print(f"default tiers: against dense {compare(dense[1], scores).as_dict()}, against ours-dense "
          f"{compare(ours_dense, scores).as_dict()}; sealed compression {ratio:.2f}x")
    assert ratio > 2.0
