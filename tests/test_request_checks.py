"""diffkv_sglang.integration.requests: the checks that keep requests which would stop SGLang's scheduler out of it
(no SGLang process; the served answers are tested in test_e2e_bad_requests.py)."""

import random

import pytest

from diffkv_sglang.integration.requests import BadRequest, check_generate_request


@pytest.fixture
def rng():
    seed = random.randrange(2**31)
    print("seed", seed)
    return random.Random(seed)


def test_good_requests_pass(rng):
    vocab = rng.randrange(100, 200_000)
    ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 300))] + [0, vocab - 1]
    check_generate_request(ids, vocab, text="x", return_logprob=True, top_logprobs_num=vocab)
    check_generate_request(None, vocab)                                        # input_embeds: nothing to check
    check_generate_request([0], vocab, top_logprobs_num=vocab + 1)             # ignored without return_logprob


def test_an_empty_prompt_names_the_text_or_the_ids():
    with pytest.raises(BadRequest) as info:
        check_generate_request([], 505, text="")
    assert str(info.value) == "text='' is invalid; allowed: a prompt of at least one token (this one tokenizes to none)"
    with pytest.raises(BadRequest, match=r"^input_ids=\[\] is invalid; allowed: a prompt of at least one token"):
        check_generate_request([], 505)


@pytest.mark.parametrize("side", ["negative", "vocab", "above"])
def test_ids_outside_the_vocabulary_name_the_first_bad_position(rng, side):
    vocab = rng.randrange(100, 200_000)
    bad = {"negative": -rng.randrange(1, 2**40), "vocab": vocab, "above": rng.randrange(vocab + 1, 2**40)}[side]
    ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 50))]
    position = rng.randrange(len(ids) + 1)
    ids.insert(position, bad)
    ids.append(-1)                                                             # a second bad id: not the first
    with pytest.raises(BadRequest) as info:
        check_generate_request(ids, vocab)
    assert str(info.value) == f"input_ids[{position}]={bad} is invalid; allowed: token ids in [0, {vocab})"
    assert isinstance(info.value, ValueError)


def test_top_logprobs_beyond_the_vocabulary(rng):
    vocab = rng.randrange(100, 200_000)
    extra = rng.randrange(1, 10**6)
    with pytest.raises(BadRequest) as info:
        check_generate_request([1], vocab, return_logprob=True, top_logprobs_num=vocab + extra)
    assert str(info.value) == (f"top_logprobs_num={vocab + extra} is invalid; allowed: 0 to {vocab} "
                               "(the vocabulary size)")


def test_logprob_start_len_below_minus_one(rng):
    check_generate_request([1, 2, 3], 505, return_logprob=True, logprob_start_len=-1)
    check_generate_request([1, 2, 3], 505, return_logprob=True, logprob_start_len=2)
    start = -rng.randrange(2, 10**6)
    with pytest.raises(BadRequest) as info:
        check_generate_request([1, 2, 3], 505, return_logprob=rng.choice((True, False)), logprob_start_len=start)
    assert str(info.value) == (f"logprob_start_len={start} is invalid; allowed: -1 (log-probabilities of the output "
                               "only) or a prompt position >= 0")
