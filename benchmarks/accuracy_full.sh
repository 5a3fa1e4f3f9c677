#!/usr/bin/env bash
# The full accuracy run behind benchmarks/results/accuracy.json, docs/accuracy.md and docs/accuracy.png, in
# priority order (each line is resumable: finished cells whose spec matches are skipped, so rerunning this script
# continues where it stopped). Hours on 2 CPU cores; `make model MODEL=...` must have converted both models.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SMOL=smollm2-135m-instruct
QWEN=qwen2.5-coder-0.5b-instruct
NEEDLES=needle_1k_aware,needle_1k_agnostic,needle_2k_aware,needle_2k_agnostic,needle_4k_aware,needle_4k_agnostic
EVERY_TASK=$NEEDLES,qa_2k,ppl,multiturn

# 0. teacher-forced agreement with dense (top-1 and KL) on every row the summaries show: dense and ours-dense run
#    first (every other row is compared with their stored views)
$PY benchmarks/accuracy.py --model $SMOL --tasks teacher_forced --configs \
    dense,ours-dense,k8v8,k8v4,k4v4,k2v2,diffkv-noprune,diffkv-noprune-ah4,diffkv,diffkv-layer,diffkv-3tier-k2v2,evict,calibrated
$PY benchmarks/accuracy.py --model $QWEN --tasks teacher_forced --configs \
    dense,ours-dense,k8v8,k8v4,k4v4,diffkv-noprune,diffkv,evict,calibrated

# 1. the main rows on every task: dense, the shipped defaults, DiffKV's published setting, the uniform and
#    eviction-only peers, the calibrated per-layer config
$PY benchmarks/accuracy.py --model $SMOL --tasks $EVERY_TASK \
    --configs dense,diffkv-noprune,diffkv,k8v4,k4v4,evict,calibrated
# 2. the alpha_high / alpha_low sweep that traces the ratio-accuracy curve
$PY benchmarks/accuracy.py --model $SMOL --tasks needle_1k_aware,needle_1k_agnostic,ppl \
    --configs diffkv-ah0.5,diffkv-ah2,diffkv-ah4,diffkv-al0.005,diffkv-al0.1,diffkv-ah4-al0.1,evict-al0.1,evict-al0.5
# 3. the same rows on the second model (4-bit keys hurt it: the calibrated config is the fix)
$PY benchmarks/accuracy.py --model $QWEN \
    --tasks $EVERY_TASK --configs dense,diffkv-noprune,calibrated,k8v4,diffkv,evict
# 4. the retrieval-safety variants (a lowest tier instead of pruning, layer-scope pruning) and the other peers
$PY benchmarks/accuracy.py --model $SMOL --tasks $NEEDLES,ppl,multiturn \
    --configs diffkv-3tier-k2v2,diffkv-layer,diffkv-noprune-ah4,k8v8,k2v2,diffkv-3tier
# 5. every tier and the retrieval-safety variants on the second model too, and its alpha sweep (1k needles, ppl)
$PY benchmarks/accuracy.py --model $QWEN --tasks needle_1k_aware,needle_1k_agnostic,ppl \
    --configs k8v8,k4v4,k2v2,diffkv-3tier,diffkv-layer,diffkv-ah4,diffkv-al0.1,evict-al0.1
# 6. alpha_high 4 without pruning on the second model (the earlier 3-sample cells lost a needle in each mode)
$PY benchmarks/accuracy.py --model $QWEN --tasks needle_1k_aware,needle_1k_agnostic,ppl --configs diffkv-noprune-ah4
