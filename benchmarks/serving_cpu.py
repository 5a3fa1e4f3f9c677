"""Serving on SGLang's CPU engine, dense pool against DiffKV: SGLang's own ``bench_serving`` against the real server.

    make bench-serving-cpu          # installs requirements/bench.txt, runs this, writes benchmarks/results/serving-cpu.json
    python benchmarks/serving_cpu.py --out serving-cpu.json [--workloads short-chat pressure] [--pools dense diffkv]

SmolLM2-135M-Instruct (``make model``), one server at a time, each pool with the same ``--max-total-tokens``. On
the 2-core dev machine the dense server decodes about 15 tokens/s with 32 requests in flight (the whole run: about
30 minutes), hence the small request counts.
Workloads (the GPU serving issue's three, scaled down for 2 cores, plus a memory-pressure run and a conversation):

============  =====================================================================================================
short-chat    256 prompt / 128 output tokens, 16 requests sent at once (16384-token pool)
long-gen      128 / 256, 8 requests at once (16384)
long-context  1536 / 32, 4 requests at once (16384)
pressure      50-1500 / 16-200 (uniform), 64 requests at once on a 2048-token pool: SGLang must queue, and DiffKV
              must seal, compact and re-admit as pages free up
chat-4turn    one conversation of 4 turns, each resending the whole conversation (its prefix from the radix cache)
              with 64 new tokens per turn
============  =====================================================================================================

The first four run ``python -m sglang.benchmark.serving --backend sglang --dataset-name random-ids`` (random token
ids, ``ignore_eos``, seeded: both pools get the same requests; one warm-up request first); the conversation runs
through ``/generate`` here. Each row records what bench_serving reports (completed requests, wall time, output
tokens/s, request/s, mean TTFT and TPOT) and, for DiffKV, the pool's gauges before and after (compactions, bytes
they moved, seconds they took, compression). Every server restarts for each row, so rows do not share a cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffkv_devtools import gauges  # noqa: E402
from diffkv_devtools.sglang_server import SGLangServer, cpu_env  # noqa: E402

DEFAULT_MODEL = REPO / ".cache" / "models" / "smollm2-135m-instruct"
POOLS = {"dense": [], "diffkv": ["--kv-pool", "diffkv", "--enable-metrics"]}
# name: (input tokens, output tokens, range ratio, requests, pool tokens); lengths are uniform in
# [ratio * len, len] (bench_serving's random-range-ratio)
WORKLOADS = {
    "short-chat": (256, 128, 1.0, 16, 16384),
    "long-gen": (128, 256, 1.0, 8, 16384),
    "long-context": (1536, 32, 1.0, 4, 16384),
    "pressure": (1500, 200, 0.08, 64, 2048),
    "chat-4turn": (None, 64, None, 4, 16384),
}
ROW_TIMEOUT_S = 1800


def bench_serving(server: SGLangServer, model: Path, workload: str, workdir: Path) -> dict:
    """One bench_serving run against ``server``; its result line (bench_serving's own keys)."""
    input_len, output_len, ratio, requests, _ = WORKLOADS[workload]
    out = workdir / f"{workload}.jsonl"
    cmd = [sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang", "--base-url", server.url,
           "--dataset-name", "random-ids", "--random-input-len", str(input_len), "--random-output-len",
           str(output_len), "--random-range-ratio", str(ratio), "--num-prompts", str(requests), "--request-rate",
           "inf", "--tokenizer", str(model), "--model", str(model), "--seed", "1", "--warmup-requests", "1",
           "--disable-tqdm", "--output-file", str(out)]
    done = subprocess.run(cmd, cwd=workdir, env=cpu_env(), capture_output=True, text=True, timeout=ROW_TIMEOUT_S)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"bench_serving failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(out.read_text().splitlines()[-1])


def conversation(server: SGLangServer, output_len: int, turns: int) -> dict:
    """A conversation of ``turns`` turns through ``/generate`` (greedy, ``output_len`` new tokens each)."""
    text = ("You are a helpful assistant. The quick brown fox jumps over the lazy dog; keys and values are stored "
            "in a paged cache, and some tokens matter more than others. ") * 6
    start, completion, cached = time.monotonic(), 0, []
    for turn in range(turns):
        text += f"\nUser: tell me more, part {turn}.\nAssistant:"
        reply = server.post("/generate", {"text": text, "sampling_params": {
            "max_new_tokens": output_len, "temperature": 0, "ignore_eos": True}})
        completion += reply["meta_info"]["completion_tokens"]
        cached.append(reply["meta_info"]["cached_tokens"])
        text += reply["text"]
    duration = time.monotonic() - start
    return {"duration": duration, "completed": turns, "total_output_tokens": completion,
            "output_throughput": completion / duration, "request_throughput": turns / duration,
            "cached_tokens_per_turn": cached}


def run_row(model: Path, pool: str, workload: str) -> dict:
    """Start a server of ``pool`` sized for ``workload``, run it, stop the server; one result row."""
    pool_tokens = WORKLOADS[workload][4]
    row = {"config": pool, "workload": workload, "pool_tokens": pool_tokens}
    started = time.monotonic()
    with SGLangServer(model, POOLS[pool], max_total_tokens=pool_tokens, startup_timeout=600) as server, \
            tempfile.TemporaryDirectory(prefix="serving-cpu-") as workdir:
        row["startup_s"] = round(time.monotonic() - started, 1)
        before = gauges.read(server.url)[0] if pool == "diffkv" else None
        if workload == "chat-4turn":
            result = conversation(server, WORKLOADS[workload][1], WORKLOADS[workload][3])
        else:
            result = bench_serving(server, model, workload, Path(workdir))
        keys = ("duration", "completed", "total_input_tokens", "total_output_tokens", "output_throughput",
                "request_throughput", "mean_ttft_ms", "mean_tpot_ms", "median_itl_ms", "cached_tokens_per_turn")
        row.update({k: result[k] for k in keys if k in result})
        row["requests"] = WORKLOADS[workload][3]
        row["wall_s"] = round(result["duration"], 2)
        row["output_tok_s"] = round(result["output_throughput"], 2)
        row["requests_done"] = result["completed"]
        if before is not None:
            after = gauges.read(server.url)[0] or {}
            row["diffkv"] = {name: after.get(name, 0.0) - before.get(name, 0.0)
                             for name in ("compactions", "compacted_bytes", "compaction_seconds")}
            row["diffkv"].update({name: after.get(name) for name in ("compression_ratio", "sealed_compression_ratio")})
            row["diffkv"]["compaction_share_of_wall"] = row["diffkv"]["compaction_seconds"] / result["duration"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--pools", nargs="+", default=list(POOLS), choices=list(POOLS))
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        sys.exit(f"serving_cpu.py: no model in {args.model} (run `make model` first)")
    shown = [os.path.relpath(a) if os.path.isabs(a) else a for a in sys.argv[1:]]   # never a machine path in results
    result = {"command": "python benchmarks/serving_cpu.py " + " ".join(shown),
              "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs", "model": args.model.name,
              "workloads": {k: dict(zip(("input_len", "output_len", "range_ratio", "requests", "pool_tokens"), v))
                            for k, v in WORKLOADS.items() if k in args.workloads}, "rows": []}
    for workload in args.workloads:
        for pool in args.pools:
            print(f"[serving_cpu] {workload} on {pool} ...", flush=True)
            try:
                row = run_row(args.model, pool, workload)
            except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
                row = {"config": pool, "workload": workload, "ok": False, "error": str(exc)[-1500:]}
            print(f"[serving_cpu] {json.dumps(row)}", flush=True)
            result["rows"].append(row)
            args.out.write_text(json.dumps(result, indent=1))
    print(f"[serving_cpu] wrote {args.out}")


if __name__ == "__main__":
    main()
