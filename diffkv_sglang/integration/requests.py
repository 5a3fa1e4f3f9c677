"""Checks of one generate request before it reaches SGLang's scheduler, so that no request stops the server.

SGLang 0.5.23 validates most request fields in its tokenizer manager (the HTTP process) and answers 400, but a few
inputs pass those checks and raise inside the scheduler process, which ends the scheduler and with it the whole
server (the client sees a dropped connection, every later request is refused). Found on CPU with the DiffKV
pool (the empty prompt stops SGLang's own pool the same way):

* a prompt of no tokens: ``text=""`` with a tokenizer that adds no BOS token (SmolLM2) tokenizes to ``[]``,
  which SGLang checks only for ``input_ids``; the model's rotary embedding fails on the empty batch;
* token ids outside ``[0, vocab_size)`` in ``input_ids`` or an OpenAI ``prompt`` of ids: the embedding lookup
  fails on a negative or too-large id;
* ``top_logprobs_num`` (OpenAI ``top_logprobs`` / ``logprobs``) larger than the vocabulary with
  ``return_logprob``: the top-k of the log-probabilities fails;
* ``logprob_start_len`` below -1 (-1 means "output tokens only"; SGLang refuses values past the prompt but not
  these) on a prompt longer than a few tokens: an assertion on the number of prompt log-probabilities fails.

:func:`check_generate_request` turns each into a :class:`BadRequest` (a ValueError: SGLang's HTTP layer answers
it with status 400 and the message). The plugin calls it from an AROUND hook on
``TokenizerManager._validate_one_request``, which SGLang runs for every generate request, batch items included,
after tokenization; ``patches/sglang-0.5.23-request-checks.patch`` proposes the same checks upstream.

This module imports nothing from SGLang.
"""

from __future__ import annotations

from collections.abc import Sequence


class BadRequest(ValueError):
    """A request the scheduler cannot serve; the message names the field, the value and what is allowed."""

    def __init__(self, field: str, value: object, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r} is invalid; allowed: {allowed}")


def check_generate_request(input_ids: Sequence[int] | None, vocab_size: int, *, text: object = None,
                           return_logprob: bool = False, top_logprobs_num: int | None = 0,
                           logprob_start_len: int | None = -1) -> None:
    """Raise :class:`BadRequest` for a generate request that would stop SGLang's scheduler.

    Args:
        input_ids: the prompt's token ids after tokenization (None for ``input_embeds`` requests: not checked).
        vocab_size: the model's vocabulary size (its embedding rows).
        text: the request's ``text``, named in the message when it tokenized to nothing.
        return_logprob, top_logprobs_num, logprob_start_len: the request's log-probability options.
    """
    if input_ids is not None:
        if len(input_ids) == 0:
            field, value = ("text", text) if text is not None else ("input_ids", [])
            raise BadRequest(field, value, "a prompt of at least one token (this one tokenizes to none)")
        low, high = min(input_ids), max(input_ids)
        if low < 0 or high >= vocab_size:
            index = next(i for i, token in enumerate(input_ids) if not 0 <= token < vocab_size)
            raise BadRequest(f"input_ids[{index}]", input_ids[index], f"token ids in [0, {vocab_size})")
    if return_logprob and top_logprobs_num and top_logprobs_num > vocab_size:
        raise BadRequest("top_logprobs_num", top_logprobs_num, f"0 to {vocab_size} (the vocabulary size)")
    if logprob_start_len is not None and logprob_start_len < -1:
        raise BadRequest("logprob_start_len", logprob_start_len,
                         "-1 (log-probabilities of the output only) or a prompt position >= 0")
