"""Requests that stopped SGLang's scheduler (and with it the server) are answered 400 with a clear message under
``--kv-pool diffkv``, and the server keeps serving with the same output. Real SGLang server on CPU, tiny Llama
whose tokenizer adds no BOS token (so ``text=""`` tokenizes to nothing, as with SmolLM2). Run alone with
``pytest -m server``; every case is listed in docs/robustness.md."""

from __future__ import annotations

import random

import pytest

from diffkv_devtools.e2e_common import DIFFKV, STORY, generate
from diffkv_devtools.gauges import gauge
from diffkv_devtools.http_requests import copy_without_bos, error_message, healthy, send, vocab_size
from diffkv_devtools.sglang_server import SGLangServer

pytestmark = pytest.mark.server
EMPTY = "a prompt of at least one token (this one tokenizes to none)"


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """The running server and its model's vocabulary size."""
    model = copy_without_bos(tiny_model, tmp_path_factory.mktemp("no-bos"))
    with SGLangServer(model, DIFFKV, max_total_tokens=1024) as running:
        yield running, vocab_size(model)


def cases(rng: random.Random, vocab: int) -> list[tuple[str, str, dict, str]]:
    """(name, path, payload, SGLang's 400 message) with fresh out-of-vocabulary ids."""
    high, low, start = rng.randrange(vocab, 2**40), -rng.randrange(1, 2**31), -rng.randrange(2, 100)
    oov = f"allowed: token ids in [0, {vocab})"
    top = lambda n: f"top_logprobs_num={n} is invalid; allowed: 0 to {vocab} (the vocabulary size)"   # noqa: E731
    few = {"max_new_tokens": 4}
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return [
        ("empty text", "/generate", {"text": "", "sampling_params": few}, f"text='' is invalid; allowed: {EMPTY}"),
        ("batch with an empty text", "/generate", {"text": [STORY, ""], "sampling_params": few},
         f"text='' is invalid; allowed: {EMPTY}"),
        ("OpenAI prompt list with an empty string", "/v1/completions", {"model": "m", "prompt": ["hi", ""],
                                                                       "max_tokens": 4},
         f"text='' is invalid; allowed: {EMPTY}"),
        ("id above the vocabulary", "/generate", {"input_ids": [1, 7, high], "sampling_params": few},
         f"input_ids[2]={high} is invalid; {oov}"),
        ("id equal to the vocabulary size", "/generate", {"input_ids": [vocab], "sampling_params": few},
         f"input_ids[0]={vocab} is invalid; {oov}"),
        ("negative id", "/generate", {"input_ids": [1, low], "sampling_params": few},
         f"input_ids[1]={low} is invalid; {oov}"),
        ("batch mixing good and bad ids", "/generate", {"input_ids": [[1, 5, 6], [1, high]], "sampling_params": few},
         f"input_ids[1]={high} is invalid; {oov}"),
        ("input_ids with text", "/generate", {"text": "hi", "input_ids": [1, high], "sampling_params": few},
         f"input_ids[1]={high} is invalid; {oov}"),
        ("OpenAI prompt of ids", "/v1/completions", {"model": "m", "prompt": [1, high], "max_tokens": 4},
         f"input_ids[1]={high} is invalid; {oov}"),
        ("top_logprobs_num above the vocabulary", "/generate",
         {"text": "hi", "return_logprob": True, "top_logprobs_num": vocab + 1, "sampling_params": few}, top(vocab + 1)),
        ("chat top_logprobs", "/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 1000}, top(1000)),
        ("logprob_start_len below -1", "/generate",
         {"text": STORY, "return_logprob": True, "logprob_start_len": start, "sampling_params": few},
         f"logprob_start_len={start} is invalid; allowed: -1 (log-probabilities of the output only) or a prompt "
         "position >= 0"),
        ("completions logprobs", "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 4, "logprobs": 999},
         top(999)),
    ]


def test_requests_that_stopped_the_scheduler_are_refused(served):
    server, vocab = served
    seed = random.randrange(2**31)
    print("seed", seed)
    before = generate(server, STORY, max_new_tokens=16)["output_ids"]
    for name, path, payload, message in cases(random.Random(seed), vocab):
        status, body = send(server, path, payload)
        assert (status, error_message(body)) == (400, message), (name, status, body)
        assert healthy(server), (name, server.log_tail())
    assert generate(server, STORY, max_new_tokens=16)["output_ids"] == before
    bounds = send(server, "/generate", {"input_ids": [0, vocab - 1], "return_logprob": True,
                                        "top_logprobs_num": vocab, "sampling_params": {"max_new_tokens": 2}})
    assert bounds[0] == 200, bounds                        # the limits themselves are served
    assert not server.unexpected_errors(), server.unexpected_errors()
    assert "Cache flushed" in server.post_text("/flush_cache?timeout=30")
    assert gauge(server, "sealed_pages") == 0 and gauge(server, "staged_pages") == 1
