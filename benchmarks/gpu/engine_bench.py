"""One throughput row: start an ``sglang.Engine`` on a model shape with random weights, warm it up, time one offline
batch, append one JSON line.

    python benchmarks/gpu/engine_bench.py --model-dir DIR --config dense-bf16|dense-fp8|diffkv-default|diffkv-k4v2
        --workload long-gen|long-context|short-chat [--cuda-graph] [--num-prompts N] [--mem-fraction 0.16]
        --out RESULTS.jsonl

``DIR`` holds a committed shape config (benchmarks/gpu/models) and the carried tokenizer (run.sh assembles it);
weights are random (``load_format="dummy"``), prompts random token ids (seeded: every row gets the same ones),
every request decodes exactly its output length (``ignore_eos``, greedy). Every row uses SGLang's Triton
attention backend for the dense pools (SGLang's default page size 1; DiffKV sets its own, 32), the pytorch
sampling backend and the same ``mem_fraction_static``, so the KV budget in bytes is the same. A warm-up batch
(long enough to seal pages) compiles the Triton kernels before the timed batch. SGLang's log (stderr, with the
scheduler's) carries ``#running-req`` and the DiffKV pool lines; summarize.py reads them from the row's log.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback

WORKLOADS = {"long-gen": (1024, 2048), "long-context": (16384, 256), "short-chat": (256, 128)}
CONFIGS = {                 # engine keywords of each row (besides the common ones)
    "dense-bf16": {},
    "dense-fp8": {"kv_cache_dtype": "fp8_e4m3"},
    "diffkv-default": {"kv_pool": "diffkv"},
    "diffkv-k4v2": {"kv_pool": "diffkv", "diffkv_alpha_high": 4.0},      # most entries in the K4V2 tier
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--config", required=True, choices=sorted(CONFIGS))
    p.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    p.add_argument("--cuda-graph", action="store_true", help="SGLang decode CUDA graphs (else disable_cuda_graph)")
    p.add_argument("--cuda-graph-max-bs", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--mem-fraction", type=float, default=0.16)
    p.add_argument("--out", required=True)
    return p.parse_args()


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def engine_kwargs(args) -> dict:
    kwargs = dict(model_path=args.model_dir, load_format="dummy", attention_backend="triton",
                  sampling_backend="pytorch", grammar_backend="none", mem_fraction_static=args.mem_fraction, skip_server_warmup=True, random_seed=1, log_level="info",
                  disable_cuda_graph=not args.cuda_graph, **CONFIGS[args.config])
    if args.cuda_graph:      # decode graphs only, for every pool (the diffkv plugin turns prefill graphs off itself)
        kwargs.update(cuda_graph_max_bs_decode=args.cuda_graph_max_bs, disable_prefill_cuda_graph=True)
    return kwargs


def main() -> int:
    args = parse_args()
    import sglang

    input_len, output_len = WORKLOADS[args.workload]
    with open(os.path.join(args.model_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    kwargs = engine_kwargs(args)
    row = {"config": args.config, "workload": args.workload, "cuda_graph": args.cuda_graph,
           "model": os.path.basename(args.model_dir.rstrip("/")), "input_len": input_len, "output_len": output_len,
           "requests": args.num_prompts, "mem_fraction_static": args.mem_fraction,
           "engine_kwargs": {k: v for k, v in kwargs.items() if k != "model_path"}, "ok": False}
    start = time.time()
    engine = None
    try:
        engine = sglang.Engine(**kwargs)
        row["init_s"] = round(time.time() - start, 1)
        info = engine.get_server_info()
        state = (info.get("internal_states") or [{}])[0]
        row["token_capacity"] = state.get("max_total_num_tokens", info.get("max_total_num_tokens"))
        row["max_running_requests"] = state.get("max_running_requests", info.get("max_running_requests"))
        warm = {"temperature": 0, "max_new_tokens": 96, "ignore_eos": True}
        t = time.time()
        engine.generate(input_ids=random_prompts(8, 200, vocab, seed=7), sampling_params=warm)
        row["warmup_s"] = round(time.time() - t, 1)
        print(f"[engine_bench] up in {row['init_s']} s, warm-up {row['warmup_s']} s, "
              f"token capacity {row['token_capacity']}", file=sys.stderr, flush=True)
        params = {"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}
        prompts = random_prompts(args.num_prompts, input_len, vocab, seed=1234)
        t = time.time()
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        elapsed = time.time() - t
        produced = sum(o["meta_info"]["completion_tokens"] for o in outs)
        row.update(gen_s=round(elapsed, 2), output_tokens=produced, output_tok_s=round(produced / elapsed, 1),
                   requests_s=round(args.num_prompts / elapsed, 4),
                   total_tok_s=round((produced + args.num_prompts * input_len) / elapsed, 1),
                   all_complete=produced == args.num_prompts * output_len, ok=True)
        print(f"[engine_bench] {args.config} {args.workload} graph={args.cuda_graph}: {args.num_prompts} requests "
              f"in {elapsed:.1f} s, {row['output_tok_s']} output tok/s", file=sys.stderr, flush=True)
    except Exception as error:
        row["error"] = f"{type(error).__name__}: {error}"[:2000]
        traceback.print_exc()
    finally:
        row["wall_s"] = round(time.time() - start, 1)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        if engine is not None:
            engine.shutdown()
    return 0 if row["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
