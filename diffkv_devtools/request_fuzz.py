"""A seeded, bounded fuzz run of SGLang's HTTP API (``/generate``, ``/v1/completions``, ``/v1/chat/completions``)
against a running test server (used by ``tests/test_e2e_fuzz.py`` and ``benchmarks/fuzz_serving.py``).

:func:`fuzz_cases` draws malformed and edge-case requests from a seed: each starts from a valid request of one of
the three endpoints and gets one to three mutations (empty, huge, negative, out-of-vocabulary, wrong-type or
conflicting fields, bad grammars, invalid JSON, batches mixing good and bad items, ...). Every
``good_every``-th case is a *good* request instead: a greedy completion of a prompt no other request shares a
page with, whose output must equal the one a clean server gives (:func:`reference_outputs`). Values that would
be valid but slow on a CPU (long generations) are kept out, so a run is bounded by its count and its deadline.

:func:`run_fuzz` sends the cases one at a time over loopback and tallies the answers; a dropped connection or a
scheduler that no longer generates is a crash.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter

from .gauges import gauge
from .http_requests import DROPPED, healthy, send, wait_until_idle

WORDS = ("once upon a time there was a small language model that lived on a CPU the quick brown fox jumps over "
         "the lazy dog keys and values are stored in a paged cache some tokens matter more than others").split()
GOOD_NEW_TOKENS = 8


@dataclasses.dataclass(frozen=True)
class Case:
    """One request: ``kind`` is ``good`` (its output is compared) or the name of the mutation(s) applied."""

    index: int
    kind: str
    path: str
    payload: object


def _words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(low, high)))


def good_case(index: int, seed: int) -> Case:
    """A greedy /generate request whose prompt starts with its own index and seed, so it shares no page of the
    radix cache with any other request and its output depends on nothing but the prompt."""
    rng = random.Random(f"good {seed} {index}")
    text = f"Request {index} of run {seed}: {_words(rng, 20, 120)}"
    params = {"max_new_tokens": GOOD_NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    return Case(index, "good", "/generate", {"text": text, "sampling_params": params})


def _base(rng: random.Random) -> tuple[str, dict]:
    """A valid request of a random endpoint, with a short random prompt and few new tokens."""
    text, few = _words(rng, 1, 40), rng.randrange(1, 6)
    endpoint = rng.choice(("generate", "completions", "chat"))
    if endpoint == "generate":
        return "/generate", {"text": text, "sampling_params": {"max_new_tokens": few}}
    if endpoint == "completions":
        return "/v1/completions", {"model": "m", "prompt": text, "max_tokens": few}
    return "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": few}


def _ids(rng: random.Random, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]


def _bad_id(rng: random.Random, vocab: int) -> int:
    return rng.choice((vocab, rng.randrange(vocab, 2**31), -rng.randrange(1, 2**31), 2**63 - 1))


def _mutate_prompt(rng: random.Random, path: str, payload: dict, vocab: int) -> str:
    bad = _bad_id(rng, vocab)
    if path == "/generate":
        choice = rng.randrange(9)
        if choice in (1, 2, 3):                     # ids instead of text; 4 sends both
            payload.pop("text", None)
        value = {0: ("text", ""), 1: ("input_ids", []), 2: ("input_ids", _ids(rng, vocab) + [bad]),
                 3: ("input_ids", [_ids(rng, vocab), _ids(rng, vocab) + [bad]]), 4: ("input_ids", [1, bad]),
                 5: ("text", ["fine " + _words(rng, 1, 9), ""]), 6: ("text", "\x00" * rng.randrange(1, 9)),
                 7: ("text", "word " * rng.randrange(2100, 4000)), 8: ("text", rng.choice((5, None, {"a": 1})))}
        field, new = value[choice]
        payload[field] = new
        if choice == 5:
            payload["sampling_params"] = [payload["sampling_params"]] * rng.choice((1, 2))
        return f"prompt:{field}{choice}"
    if path == "/v1/completions":
        payload["prompt"] = rng.choice(("", [], [[]], [1, bad], ["fine", ""], [[1, 2], [bad]], "x " * 3000, 7))
        return "prompt:completions"
    messages = rng.choice(([], [{"role": "user", "content": ""}], [{"role": "bogus", "content": "x"}],
                           [{"role": "user", "content": [{"type": "text", "text": ""}]}],
                           [{"role": "user"}], [{"role": "user", "content": "x " * 3000}], "hello"))
    payload["messages"] = messages
    return "prompt:chat"


def _sampling_values(rng: random.Random, vocab: int) -> dict:
    """One bad or edge sampling parameter (SGLang's native names)."""
    name, values = rng.choice((
        ("max_new_tokens", (-rng.randrange(1, 10**6), 0, 10**rng.randrange(6, 19), "x", 2.5, None)),
        ("temperature", (-1.0, 0.0, 1e9, "hot", None)),
        ("top_p", (0, -0.5, 1.5, 1e-9)),
        ("top_k", (0, -5, 10**9, vocab + 1)),
        ("min_p", (-1, 2, 0.99)),
        ("n", (0, -1, 2, 4)),
        ("stop", ("", [""], "x" * rng.randrange(1, 5000), [str(i) for i in range(rng.randrange(1, 60))], 5)),
        ("stop_token_ids", ([_bad_id(rng, vocab)], [0], "x")),
        ("min_new_tokens", (-3, 10**6, 2)),
        ("repetition_penalty", (0, -1, 3, 1.5)),
        ("frequency_penalty", (1e30, -3, 2)),
        ("regex", ("(", "[a-z", "a{3,1}", ".*")),
        ("json_schema", ("{not json", '{"type": "nope"}', '{"type": "string"}')),
        ("ebnf", ("root ::= (", "root ::= \"a\"")),
        ("sampling_seed", (-1, 2**80, "s")),
        ("ignore_eos", ("yes", 3)),
        ("unknown_field", (1,)),
    ))
    return {name: rng.choice(values)}


def _mutate_sampling(rng: random.Random, path: str, payload: dict, vocab: int) -> str:
    change = _sampling_values(rng, vocab)
    (name, value), = change.items()
    if path == "/generate":
        params = payload["sampling_params"]            # a dict, a list of them, or already broken by a mutation
        for one in params if isinstance(params, list) else [params]:
            if isinstance(one, dict):
                one.update(change)
    else:
        openai = {"max_new_tokens": "max_tokens", "sampling_seed": "seed"}.get(name, name)
        payload[openai] = value
        if name in ("temperature", "n", "top_p") and rng.random() < 0.5:
            payload["temperature"] = 1.0
    return f"sampling:{name}"


def _mutate_logprobs(rng: random.Random, path: str, payload: dict, vocab: int) -> str:
    top = rng.choice((-1, 0, 1, vocab, vocab + 1, 10**6))
    if path == "/generate":
        payload.update(return_logprob=rng.choice((True, True, "x")), top_logprobs_num=top,
                       logprob_start_len=rng.choice((-5, -1, 0, 1, 39, 10**6)))
        if rng.random() < 0.3:
            payload["token_ids_logprob"] = rng.choice(([_bad_id(rng, vocab)], [0, vocab - 1], [[1]]))
    elif path == "/v1/completions":
        payload.update(logprobs=top, echo=rng.choice((True, False)))
    else:
        payload.update(logprobs=rng.choice((True, "x")), top_logprobs=top)
    return "logprobs"


def _mutate_body(rng: random.Random, path: str, payload: dict, vocab: int) -> str:
    choice = rng.randrange(5)
    if choice == 0:
        payload["sampling_params" if path == "/generate" else "stream_options"] = rng.choice(("x", [1], 5))
    elif choice == 1:
        payload["stream"] = True
    elif choice == 2:
        payload["rid"] = rng.choice((5, ["a", "b"], "same-rid"))
    elif choice == 3:
        payload["data_parallel_rank"] = rng.choice((-1, 7))
    else:
        payload["lora_path"] = "absent"
    return f"body:{choice}"


MUTATIONS = (_mutate_prompt, _mutate_sampling, _mutate_sampling, _mutate_logprobs, _mutate_body)
RAW_BODIES = (b"", b"{", b"[]", b"null", b'{"text": "a", "sampling_params": {"max_new_tokens": 2}', b"\xff\xfe")


def fuzz_cases(seed: int, count: int, vocab: int, good_every: int = 4) -> list[Case]:
    """``count`` cases from ``seed``: a good request every ``good_every``-th, malformed or edge cases between."""
    rng = random.Random(seed)
    cases = []
    for index in range(count):
        if index % good_every == good_every - 1:
            cases.append(good_case(index, seed))
            continue
        if rng.random() < 0.05:
            cases.append(Case(index, "raw-body", rng.choice(("/generate", "/v1/completions")), rng.choice(RAW_BODIES)))
            continue
        path, payload = _base(rng)
        kinds = [rng.choice(MUTATIONS)(rng, path, payload, vocab) for _ in range(rng.choice((1, 1, 2, 3)))]
        cases.append(Case(index, "+".join(kinds), path, payload))
    return cases


def reference_outputs(server, cases: list[Case]) -> dict[int, list[int]]:
    """The output token ids of every good case, answered by ``server`` (a clean one) one at a time."""
    return {case.index: send(server, case.path, case.payload)[1]["output_ids"] for case in cases
            if case.kind == "good"}


@dataclasses.dataclass
class FuzzResult:
    """Counts of one run. ``statuses`` keys: ``2xx``/``4xx``/``5xx``/``dropped``; a crash is a dropped
    connection or a server that stopped generating; ``mismatches`` lists good cases whose output differed."""

    tried: int = 0
    statuses: Counter = dataclasses.field(default_factory=Counter)
    crashes: list[int] = dataclasses.field(default_factory=list)
    mismatches: list[int] = dataclasses.field(default_factory=list)
    server_errors: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"inputs tried: {self.tried}, answers: {dict(sorted(self.statuses.items()))}, crashes: "
                f"{len(self.crashes)}, good outputs differing from the clean server: {len(self.mismatches)}, "
                f"{self.seconds:.0f} s")


