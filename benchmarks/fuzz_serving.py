"""Fuzz the HTTP API of the real SGLang server with the DiffKV pool on CPU; the figures of docs/robustness.md.

    .venv/bin/python benchmarks/fuzz_serving.py --count 400 --seed 1 --deadline-s 1500

Builds the tiny test Llama (diffkv_devtools/tiny_model.py) with a tokenizer that adds no BOS token (so an empty
text is an empty prompt), then:

1. a clean server (``--kv-pool diffkv``, ``--max-total-tokens`` small enough for memory pressure) answers the good
   requests of the run, alone and in order; it is stopped;
2. a fresh server with the same flags is flushed (the arena's bytes after a flush are the baseline), gets the
   seeded sequence of malformed / edge-case requests interleaved with the same good requests
   (diffkv_devtools/request_fuzz.py), one at a time over loopback, until the count or the deadline is reached;
3. after the run: is it up (``/health_generate``), did every good request give the clean server's output, and does
   a flush bring the arena back to the baseline bytes (no leak)?

Prints the counts (inputs tried, 2xx / 4xx / 5xx / dropped, crashes, differing outputs, bytes leaked) and the
5xx answers; ``--json PATH`` writes them. Exit status 1 when a check fails. One server at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from diffkv_devtools.e2e_common import DIFFKV
from diffkv_devtools.http_requests import copy_without_bos, vocab_size
from diffkv_devtools.request_fuzz import flushed_arena, fuzz_cases, reference_outputs, run_fuzz
from diffkv_devtools.sglang_server import SGLangServer
from diffkv_devtools.tiny_model import build_tiny_llama


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=400, help="requests to generate (default 400)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--deadline-s", type=float, default=1500.0, help="stop sending after this many seconds")
    parser.add_argument("--good-every", type=int, default=4, help="every N-th request is a good one (default 4)")
    parser.add_argument("--max-total-tokens", type=int, default=1024, help="the pool's logical tokens (default 1024)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="diffkv-fuzz-"))
    model = copy_without_bos(build_tiny_llama(work / "tiny"), work / "tiny-no-bos")
    cases = fuzz_cases(args.seed, args.count, vocab_size(model), args.good_every)
    flags = [*DIFFKV, "--diffkv-window", "32"]
    with SGLangServer(model, flags, max_total_tokens=args.max_total_tokens) as clean:
        expected = reference_outputs(clean, cases)
    with SGLangServer(model, flags, max_total_tokens=args.max_total_tokens) as server:
        baseline = flushed_arena(server)
        result = run_fuzz(server, cases, expected, args.deadline_s)
        after = flushed_arena(server) if not result.crashes else None
        errors = server.unexpected_errors()
    leaked = None if after is None else after["used_bytes"] - baseline["used_bytes"]
    figures = {"seed": args.seed, "count": args.count, "tried": result.tried, "answers": dict(result.statuses),
               "crashes": len(result.crashes), "good_requests": len(expected),
               "good_outputs_differing": len(result.mismatches), "bytes_leaked": leaked,
               "arena_after_flush": after, "seconds": round(result.seconds, 1),
               "server_errors": result.server_errors, "tracebacks_in_log": len(errors)}
    print(result.summary() + f", bytes leaked: {leaked}")
    for index, text in result.server_errors:
        print(f"  5xx at case {index}: {text}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    ok = not result.crashes and not result.mismatches and leaked == 0 and after["sealed_pages"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
