"""SGLang frontend program with ``fork``: one shared prefix, two continuations, against a running server.

The program reads a short document once (the shared prefix), then forks into two branches that ask different
questions. ``fork`` sends the prefix to the server first, so both branches find it in the radix tree (over
DiffKV's compressed pages when the server runs ``--kv-pool diffkv``): each branch's ``cached_tokens`` (from the
generation's meta info) should cover the prefix, rounded down to whole pages (32 tokens by default).

    python -m sglang.launch_server --model-path M --kv-pool diffkv
    python examples/frontend_fork.py --base-url http://127.0.0.1:30000

The chat template follows the model (``--chat-template`` overrides it; SmolLM2 models use ``chatml``).
"""

from __future__ import annotations

import argparse
import sys

import sglang as sgl
from sglang.lang.chat_template import get_chat_template

DOCUMENT = """\
DiffKV keeps the KV cache of a language model in compressed form. Keys are stored with more bits than
values, because attention scores are more sensitive to errors in keys than the output is to errors in
values. Each token is placed in one of several precision tiers according to the attention it receives:
tokens that receive a lot of attention are kept as 8-bit keys and 4-bit values, ordinary tokens as 4-bit
keys and 2-bit values, and tokens that receive almost no attention are dropped entirely. The decision is
made per layer and per KV head, once a page of 32 tokens leaves the most recent window of 64 tokens, which
is always kept uncompressed. Compressed pages never change after they are written, so several requests
that share a prompt prefix can read the same compressed pages through SGLang's radix tree."""

QUESTIONS = [
    "Why are keys stored with more bits than values?",
    "What happens to tokens that receive almost no attention?",
]


@sgl.function
def ask_two_ways(s, document: str, questions: list[str], max_tokens: int):
    s += sgl.system("You are a concise assistant. Answer in one or two sentences.")
    s += sgl.user("Read this document:\n\n" + document)
    s += sgl.assistant("I have read the document. What would you like to know?")
    # fork() sends the prefix to the server once (so both branches find it cached) only if the prefix text is
    # already built; the interpreter builds it on a worker thread, so wait for it first.
    s.sync()
    branches = s.fork(len(questions))
    for branch, question in zip(branches, questions):
        branch += sgl.user(question)
        branch += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=0))
    branches.join()
    return [{"question": q, "answer": b["answer"], "meta": b.get_meta_info("answer") or {}}
            for q, b in zip(questions, branches)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:30000", help="server root")
    parser.add_argument("--max-tokens", type=int, default=40, help="tokens per branch")
    parser.add_argument("--chat-template", default=None,
                        help="sglang.lang chat template name (default: from the model path; 'chatml' for SmolLM2)")
    args = parser.parse_args(argv)
    base_url = args.base_url.rstrip("/")

    try:
        backend = sgl.RuntimeEndpoint(base_url)
    except Exception as error:  # noqa: BLE001 - connection errors come in several types
        print(f"frontend_fork: cannot reach {base_url}: {error}", file=sys.stderr)
        return 1
    template = args.chat_template
    if template is None and "smollm" in backend.get_model_name().lower():
        template = "chatml"                                # sglang.lang does not map SmolLM2 paths itself
    if template is not None:
        backend.chat_template = get_chat_template(template)
    print(f"server {base_url}, model {backend.get_model_name()}, chat template {backend.chat_template.name}")

    state = ask_two_ways.run(document=DOCUMENT, questions=QUESTIONS, max_tokens=args.max_tokens, backend=backend)
    if state.error():
        print(f"frontend_fork: the program failed: {state.error()}", file=sys.stderr)
        return 1
    results = state.ret_value
    prefix_tokens = None
    for i, result in enumerate(results):
        meta = result["meta"]
        prompt, cached = meta.get("prompt_tokens"), meta.get("cached_tokens")
        print(f"\n--- branch {i} " + "-" * 64)
        print(f"  question : {result['question']}")
        print(f"  answer   : {' '.join(result['answer'].split())}")
        print(f"  tokens   : prompt {prompt}, cached {cached}, completion {meta.get('completion_tokens')}")
        if isinstance(prompt, int):
            prefix_tokens = prompt if prefix_tokens is None else min(prefix_tokens, prompt)

    cached = [r["meta"].get("cached_tokens") for r in results]
    print("\n=== summary " + "=" * 66)
    if all(isinstance(c, int) and c > 0 for c in cached):
        print(f"both branches reused the shared prefix: cached tokens {cached} (prompts of up to "
              f"{max(r['meta'].get('prompt_tokens', 0) for r in results)} tokens)")
    else:
        print(f"the branches did not report a cached prefix (cached tokens {cached}); is the radix cache "
              "disabled on the server (--disable-radix-cache)?")
    return 0


if __name__ == "__main__":
    sys.exit(main())