def _status_class(status: int) -> str:
    return "dropped" if status == DROPPED else f"{status // 100}xx"


def run_fuzz(server, cases: list[Case], expected: dict[int, list[int]], deadline_s: float,
             request_timeout_s: float = 120.0, health_every: int = 25) -> FuzzResult:
    """Send ``cases`` in order until they or ``deadline_s`` seconds run out; check ``/health_generate`` every
    ``health_every`` requests and at the end. A good case waits until the scheduler is idle (an answered bad
    request may still run, see :func:`wait_until_idle`), so it runs alone in its batch like on the clean server
    and its greedy output must be equal token for token: batched with another request, a bf16 near-tie of the
    tiny random model (top-2 within 1e-4 nats is common) can flip and say nothing about the pool."""
    result, start = FuzzResult(), time.monotonic()
    for case in cases:
        if time.monotonic() - start > deadline_s:
            break
        if case.kind == "good":
            wait_until_idle(server)      # alone in its batch, as on the clean server: equal outputs are exact
        status, body = send(server, case.path, case.payload, timeout=request_timeout_s)
        result.tried += 1
        result.statuses[_status_class(status)] += 1
        if status >= 500:
            result.server_errors.append((case.index, f"{case.kind}: {str(body)[:200]}"))
        if case.kind == "good" and (status != 200 or body["output_ids"] != expected[case.index]):
            result.mismatches.append(case.index)
        alive = status != DROPPED and server.proc.poll() is None
        if not alive or (result.tried % health_every == 0 and not healthy(server)):
            result.crashes.append(case.index)
            break
    if not result.crashes and not healthy(server):
        result.crashes.append(-1)
    result.seconds = time.monotonic() - start
    return result


def flushed_arena(server) -> dict[str, float]:
    """Flush the cache (the server must be idle) and read back what the arena still holds: after a flush only
    SGLang's padding page stays staged."""
    assert "Cache flushed" in server.post_text("/flush_cache?timeout=60")
    return {name: gauge(server, name) for name in ("used_bytes", "sealed_pages", "staged_pages")}
