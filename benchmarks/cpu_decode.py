"""One decode step of the DiffKV pool on the CPU (torch path), this tree against an earlier revision.

A decode step is what the SGLang backend does per step for a batch: ``DecodeAttentionWrapper.plan`` once, then per
layer ``store.write_tokens`` (the step's new token) and ``run`` (attention plus importance). The store has the
SmolLM2-135M attention shape (30 layers, 3 KV heads, 9 query heads, head_dim 64, bfloat16, page 32), default tiers
(K8V4 / K4V2, alpha_high 1, no pruning), every page before the 64-token window sealed with a random tier mix
(about 40% of entries in the first tier), as the backend seals them.

Each (case, variant, round) runs in a fresh subprocess that imports ``diffkv_sglang`` from the variant's source tree
(this checkout, or ``git archive`` of ``--baseline``), builds the same store from the same seed (not timed), runs
one warm-up step and times ``--steps`` steps. Two more variants, ``dense-bf16`` and ``dense-f32``, are the floor a
dense cache sets: per layer, the new token written into contiguous ``[B, H, T, D]`` K/V of that dtype and one
``scaled_dot_product_attention`` over the batch (GQA), no importance (not SGLang's dense backend, which also
gathers each request's slots). torch's CPU SDPA is several times slower in bfloat16 than in float32 at one query. Variants alternate within each round, so load from other processes
on a shared CPU hits both alike; the report gives per-case medians over all timed steps and the ratio of the
medians. ``--threads`` sets torch's threads (1 by default: on a shared 2-core machine more threads mostly wait).

    python benchmarks/cpu_decode.py --baseline f0511a5 --out benchmarks/results/cpu-decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM, PAGE = 30, 3, 9, 64, 32
CASES = ((1, 512), (1, 2048), (8, 512), (8, 2048), (32, 1024))       # (batch, context)


def _worker(batch: int, context: int, steps: int, threads: int, seed: int) -> dict:
    """Build the store and time ``steps`` decode steps with the ``diffkv_sglang`` on ``sys.path``."""
    import torch

    from diffkv_sglang.attention import DecodeAttentionWrapper
    from diffkv_sglang.config import DiffKVConfig
    from diffkv_sglang.store import CompressedKVStore

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    config = DiffKVConfig(page_size=PAGE)
    pages_per_request = (context + steps + 1) // PAGE + 1
    num_pages = batch * pages_per_request + 1
    store = CompressedKVStore(config, LAYERS, KV_HEADS, HEAD_DIM, num_pages=num_pages,
                              arena_bytes=num_pages * LAYERS * KV_HEADS * (2 * PAGE * HEAD_DIM * 2 + 2 * PAGE * 4 + 16),
                              dtype=torch.bfloat16)
    table = torch.arange(1, num_pages).reshape(batch, pages_per_request)
    store.stage(table.reshape(-1))
    locs = (table[:, :, None] * PAGE + torch.arange(PAGE)).reshape(batch, -1)[:, :context].reshape(-1)
    for layer in range(LAYERS):
        k = torch.randn(locs.numel(), KV_HEADS, HEAD_DIM)
        store.write_tokens(layer, locs, k, torch.randn_like(k))
        # relative importance r = score / seen * context: about 40% above alpha_high = 1
        store.add_importance(layer, locs, torch.rand(locs.numel(), KV_HEADS) * 1.7 / context, torch.ones(locs.numel()))
    sealed = table[:, :(context - config.window) // PAGE]
    store.seal(sealed.reshape(-1), torch.full((sealed.numel(),), context))
    wrapper = DecodeAttentionWrapper(store, Q_HEADS)
    times = []
    for step in range(steps + 1):
        seq_lens = torch.full((batch,), context + step + 1)
        new_locs = table[:, (context + step) // PAGE] * PAGE + (context + step) % PAGE
        q = torch.randn(LAYERS, batch, Q_HEADS, HEAD_DIM, dtype=torch.bfloat16)
        kv = torch.randn(LAYERS, 2, batch, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
        start = time.perf_counter()
        wrapper.plan(table, seq_lens)
        for layer in range(LAYERS):
            store.write_tokens(layer, new_locs, kv[layer, 0], kv[layer, 1])
            wrapper.run(q[layer], layer)
        if step:                                          # step 0 warms up
            times.append(time.perf_counter() - start)
    stats = store.stats()
    return {"step_s": times, "tokens_per_tier": list(stats.tokens_per_tier), "sealed_pages": stats.sealed_pages}


def _dense_worker(dtype: str, batch: int, context: int, steps: int, threads: int, seed: int) -> dict:
    """Time ``steps`` decode steps of attention over a contiguous dense cache of ``dtype`` (``bf16`` or ``f32``;
    see the module docstring)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype]
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    length = context + steps + 1
    cache = torch.randn(LAYERS, 2, batch, KV_HEADS, length, HEAD_DIM).to(dtype)
    times = []
    for step in range(steps + 1):
        q = torch.randn(LAYERS, batch, Q_HEADS, 1, HEAD_DIM, dtype=dtype)
        kv = torch.randn(LAYERS, 2, batch, KV_HEADS, HEAD_DIM, dtype=dtype)
        end = context + step + 1
        start = time.perf_counter()
        for layer in range(LAYERS):
            cache[layer, :, :, :, end - 1] = kv[layer]
            torch.nn.functional.scaled_dot_product_attention(q[layer], cache[layer, 0, :, :, :end],
                                                             cache[layer, 1, :, :, :end], enable_gqa=True)
        if step:
            times.append(time.perf_counter() - start)
    return {"step_s": times}


