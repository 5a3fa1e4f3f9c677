"""Serving on SGLang's CPU engine, dense pool against DiffKV: SGLang's own ``bench_serving`` against the real server.

    make bench-serving-cpu          # installs requirements/bench.txt, runs this, writes benchmarks/results/serving-cpu.json
    python benchmarks/serving_cpu.py --out serving-cpu.json [--workloads short-chat pressure] [--pools dense diffkv]
    python benchmarks/serving_cpu.py --out benchmarks/results/serving-cpu.json --update --workloads chat-4turn

SmolLM2-135M-Instruct (``make model``), one server at a time, each pool with the same ``--max-total-tokens`` (except
in ``pressure-equal-bytes``). On the 2-core dev machine the dense server decodes about 15 tokens/s with 32 requests in flight (the whole run: about
30 minutes), hence the small request counts.
Workloads (the GPU serving issue's three, scaled down for 2 cores, plus a memory-pressure run and a conversation):

============  =====================================================================================================
short-chat    256 prompt / 128 output tokens, 16 requests sent at once (16384-token pool)
long-gen      128 / 256, 8 requests at once (16384)
long-context  1536 / 32, 4 requests at once (16384)
pressure      120-1500 / 16-200 (uniform), 64 requests at once on a 2048-token pool: SGLang must queue, and DiffKV
              must seal, compact and re-admit as pages free up
pressure-     the same requests at equal KV bytes: dense gets 2048 tokens, DiffKV the logical tokens whose arena
equal-bytes   and descriptor tables take the same bytes (``equal_bytes_tokens``); both ``--context-length 1728``
              (the longest request is 1700 tokens), so DiffKV's minimum dense staging (one prompt of the context
              length) fits in those bytes. This is the comparison a user makes: the same memory, more in flight
chat-4turn    one conversation of 4 turns, each resending the whole conversation (its prefix from the radix cache)
              with 64 new tokens per turn, after an untimed warm-up conversation of another text (so the first
              forward, first seal and first plans are outside the timing, as bench_serving's warm-up request does)
demo          what ``make demo`` runs against its server: ``examples/multi_turn_chat.py`` then
              ``examples/frontend_fork.py`` (no warm-up: a user's first requests), timed end to end
============  =====================================================================================================

The first four run ``python -m sglang.benchmark.serving --backend sglang --dataset-name random-ids`` (random token
ids, ``ignore_eos``, seeded: both pools get the same requests; one warm-up request first); the conversation runs
through ``/generate`` here. Each row records what bench_serving reports (completed requests, wall time, output
tokens/s, request/s, mean TTFT and TPOT) and, for DiffKV, the pool's gauges before and after (compactions, bytes
they moved, seconds they took, compression). Every server restarts for each row, so rows do not share a cache.
``--update`` replaces the rows of the workloads and pools run in an existing ``--out`` file and keeps the others;
every row records the run (``run``: commit and start time) it came from, so a comparison can tell rows measured
side by side (one run) from rows of different runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffkv_devtools import gauges  # noqa: E402
from diffkv_devtools.sglang_server import CPU_SHIMS, SGLangServer, cpu_env  # noqa: E402

DEFAULT_MODEL = REPO / ".cache" / "models" / "smollm2-135m-instruct"
POOLS = {"dense": [], "diffkv": ["--kv-pool", "diffkv", "--enable-metrics"]}
# name: (input tokens, output tokens, range ratio, requests, pool tokens); lengths are uniform in
# [ratio * len, len] (bench_serving's random-range-ratio)
WORKLOADS = {
    "short-chat": (256, 128, 1.0, 16, 16384),
    "long-gen": (128, 256, 1.0, 8, 16384),
    "long-context": (1536, 32, 1.0, 4, 16384),
    "pressure": (1500, 200, 0.08, 64, 2048),
    "pressure-equal-bytes": (1500, 200, 0.08, 64, 2048),     # pool tokens: dense's; DiffKV's from equal bytes
    "chat-4turn": (None, 64, None, 4, 16384),
    "demo": (None, None, None, 2, 16384),                     # the two examples of scripts/main_job.sh
}
# workload: extra server arguments for every pool
SERVER_ARGS = {"pressure-equal-bytes": ["--context-length", "1728"], "demo": ["--enable-cache-report"]}
DEMO_EXAMPLES = ("multi_turn_chat.py", "frontend_fork.py")
ROW_TIMEOUT_S = 1800


def model_shape(model: Path) -> tuple[int, int, int]:
    """(layers, KV heads, head_dim) of a Hugging Face model directory."""
    config = json.loads((model / "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return config["num_hidden_layers"], config.get("num_key_value_heads", heads), head_dim


def equal_bytes_tokens(model: Path, dense_tokens: int, context_len: int) -> tuple[int, dict]:
    """Logical tokens for which DiffKV's default pool (arena + descriptor tables) takes the bytes of a dense
    bfloat16 pool of ``dense_tokens``, and the byte counts of both.

    Raises:
        ValueError: if DiffKV's minimum staging (one prompt of ``context_len``) alone exceeds those bytes.
    """
    sys.path.insert(0, str(CPU_SHIMS))                       # the plugin's pool module imports SGLang
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    import torch

    from diffkv_sglang.config import DiffKVConfig
    from diffkv_sglang.integration.pool import PoolPlan

    plan = PoolPlan(DiffKVConfig(), *model_shape(model), torch.bfloat16)
    dense_bytes = dense_tokens * plan.dense_bytes_per_token
    page = plan.config.page_size
    descriptor_per_token = plan.descriptor_bytes_per_page / page
    tokens = int(dense_bytes / (plan.planned_bytes_per_token + descriptor_per_token)) // page * page
    diffkv_bytes = plan.arena_bytes(tokens, context_len) + tokens // page * plan.descriptor_bytes_per_page
    if diffkv_bytes > dense_bytes * 1.01:
        raise ValueError(f"DiffKV needs {diffkv_bytes} bytes for its staging at context {context_len}, more than "
                         f"the dense pool's {dense_bytes}")
    return tokens, {"dense_kv_bytes": dense_bytes, "diffkv_kv_bytes": diffkv_bytes}


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


def conversation(server: SGLangServer, output_len: int, turns: int, warmup: bool = True) -> dict:
    """A conversation of ``turns`` turns through ``/generate`` (greedy, ``output_len`` new tokens each), timed after
    an untimed warm-up conversation of two turns over another text (no prefix shared with the timed one)."""
    if warmup:
        _converse(server, "Warm-up: list the planets of the solar system and one fact about each. " * 8, output_len, 2)
    start = time.monotonic()
    completion, cached = _converse(server, ("You are a helpful assistant. The quick brown fox jumps over the lazy "
                                            "dog; keys and values are stored in a paged cache, and some tokens "
                                            "matter more than others. ") * 6, output_len, turns)
    duration = time.monotonic() - start
    return {"duration": duration, "completed": turns, "total_output_tokens": completion,
            "output_throughput": completion / duration, "request_throughput": turns / duration,
            "cached_tokens_per_turn": cached}


def demo(server: SGLangServer) -> dict:
    """The main job's examples against ``server``, one after the other; seconds each and in all."""
    seconds = {}
    for example in DEMO_EXAMPLES:
        start = time.monotonic()
        done = subprocess.run([sys.executable, str(REPO / "examples" / example), "--base-url", server.url],
                              env=cpu_env(), capture_output=True, text=True, timeout=ROW_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{example} failed ({done.returncode}):\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}")
        seconds[example] = round(time.monotonic() - start, 2)
    return {"duration": sum(seconds.values()), "completed": len(DEMO_EXAMPLES), "example_seconds": seconds}


