"""Greedy decoding on the real SmolLM2-135M-Instruct: DiffKV against SGLang's dense pool (server tests).

With "no pruning, 8-bit keys and values" DiffKV must reproduce the dense pool's greedy tokens; with the default
tiers the agreement is measured and printed (a figure, not an equality). Pages are 16 tokens and the protected
window 16 tokens, so most of every prompt is sealed (compressed) before decoding starts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sglang_server import REPO, SGLangServer

pytestmark = pytest.mark.server

NEW_TOKENS = 40
COMMON = ["--page-size", "16"]
DENSE = ["--attention-backend", "torch_native", *COMMON]
DIFFKV = ["--kv-pool", "diffkv", "--diffkv-page-size", "16", "--diffkv-window", "16"]
K8V8 = [*DIFFKV, "--diffkv-tiers", "k8v8", "--diffkv-alpha-low", "0"]
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


def greedy(server, prompt):
    out = server.post("/generate", {"text": prompt, "sampling_params": {"max_new_tokens": NEW_TOKENS,
                                                                        "temperature": 0, "ignore_eos": True}})
    return out["output_ids"], out["meta_info"]


def agreement(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.fixture(scope="module")
def dense_outputs(smollm2):
    with SGLangServer(smollm2, DENSE, max_total_tokens=8192) as dense:
        return [greedy(dense, p)[0] for p in PROMPTS]


def test_k8v8_without_pruning_matches_dense(smollm2, dense_outputs):
    with SGLangServer(smollm2, K8V8, max_total_tokens=8192) as server:
        outs = [greedy(server, p) for p in PROMPTS]
        assert not server.unexpected_errors(), server.unexpected_errors()
    agree = [agreement(ids, ref) for (ids, _), ref in zip(outs, dense_outputs)]
    print("K8V8 greedy agreement with dense (tokens):", agree, "of", NEW_TOKENS)
    assert all(a >= 32 for a in agree), agree


def test_default_tiers_agreement_is_reported(smollm2, dense_outputs):
    with SGLangServer(smollm2, [*DIFFKV, "--enable-metrics"], max_total_tokens=8192) as server:
        outs = [greedy(server, p) for p in PROMPTS]
        server.post("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 1}})
        ratio = [v for k, v in server.metrics().items() if k.startswith("sglang:diffkv_sealed_compression_ratio")]
    agree = [agreement(ids, ref) for (ids, _), ref in zip(outs, dense_outputs)]
    share = sum(agree) / (NEW_TOKENS * len(agree))
    print(f"default tiers: greedy agreement {agree} of {NEW_TOKENS} ({share:.0%}); sealed compression {ratio}")
    assert ratio and ratio[0] > 2.0