def _baseline_tree(rev: str, into: Path) -> Path:
    """``git archive`` of ``rev``'s package (and kernels, its symlink target) into ``into``."""
    archive = subprocess.run(["git", "archive", rev, "diffkv_sglang", "kernels"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="f0511a5", help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per subprocess")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", default=",".join(f"{b}x{c}" for b, c in CASES), help="batch x context, comma-separated")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        variant, *numbers = args.worker.split(",")
        batch, context, seed = (int(x) for x in numbers)
        if variant.startswith("dense-"):
            print(json.dumps(_dense_worker(variant[6:], batch, context, args.steps, args.threads, seed)))
        else:
            print(json.dumps(_worker(batch, context, args.steps, args.threads, seed)))
        return
    cases = [tuple(int(x) for x in case.split("x")) for case in args.cases.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"baseline": _baseline_tree(args.baseline, Path(tmp)), "this": ROOT, "dense-bf16": ROOT, "dense-f32": ROOT}
        rows = []
        for batch, context in cases:
            times = {name: [] for name in sources}
            tiers = {}
            for round_ in range(args.rounds):
                for name, src in sources.items():
                    env = {**os.environ, "PYTHONPATH": str(src), "DIFFKV_KERNELS": "torch"}
                    result = subprocess.run(
                        [sys.executable, __file__, "--worker", f"{name},{batch},{context},{round_}", "--steps",
                         str(args.steps), "--threads", str(args.threads)],
                        env=env, cwd=tmp, check=True, capture_output=True, text=True)
                    data = json.loads(result.stdout.strip().splitlines()[-1])
                    times[name] += data["step_s"]
                    tiers[name] = data.get("tokens_per_tier")
            median = {name: statistics.median(t) for name, t in times.items()}
            row = {"batch": batch, "context": context, "baseline_ms": 1e3 * median["baseline"],
                   "this_ms": 1e3 * median["this"], "dense_bf16_ms": 1e3 * median["dense-bf16"],
                   "dense_f32_ms": 1e3 * median["dense-f32"], "speedup": median["baseline"] / median["this"],
                   "this_over_dense_bf16": median["this"] / median["dense-bf16"],
                   "this_over_dense_f32": median["this"] / median["dense-f32"],
                   "samples": len(times["this"]), "tokens_per_tier": tiers["this"]}
            assert tiers["this"] == tiers["baseline"], "the two variants must build the same store"
            rows.append(row)
            print(f"batch {batch:3d} context {context:5d}: baseline {row['baseline_ms']:9.1f} ms  "
                  f"this {row['this_ms']:8.1f} ms  x{row['speedup']:.2f}  "
                  f"dense bf16 {row['dense_bf16_ms']:7.1f} ms  f32 {row['dense_f32_ms']:7.1f} ms", flush=True)
    result = {"what": "one decode step (plan + 30 layers of write_tokens and run), SmolLM2-135M shape, torch path",
              "baseline": args.baseline, "threads": args.threads, "rounds": args.rounds, "steps": args.steps,
              "cpu": _cpu_name(), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
