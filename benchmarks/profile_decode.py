"""One decode-attention case of ``kernels_gpu.py``, launched a few times, for Nsight Compute to profile.

    ncu --clock-control none --kernel-name regex:_decode_split_kernel --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \\
        --section SchedulerStats --section MemoryWorkloadAnalysis --csv \\
        python benchmarks/profile_decode.py --model llama-3-8b --batch 64 --context 16384 --mix diffkv_typical

The pool, page table and plan are built exactly as the benchmark builds them (same tiers, same staged tail), so
the counters explain the benchmark's timings. ``--time`` prints the case's median time instead.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_gpu import MIXES, MODELS, STAGED_TAIL, Pool, time_us  # noqa: E402

from diffkv_sglang.config import DiffKVConfig  # noqa: E402
from diffkv_sglang.kernels.decode_attention import DecodePlan  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-3-8b")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--mix", choices=sorted(MIXES), default="diffkv_typical")
    parser.add_argument("--launches", type=int, default=4, help="decode launches (ncu picks one with --launch-skip)")
    parser.add_argument("--time", action="store_true", help="then print the case's median time (not under ncu)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    device = torch.device("cuda")
    config = DiffKVConfig()
    q_heads, heads, dim = MODELS[args.model]
    page = config.page_size
    pool = Pool(config, heads, dim, args.batch * (args.context // page - STAGED_TAIL), args.batch * STAGED_TAIL,
                MIXES[args.mix], device)
    table, lens = pool.table([args.context] * args.batch)
    plan = DecodePlan(pool.store.view, q_heads, max_batch=args.batch, max_pages=table.shape[1])
    plan.plan(table, lens)
    q = torch.randn(args.batch, q_heads, dim, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    for _ in range(args.launches):
        plan.run(q, 0, out=out)
    torch.cuda.synchronize()
    if args.time:
        us = time_us(lambda: plan.run(q, 0, out=out), device)
        print(f"{args.model} batch {args.batch} context {args.context} {args.mix}: {us:.1f} us, "
              f"{pool.bytes_read(table, lens, q_heads) / (us * 1e-6) / 1e9:.0f} GB/s read, splits {plan.num_splits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
