"""Turns engine_bench.py rows and their SGLang logs into the results file (benchmarks/results/serving-h200.json).

    python benchmarks/gpu/summarize.py RESULTS.jsonl LOG_DIR PROBE.json OUT.json

From each row's log (``LOG_DIR/<config>-<workload>-<eager|graph>.log``, SGLang's scheduler output):
``max_running`` (the largest ``#running-req`` of a decode log line), ``peak_token_usage``, ``decode_log_tok_s``
(the median decode throughput SGLang logs while at least half the largest batch runs) and ``mean_decode_step_ms``
(running requests / that throughput, averaged over those lines), and for DiffKV the last pool line
(``diffkv_last_pool_line``: compression ratio, tier shares). Rows keep engine_bench's fields.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
from pathlib import Path

DECODE = re.compile(r"Decode batch.*?#running-req: (\d+).*?token usage: ([\d.]+).*?gen throughput \(token/s\): ([\d.]+)")
POOL = re.compile(r"DiffKV pool: .*")
STANDINS = [
    "sgl_kernel: benchmarks/gpu/standin/sgl_kernel (torch RMSNorm / fused add+RMSNorm; the real compiled ops do "
    "not load under torch 2.11)",
    "sglang.kernels.ops.gemm.cutedsl_dual_gemm replaced by a module whose can_use_dual_gemm is False (as on any "
    "non-SM100 GPU; benchmarks/gpu/standin/sitecustomize.py)",
    "SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python (the bundled Rust tree core panics under torch 2.11)",
    "random weights (load_format=dummy), random prompt token ids, ignore_eos",
]


def from_log(text: str) -> dict:
    lines = [(int(n), float(u), float(t)) for n, u, t in DECODE.findall(text)]
    out = {}
    if lines:
        peak = max(n for n, _, _ in lines)
        busy = [(n, t) for n, _, t in lines if n >= peak / 2 and t > 0]
        out.update(max_running=peak, peak_token_usage=max(u for _, u, _ in lines))
        if busy:
            out.update(decode_log_tok_s=round(statistics.median(t for _, t in busy), 1),
                       mean_decode_step_ms=round(1000 * statistics.mean(n / t for n, t in busy), 2))
    pool = POOL.findall(text)
    if pool:
        out["diffkv_last_pool_line"] = pool[-1]
    return out


def main(results: str, log_dir: str, probe: str, out: str) -> None:
    rows = [json.loads(line) for line in Path(results).read_text().splitlines() if line.strip()]
    for row in rows:
        log = Path(log_dir) / f"{row['config']}-{row['workload']}-{'graph' if row['cuda_graph'] else 'eager'}.log"
        if log.exists():
            row.update(from_log(log.read_text(errors="replace")))
    versions = json.loads(Path(probe).read_text()) if Path(probe).exists() else {}
    settings = {k: v for k, v in sorted(os.environ.items()) if k.startswith("BENCH_")}
    doc = {"command": "bash benchmarks/gpu/run.sh bench", "settings": settings, "versions": versions,
           "standins": STANDINS, "rows": rows}
    Path(out).write_text(json.dumps(doc, indent=1) + "\n")
    for row in rows:
        print(f"{row['config']:>15} {row['workload']} graph={row['cuda_graph']!s:5} ok={row.get('ok')} "
              f"out tok/s {row.get('output_tok_s')} max running {row.get('max_running')} "
              f"capacity {row.get('token_capacity')} {row.get('error', '')[:200]}")


if __name__ == "__main__":
    main(*sys.argv[1:5])
