"""A quick, bounded fuzz run of the HTTP API against the real SGLang server on CPU with ``--kv-pool diffkv``
(the full run is ``benchmarks/fuzz_serving.py``; figures in docs/robustness.md). Run alone with
``pytest -m server``.

A fresh seed each run (printed; ``DIFFKV_FUZZ_SEED=<seed> pytest tests/test_e2e_fuzz.py`` replays it): 40 requests,
malformed and edge cases with a good greedy request every 4th, at most 60 s of sending. The good requests' outputs
must equal the ones the same server gave before any malformed request (its cache flushed in between, so each good
prompt is computed from scratch both times); afterwards the server still generates and a flush returns the arena to
the bytes it held after its first flush (only SGLang's padding page)."""

from __future__ import annotations

import os
import random

import pytest

from diffkv_devtools.e2e_common import DIFFKV
from diffkv_devtools.http_requests import copy_without_bos, vocab_size
from diffkv_devtools.request_fuzz import flushed_arena, fuzz_cases, reference_outputs, run_fuzz
from diffkv_devtools.sglang_server import SGLangServer

pytestmark = pytest.mark.server


def test_fuzzed_requests_leave_the_server_up_and_the_arena_empty(tiny_model, tmp_path):
    seed = int(os.environ.get("DIFFKV_FUZZ_SEED") or random.randrange(2**31))
    print("fuzz seed", seed)
    model = copy_without_bos(tiny_model, tmp_path / "no-bos")
    cases = fuzz_cases(seed, count=40, vocab=vocab_size(model))
    with SGLangServer(model, [*DIFFKV, "--diffkv-window", "32"], max_total_tokens=1024) as server:
        baseline = flushed_arena(server)
        expected = reference_outputs(server, cases)
        flushed_arena(server)
        result = run_fuzz(server, cases, expected, deadline_s=60)
        print(result.summary())
        assert not result.crashes, (seed, result.crashes, server.log_tail())
        assert not result.mismatches, (seed, result.mismatches)
        assert result.tried >= 20 and result.statuses["4xx"] > 0, result.summary()
        assert flushed_arena(server) == baseline
        assert baseline["sealed_pages"] == 0 and baseline["staged_pages"] == 1