def _converse(server: SGLangServer, text: str, output_len: int, turns: int) -> tuple[int, list[int]]:
    """``turns`` turns of a conversation opened by ``text``: (completion tokens, cached tokens per turn)."""
    completion, cached = 0, []
    for turn in range(turns):
        text += f"\nUser: tell me more, part {turn}.\nAssistant:"
        reply = server.post("/generate", {"text": text, "sampling_params": {
            "max_new_tokens": output_len, "temperature": 0, "ignore_eos": True}})
        completion += reply["meta_info"]["completion_tokens"]
        cached.append(reply["meta_info"]["cached_tokens"])
        text += reply["text"]
    return completion, cached


def run_row(model: Path, pool: str, workload: str) -> dict:
    """Start a server of ``pool`` sized for ``workload``, run it, stop the server; one result row."""
    pool_tokens, args = WORKLOADS[workload][4], SERVER_ARGS.get(workload, [])
    row = {"config": pool, "workload": workload}
    if workload == "pressure-equal-bytes":
        diffkv_tokens, row["kv_bytes"] = equal_bytes_tokens(model, pool_tokens, int(args[args.index("--context-length") + 1]))
        pool_tokens = diffkv_tokens if pool == "diffkv" else pool_tokens
    row["pool_tokens"] = pool_tokens
    started = time.monotonic()
    with SGLangServer(model, POOLS[pool] + args, max_total_tokens=pool_tokens, startup_timeout=600) as server, \
            tempfile.TemporaryDirectory(prefix="serving-cpu-") as workdir:
        row["startup_s"] = round(time.monotonic() - started, 1)
        before = gauges.read(server.url)[0] if pool == "diffkv" else None
        if workload == "chat-4turn":
            result = conversation(server, WORKLOADS[workload][1], WORKLOADS[workload][3])
        elif workload == "demo":
            result = demo(server)
        else:
            result = bench_serving(server, model, workload, Path(workdir))
        keys = ("duration", "completed", "total_input_tokens", "total_output_tokens", "output_throughput",
                "request_throughput", "mean_ttft_ms", "mean_tpot_ms", "median_itl_ms", "cached_tokens_per_turn",
                "example_seconds")
        row.update({k: result[k] for k in keys if k in result})
        row["requests"] = WORKLOADS[workload][3]
        row["wall_s"] = round(result["duration"], 2)
        row["output_tok_s"] = round(result["output_throughput"], 2) if "output_throughput" in result else None
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
    parser.add_argument("--update", action="store_true",
                        help="replace the rows of these workloads in an existing --out file, keep the others")
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        sys.exit(f"serving_cpu.py: no model in {args.model} (run `make model` first)")
    if args.update and not args.out.exists():
        sys.exit(f"serving_cpu.py: --update needs an existing --out file ({args.out} does not exist)")
    result = json.loads(args.out.read_text()) if args.update else {
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs", "model": args.model.name,
        "workloads": {}, "runs": [], "rows": []}
    shown = [os.path.relpath(a) if os.path.isabs(a) else a for a in sys.argv[1:]]   # never a machine path in results
    run = {"id": 1 + max((r["id"] for r in result["runs"]), default=0),
           "command": "python benchmarks/serving_cpu.py " + " ".join(shown), "tree": _tree(),
           "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    result["runs"].append(run)
    for workload in args.workloads:
        result["workloads"][workload] = dict(zip(("input_len", "output_len", "range_ratio", "requests", "pool_tokens"),
                                                 WORKLOADS[workload]))
        result["rows"] = [r for r in result["rows"] if r["workload"] != workload or r["config"] not in args.pools]
        for pool in args.pools:
            print(f"[serving_cpu] {workload} on {pool} ...", flush=True)
            try:
                row = run_row(args.model, pool, workload)
            except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
                row = {"config": pool, "workload": workload, "ok": False, "error": _portable(str(exc))[-1500:]}
            row["run"] = run["id"]
            print(f"[serving_cpu] {json.dumps(row)}", flush=True)
            result["rows"].append(row)
            args.out.write_text(json.dumps(result, indent=1))
    print(f"[serving_cpu] wrote {args.out}")


def _portable(text: str) -> str:
    """``text`` without this machine's paths (results are committed): the interpreter as ``python`` (a virtual
    environment may live outside the checkout), the checkout as ``.``, temporary paths as ``<tmp>``."""
    text = text.replace(sys.executable, "python").replace(str(REPO), ".")
    return re.sub(re.escape(tempfile.gettempdir()) + r"/[^\s'\"]*", "<tmp>", text)


def _tree() -> str:
    """The commit this run measured, with ``+changes`` if the working tree differs from it."""
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + (" +changes" if git("status", "--porcelain", "--untracked-files=no") else "")


if __name__ == "__main__":
    main()
