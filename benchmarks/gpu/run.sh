#!/bin/bash
# GPU side of the scripted path (docs/serving-gpu.md). Runs on the lent GPU machine from the repository root, with
# .cache/gpu/wheels and .cache/gpu/tokenizer carried (benchmarks/gpu/prepare.sh fills them here):
#   bash benchmarks/gpu/run.sh check          # install, probe, stand-in check, tests/test_cuda_ops.py + test_gpu_serving.py
#   bash benchmarks/gpu/run.sh bench          # throughput rows (BENCH_* below), Llama-3-8B shape
#   bash benchmarks/gpu/run.sh check bench    # both
# Every phase installs first (2-4 s from the carried wheels into a scratch folder). Results under $OUT (at most 8
# files come back): probe.json, standin-check.json, pytest.log, results.jsonl, serving.json, logs.tar.gz,
# standin-calls.jsonl.
# Check settings: CHECK_TIMEOUT (s, default 420; the whole of test_gpu_serving.py takes about 12 minutes, so split
# it with PYTEST_K, a pytest -k expression).
# Bench settings: BENCH_ROWS (config:eager|graph, in order), BENCH_WORKLOAD (long-gen | long-context |
# short-chat), BENCH_MODEL (a models/*.json name), BENCH_PROMPTS, BENCH_MEM (mem_fraction_static, the same for
# every row), BENCH_ROW_TIMEOUT (s), BENCH_START_BEFORE_S (no row starts after this many seconds of the call),
# BENCH_GRAPH_BS (largest decode batch with a CUDA graph, default 64; larger batches run eager, several times slower).
set -u
PHASES=" ${*:-check} "
REPO=$(cd "$(dirname "$0")/../.." && pwd)
GPU=$REPO/benchmarks/gpu
SCRATCH=$(mktemp -d)
OUTD=${OUT:-$SCRATCH/out}
mkdir -p "$OUTD" "$SCRATCH/tmp" "$SCRATCH/logs"
T0=$(date +%s)
say() { echo "[run.sh +$(( $(date +%s) - T0 ))s] $*"; }

# ------------------------------------------------------------------ install: wheels, then the working tree's package
SITE=$SCRATCH/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$REPO"/.cache/gpu/wheels/*.whl \
  || { echo "run.sh: install failed (run benchmarks/gpu/prepare.sh and carry .cache/gpu/wheels)"; exit 1; }
rm -rf "$SITE/diffkv_sglang" && ln -s "$REPO/diffkv_sglang" "$SITE/diffkv_sglang"   # the wheel's dist-info, this tree's code
ln -s "$REPO/diffkv_devtools" "$SITE/diffkv_devtools"   # the tests' server launcher and gauges (never in the wheel)
say "installed $(ls "$REPO"/.cache/gpu/wheels | wc -l) wheels into $SITE"
export PYTHONPATH=$GPU/standin:$SITE PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TMPDIR=$SCRATCH/tmp
export DIFFKV_GPU_TOKENIZER=$REPO/.cache/gpu/tokenizer DIFFKV_GPU_STANDIN_LOG=$OUTD/standin-calls.jsonl
export SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1          # the stand-in has no sglang-kernel dist-info
export SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python   # the bundled Rust tree core panics under torch 2.11
export DIFFKV_GPU_NO_SM100_DUAL_GEMM=1 DIFFKV_GPU_LOG_S=5   # standin/sitecustomize.py
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$SCRATCH"                                          # never the repo root: its kernels/ must not shadow PyPI's

python3 - "$OUTD/probe.json" <<'PY' || { echo "run.sh: probe failed"; exit 1; }
import importlib.metadata as md, json, sys, time
import torch, triton, transformers
t = time.time()
import sglang
from sglang.srt.server_args import ServerArgs   # noqa: F401  (the part the plugin hooks)
import_s = time.time() - t
eps = {e.name: e.value for e in md.entry_points(group="sglang.srt.plugins")}
register = md.entry_points(group="sglang.srt.plugins")["diffkv"].load()
import sgl_kernel
probe = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
         "transformers": transformers.__version__, "sglang": sglang.__version__, "python": sys.version.split()[0],
         "import_sglang_s": round(import_s, 1), "entry_points": eps, "register": f"{register.__module__}.{register.__name__}",
         "sgl_kernel": sgl_kernel.__version__, "diffkv_sglang": md.version("diffkv-sglang")}
json.dump(probe, open(sys.argv[1], "w"), indent=1)
print("probe:", json.dumps(probe))
PY

if [[ $PHASES == *" check "* ]]; then
  say "stand-in check"
  python3 "$GPU/check_standin.py" cuda --out "$OUTD/standin-check.json" | tail -2
  say "pytest tests/test_cuda_ops.py tests/test_gpu_serving.py"
  timeout "${CHECK_TIMEOUT:-420}" python3 -m pytest -p no:cacheprovider -q -rA -s "$REPO/tests/test_cuda_ops.py" \
    "$REPO/tests/test_gpu_serving.py" ${PYTEST_K:+-k "$PYTEST_K"} > "$OUTD/pytest.log" 2>&1
  say "pytest rc=$?"
  grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|graph vs eager|cached tokens|fork cached" "$OUTD/pytest.log" | tail -40
fi

if [[ $PHASES == *" bench "* ]]; then
  MODEL=$SCRATCH/models/${BENCH_MODEL:-llama3-8b}
  mkdir -p "$MODEL" && cp "$GPU/models/${BENCH_MODEL:-llama3-8b}.json" "$MODEL/config.json" && cp "$DIFFKV_GPU_TOKENIZER"/* "$MODEL/"
  for row in ${BENCH_ROWS:-dense-bf16:graph diffkv-default:graph dense-fp8:graph}; do
    if [ $(( $(date +%s) - T0 )) -gt ${BENCH_START_BEFORE_S:-420} ]; then say "skip $row: time"; continue; fi
    config=${row%%:*}; mode=${row##*:}
    tag=$config-${BENCH_WORKLOAD:-long-gen}-$mode
    say "bench $tag"
    timeout "${BENCH_ROW_TIMEOUT:-300}" python3 "$GPU/engine_bench.py" --model-dir "$MODEL" --config "$config" \
      --workload "${BENCH_WORKLOAD:-long-gen}" --num-prompts "${BENCH_PROMPTS:-64}" --mem-fraction "${BENCH_MEM:-0.16}" \
      $([ "$mode" = graph ] && echo --cuda-graph --cuda-graph-max-bs "${BENCH_GRAPH_BS:-64}") --out "$OUTD/results.jsonl" > "$SCRATCH/logs/$tag.log" 2>&1
    rc=$?
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "{\"config\": \"$config\", \"workload\": \"${BENCH_WORKLOAD:-long-gen}\", \"cuda_graph\": $([ "$mode" = graph ] && echo true || echo false), \"ok\": false, \"error\": \"killed after BENCH_ROW_TIMEOUT (exit status $rc)\"}" >> "$OUTD/results.jsonl"
    grep -E "^\[engine_bench|Error|error:" "$SCRATCH/logs/$tag.log" | cut -c1-300 | tail -4
  done
  python3 "$GPU/summarize.py" "$OUTD/results.jsonl" "$SCRATCH/logs" "$OUTD/probe.json" "$OUTD/serving.json"
fi

find "$SCRATCH/tmp" -name server.log | while read -r f; do cp "$f" "$SCRATCH/logs/server-$(basename "$(dirname "$f")").log"; done
tar -czf "$OUTD/logs.tar.gz" -C "$SCRATCH" logs
say "end"
