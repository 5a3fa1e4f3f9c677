"""Shared pieces of the end-to-end tests: the DiffKV flags they use, a prompt and a request helper (the gauges:
:mod:`diffkv_devtools.gauges`)."""

from __future__ import annotations

PAGE, WINDOW = 16, 16
# calibration off: these tests check the pool under the tiers the flags give (the start-up calibration has its own)
DIFFKV = ["--kv-pool", "diffkv", "--diffkv-page-size", str(PAGE), "--diffkv-window", str(WINDOW),
          "--diffkv-calibration", "off", "--enable-metrics", "--enable-cache-report"]
STORY = ("Once upon a time there was a small language model that lived on a CPU. The quick brown fox jumps over "
         "the lazy dog. Keys and values are stored in a paged cache; some tokens matter more than others. ")


def generate(server, text: str, max_new_tokens: int = 24, **sampling) -> dict:
    """Greedy ``/generate`` of exactly ``max_new_tokens`` tokens."""
    params = {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True, **sampling}
    return server.post("/generate", {"text": text, "sampling_params": params})

