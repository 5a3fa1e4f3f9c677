"""Shared pieces of the end-to-end tests: the DiffKV flags they use, a prompt, request and gauge helpers."""

from __future__ import annotations

PAGE, WINDOW = 16, 16
DIFFKV = ["--kv-pool", "diffkv", "--diffkv-page-size", str(PAGE), "--diffkv-window", str(WINDOW),
          "--enable-metrics", "--enable-cache-report"]
STORY = ("Once upon a time there was a small language model that lived on a CPU. The quick brown fox jumps over "
         "the lazy dog. Keys and values are stored in a paged cache; some tokens matter more than others. ")


def generate(server, text: str, max_new_tokens: int = 24, **sampling) -> dict:
    """Greedy ``/generate`` of exactly ``max_new_tokens`` tokens."""
    params = {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True, **sampling}
    return server.post("/generate", {"text": text, "sampling_params": params})


def gauge(server, name: str) -> float:
    """Sum over label sets (e.g. TP ranks) of the ``sglang:diffkv_<name>`` gauge."""
    values = [v for k, v in server.metrics().items() if k.startswith(f"sglang:diffkv_{name}")]
    assert values, f"gauge sglang:diffkv_{name} missing"
    return sum(values)
