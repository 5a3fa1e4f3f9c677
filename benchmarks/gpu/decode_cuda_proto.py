"""GPU check and benchmark of the CUDA decode split kernel (issue 12) against the Triton one, in one process::

    PYTHONPATH=. python benchmarks/gpu/decode_cuda_proto.py --out $OUT/decode-cuda-proto.json   # ~3-4 min, H100

1. Copy bandwidth (``kernels_gpu.copy_gbps``), then the JIT build of ``kernels/cuda/sealed_decode.cu`` (timed) and
   the kernel's registers, spills, resident CTAs per SM and shared memory.
2. Checks: ``DecodePlan`` with the CUDA split kernel (and with the Triton one, as a control) against the torch
   reference (``DecodeAttentionWrapper`` on a CPU copy of the store) with the error bound of
   ``tests/test_kernel_decode.py`` (``tests/kernel_support/decode_bound.py``, bfloat16 query: ``u = 2^-11``, staged
   probabilities in bfloat16: ``staged_u = 2^-8``): all-high pools with 10% pruned tokens and sealed pages only, and
   30/50/20 and 10/40/50 (high / low / pruned) pools whose requests end in ``STAGED_TAIL`` staged pages, there with
   the staged tokens' importance (``score_sum``) against the reference's; requests whose last page is partly valid;
   plus the largest CUDA / Triton difference.
3. Timings, CUDA-graph replay over disjoint copies of the data (``kernels_gpu.graph_us``), Llama-3-8B (32 / 8
   heads, head_dim 128) and SmolLM2 (9 / 3, 64) shapes, bfloat16, one layer, default tiers, batch 16 / 64, context
   4k / 16k, three pools per shape: all-high with every page sealed (the prototype's cases), 30/50/20 and 10/40/50
   (``kernels_gpu.Pool``: tiers forced per token) with the staged tail: ``DecodePlan.run`` with the Triton and
   with the CUDA split kernel (same split count, same merge), a streaming read of the same sealed blocks through
   the same page table (a Triton kernel below: descriptors, then each block's bytes; best of two split counts)
   and dense SDPA (``kernels_gpu.dense_sdpa_us``). ``bw_*`` = bytes read (``Pool.bytes_read``; for the stream, its
   sealed blocks and tables) / time / copy bandwidth; ``cuda_vs_dense_bytes`` = CUDA time / (dense time x byte
   ratio), the issue's target <= 1.25.

The JSON is written after every phase (a time-out keeps what was measured); failed checks and errors are printed
in capitals and recorded under ``errors``; the exit status is 1 if anything failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
sys.path.insert(0, os.path.join(REPO, "tests", "kernel_support"))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from decode_bound import error_bound  # noqa: E402
from kernels_gpu import (MIXES, MODELS, STAGED_TAIL, Pool, copy_gbps, dense_sdpa_us, free_cache,  # noqa: E402
                         graph_us, l2_copies, log)

from diffkv_sglang.attention import DecodeAttentionWrapper  # noqa: E402
from diffkv_sglang.config import DiffKVConfig  # noqa: E402
from diffkv_sglang.format import PageState  # noqa: E402
from diffkv_sglang.kernels.cuda_decode import load_extension  # noqa: E402
from diffkv_sglang.kernels.decode_attention import DecodePlan  # noqa: E402

BATCHES = (16, 64)
CONTEXTS = (4096, 16384)
CHECK_MIX = (0.9, 0.0, 0.1)               # Pool mix: tier shares, then the pruned share
TIMED_MIXES = {"all_high": False, "diffkv_typical": True, "heavy_pruning": True}   # MIXES key: staged tail?
CHECKS = {                                # name: (q heads, kv heads, head_dim, seq_lens, mix, staged tail)
    "llama-3-8b shape, gqa 4": (32, 8, 128, [4096 + 13, 1000, 1, 2048], CHECK_MIX, False),
    "smollm2 shape, gqa 3": (9, 3, 64, [16384 - 5, 333, 2900], CHECK_MIX, False),
    "gqa 8": (32, 4, 128, [3000, 65, 1], CHECK_MIX, False),
    "gqa 7": (28, 4, 128, [1500, 4100], CHECK_MIX, False),
    "llama-3-8b shape, 30/50/20, staged tail": (32, 8, 128, [4096 + 13, 1000, 70, 2048], MIXES["diffkv_typical"],
                                                True),
    "smollm2 shape, 10/40/50, staged tail": (9, 3, 64, [16384 - 5, 333, 2900], MIXES["heavy_pruning"], True),
    "gqa 7, 30/50/20, staged tail": (28, 4, 128, [1500, 4100, 97], MIXES["diffkv_typical"], True),
}
STREAM_PROGRAMS_PER_SM = (4, 16)
U = 2 ** -11                              # float16 rounding of the bfloat16 query's products
STAGED_U = 2 ** -8                        # bfloat16 rounding of staged tokens' probabilities
RTOL = 1e-5


@triton.jit
def _stream_blocks_kernel(U32, BLOCK_OFFSET, BLOCK_NBYTES, PAGE_STATE, PAGE_TABLE, stride_pt, SEQ_LENS, SINK,
                          num_splits, SEALED: tl.constexpr, NUM_KV_HEADS: tl.constexpr, P: tl.constexpr,
                          WORDS: tl.constexpr, UNROLL: tl.constexpr):
    """Read the sealed blocks of one split of one (request, KV head) of a one-layer store the way a decode kernel
    must (page id, descriptor, then the block's bytes as int32 words, UNROLL blocks in flight) and xor them into
    SINK ``[B * H * num_splits]`` int32 so that nothing is optimised away. Grid (B, H, num_splits)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    num_pages = tl.cdiv(tl.load(SEQ_LENS + b), P)
    per_split = tl.cdiv(num_pages, num_splits)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, num_pages)
    words = tl.arange(0, WORDS)
    total = tl.zeros([WORDS], tl.int32)
    for j in range(lo, hi, UNROLL):
        for u in tl.static_range(UNROLL):
            ok = j + u < hi
            page = tl.load(PAGE_TABLE + b * stride_pt + j + u, mask=ok, other=0).to(tl.int64)
            slot = page * NUM_KV_HEADS + h
            offset = tl.load(BLOCK_OFFSET + slot, mask=ok, other=0)
            sealed = tl.load(PAGE_STATE + page, mask=ok, other=0) == SEALED
            nbytes = tl.load(BLOCK_NBYTES + slot, mask=ok & sealed, other=0)
            total ^= tl.load(U32 + tl.multiple_of(offset // 4, 4) + words, mask=words < nbytes // 4, other=0)
    tl.store(SINK + (b * NUM_KV_HEADS + h) * num_splits + split, tl.xor_sum(total, 0))


def stream_blocks(store, table: torch.Tensor, seq_lens: torch.Tensor, num_splits: int, sink: torch.Tensor) -> None:
    """Launch :func:`_stream_blocks_kernel` on a one-layer store over the batch of ``table`` ``[B, n]`` / ``seq_lens``
    ``[B]``."""
    kv = store.view
    batch, heads = table.shape[0], kv.num_kv_heads
    _stream_blocks_kernel[(batch, heads, num_splits)](
        kv.typed(torch.int32), kv.block_offset, store.arena.block_nbytes, kv.page_state, table, table.stride(0),
        seq_lens, sink, num_splits, SEALED=int(PageState.SEALED), NUM_KV_HEADS=heads, P=kv.page_size,
        WORDS=triton.next_power_of_2(kv.formats[0].max_block_nbytes // 4), UNROLL=4, num_warps=4)


def stream_bytes(store, table: torch.Tensor, seq_lens: torch.Tensor) -> int:
    """Bytes :func:`stream_blocks` reads: the sealed blocks, their offsets and sizes, page ids and states."""
    page = store.page_size
    pages = (seq_lens.long() + page - 1) // page
    used = table[torch.arange(table.shape[1], device=table.device)[None, :] < pages[:, None]].long()
    slots = store.slots(used, 0).reshape(-1)
    sealed = (store.page_state[used] == PageState.SEALED).repeat_interleave(store.num_kv_heads)
    return int(store.arena.block_nbytes[slots][sealed].sum()) + 16 * slots.numel() + 5 * used.numel()


def sealed_table(pool: Pool, seq_lens: list[int], copy: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Page table ``[B, max_pages]`` int32 giving each request its own sealed pages (no staged tail; copy ``k``
    takes the pages after those of copies 0..k-1) and ``seq_lens`` int32."""
    page, device = pool.store.page_size, pool.store.device
    pages = [math.ceil(n / page) for n in seq_lens]
    table = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32, device=device)
    start = copy * sum(pages)
    if start + sum(pages) > pool.sealed.numel():
        raise ValueError("pool too small for this batch")
    for b, n in enumerate(pages):
        table[b, :n] = pool.sealed[start:start + n]
        start += n
    return table, torch.tensor(seq_lens, dtype=torch.int32, device=device)


def batch_table(pool: Pool, seq_lens: list[int], staged: bool, copy: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool's page table ``[B, n]`` int32 and ``seq_lens`` ``[B]`` int32: sealed pages only, or (``staged``)
    sealed pages then ``STAGED_TAIL`` staged ones per request (``Pool.table``)."""
    if not staged:
        return sealed_table(pool, seq_lens, copy)
    table, lens = pool.table(seq_lens, copy)
    return table.to(torch.int32), lens.to(torch.int32)


def disjoint_copies(pool: Pool, seq_lens: list[int], staged: bool) -> int:
    """How many disjoint copies of the batch's sealed pages the pool holds."""
    pages = [math.ceil(n / pool.store.page_size) - (STAGED_TAIL if staged else 0) for n in seq_lens]
    return pool.sealed.numel() // sum(pages)


def check(name: str, q_heads: int, heads: int, dim: int, seq_lens: list[int], mix, staged: bool, device) -> dict:
    """CUDA and Triton split kernels (through DecodePlan) against the torch reference with the derived bound, and
    the staged tokens' importance after the CUDA path (module docstring)."""
    config = DiffKVConfig()
    tail = STAGED_TAIL if staged else 0
    pages = sum(math.ceil(n / config.page_size) - tail for n in seq_lens)
    pool = Pool(config, heads, dim, pages, tail * len(seq_lens), mix, "cpu", seed=1)
    table, lens = batch_table(pool, seq_lens, staged)
    in_request = torch.arange(table.shape[1])[None, :] < (lens[:, None] + config.page_size - 1) // config.page_size
    staged_pages = table[in_request & (pool.store.page_state[table.long()] == PageState.STAGED)].long()
    q = torch.randn(len(seq_lens), q_heads, dim).to(torch.bfloat16)
    store = pool.store.to(device)                           # before the reference adds importance
    before = pool.store.staged_importance(0, staged_pages)[0].clone()
    reference = DecodeAttentionWrapper(pool.store, q_heads)
    reference.plan(table, lens)
    ref = reference.run(q.float(), 0)
    ref_score = pool.store.staged_importance(0, staged_pages)[0] - before
    outputs, scores, splits = {}, {}, {}
    for path in ("cuda", "triton"):                         # cuda first: its importance is compared
        plan = DecodePlan(store.view, q_heads, max_batch=len(seq_lens), max_pages=table.shape[1], split_kernel=path)
        plan.plan(table.to(device), lens.to(device))
        if path == "cuda" and plan._cuda is None:
            raise RuntimeError("the CUDA split kernel is unavailable (see the warning above)")
        for workspace in (plan._part_m, plan._part_l, plan._part_acc, plan._logits):
            workspace.fill_(float("nan"))
        out = torch.full(q.shape, float("nan"), device=device)
        plan.run(q.to(device), 0, out=out)
        outputs[path] = out.cpu()
        scores[path] = store.staged_importance(0, staged_pages.to(device))[0].cpu() - before   # this run's share
        splits[path] = plan.num_splits
    bound, logit_err = error_bound(pool.store, table, lens, 0, q.float(), plan.sm_scale, U, ref, staged_u=STAGED_U,
                                   float32_slack=RTOL)
    row = {"name": name, "seq_lens": seq_lens, "mix": mix, "staged_tail": staged, "splits": splits["cuda"],
           "staged_pages": int(staged_pages.numel())}
    for path, out in outputs.items():
        row[f"{path}_finite"] = bool(torch.isfinite(out).all())
        row[f"{path}_max_err_over_bound"] = float(((out - ref).double().abs() / bound).max())
    scale = float(outputs["triton"].abs().max())
    row["cuda_vs_triton_max_rel_diff"] = float((outputs["cuda"] - outputs["triton"]).abs().max()) / scale
    rtol = math.expm1(2 * float(logit_err.max())) + RTOL
    score_err = (scores["cuda"] - ref_score).abs() / (rtol * ref_score.abs() + 1e-7)
    row["cuda_importance_err_over_tol"] = float(score_err.max()) if staged_pages.numel() else 0.0
    row["ok"] = (all(row[f"{p}_finite"] and row[f"{p}_max_err_over_bound"] <= 1 for p in outputs)
                 and row["cuda_importance_err_over_tol"] <= 1)
    log(f"check {name}: error / bound cuda {row['cuda_max_err_over_bound']:.3f}, triton "
        f"{row['triton_max_err_over_bound']:.3f}, cuda vs triton {row['cuda_vs_triton_max_rel_diff']:.1e}, "
        f"importance error / tolerance {row['cuda_importance_err_over_tol']:.3f} -> "
        f"{'ok' if row['ok'] else 'CHECK FAILED'}")
    return row


def time_case(pool: Pool, model: str, mix: str, staged: bool, batch: int, context: int, q_heads: int, copy: float,
              dense: dict) -> dict:
    """Triton and CUDA split kernels (DecodePlan), streaming read and dense SDPA on one (mix, batch, context)."""
    store = pool.store
    device, dim, heads = store.device, store.head_dim, store.num_kv_heads
    lens_list = [context] * batch
    table, lens = batch_table(pool, lens_list, staged)
    nbytes = pool.bytes_read(table, lens, q_heads)
    copies = l2_copies(nbytes, device, disjoint_copies(pool, lens_list, staged))
    cases = []
    for k in range(copies):
        table_k, lens_k = batch_table(pool, lens_list, staged, k)
        plans = {}
        for path in ("triton", "cuda"):
            plans[path] = DecodePlan(store.view, q_heads, max_batch=batch, max_pages=table.shape[1],
                                     split_kernel=path)
            plans[path].plan(table_k, lens_k)
        q = torch.randn(batch, q_heads, dim, device=device, dtype=torch.bfloat16)
        cases.append((plans, q, torch.empty_like(q), table_k, lens_k))
    row = {"model": model, "mix": mix, "tiers": dict(zip(("high", "low", "pruned"), MIXES[mix])),
           "staged_tail": STAGED_TAIL if staged else 0, "batch": batch, "context": context, "head_dim": dim,
           "q_heads": q_heads, "kv_heads": heads, "bytes_read": nbytes,
           "dense_bytes": 2 * batch * heads * context * dim * 2, "l2_copies": copies,
           "splits": cases[0][0]["cuda"].num_splits,
           "dense_sdpa_us": dense["us"], "dense_sdpa_backend": dense["backend"]}
    for path in ("triton", "cuda"):
        row[f"{path}_us"] = graph_us([lambda c=c, p=path: c[0][p].run(c[1], 0, out=c[2]) for c in cases], device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    stream = {}
    for per_sm in STREAM_PROGRAMS_PER_SM:
        splits = max(1, math.ceil(per_sm * sms / (batch * heads)))
        sink = torch.empty(batch * heads * splits, dtype=torch.int32, device=device)
        stream[splits] = graph_us([lambda c=c, s=splits, o=sink: stream_blocks(store, c[3], c[4], s, o)
                                   for c in cases], device)
    row["stream_splits"], row["stream_us"] = min(stream.items(), key=lambda kv: kv[1])
    row["stream_bytes"] = stream_bytes(store, table, lens)
    for key in ("triton", "cuda", "stream", "dense_sdpa"):
        read = {"dense_sdpa": row["dense_bytes"], "stream": row["stream_bytes"]}.get(key, nbytes)
        us = row[f"{key}_us"]
        row[f"bw_{key}"] = read / us / (copy * 1e3) if us else None
    row["cuda_speedup_vs_triton"] = row["triton_us"] / row["cuda_us"]
    row["cuda_vs_dense_bytes"] = (row["cuda_us"] / (dense["us"] * nbytes / row["dense_bytes"])
                                  if dense["us"] else None)
    log(f"  {model:<11} {mix:<15} batch {batch:>3} context {context:>5}: triton {row['triton_us']:8.1f} us "
        f"(bw {row['bw_triton']:.2f}), cuda {row['cuda_us']:8.1f} us (bw {row['bw_cuda']:.2f}), stream "
        f"{row['stream_us']:8.1f} us (bw {row['bw_stream']:.2f}), dense {dense['us'] or float('nan'):8.1f} us, "
        f"cuda/(dense x bytes) {row['cuda_vs_dense_bytes'] or float('nan'):.2f}")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "decode-cuda-proto.json"))
    parser.add_argument("--checks-only", action="store_true", help="the checks (phase 2) without the timings")
    args = parser.parse_args()
    started = time.perf_counter()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    device = torch.device("cuda")
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(device), "command": " ".join(["python", *sys.argv]),
              "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda},
              "errors": []}

    def save() -> None:
        result["seconds"] = time.perf_counter() - started
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)

    def attempt(what: str, fn):
        try:
            return fn()
        except Exception as exc:              # noqa: BLE001  (recorded, printed, and the run goes on)
            log(f"ERROR in {what}: {type(exc).__name__}: {exc}")
            result["errors"].append({"where": what, "error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc()[-3000:]})
            save()
            return None

    log(f"device {result['device']}, torch {torch.__version__}, triton {triton.__version__}")
    result["copy_gbps"] = copy_gbps(device, 1 << 30)
    log(f"copy bandwidth {result['copy_gbps']:.0f} GB/s")
    t0 = time.perf_counter()
    built = attempt("JIT build", load_extension) is not None
    result["build_seconds"] = time.perf_counter() - t0
    log(f"CUDA extension {'built/loaded' if built else 'NOT BUILT'} in {result['build_seconds']:.0f} s")
    save()

    result["checks"] = [row for name, (q_heads, heads, dim, lens, mix, staged) in CHECKS.items()
                        if (row := attempt(f"check {name}", lambda: check(name, q_heads, heads, dim, lens, mix, staged,
                                                                          device)))]
    failed = [row["name"] for row in result["checks"] if not row["ok"]]
    save()
    if args.checks_only:
        return _finish(result, failed, save)

    result["kernel_info"], result["decode"] = {}, []
    config = DiffKVConfig()
    for model, (q_heads, heads, dim) in MODELS.items():
        dense = {(b, c): dense_sdpa_us(b, c, q_heads, heads, dim, device) for b in BATCHES for c in CONTEXTS}
        free_cache(device)
        for mix, staged in TIMED_MIXES.items():
            t0 = time.perf_counter()
            sealed = max(BATCHES) * (math.ceil(max(CONTEXTS) / config.page_size) - (STAGED_TAIL if staged else 0))
            pool = Pool(config, heads, dim, sealed, STAGED_TAIL * max(BATCHES) if staged else 0, MIXES[mix], device)
            log(f"{model} {mix}: pool {pool.arena_bytes / 2**30:.2f} GiB in {time.perf_counter() - t0:.1f} s")
            if built and model not in result["kernel_info"]:
                plan = DecodePlan(pool.store.view, q_heads, max_batch=1, max_pages=1, split_kernel="cuda")
                info = attempt(f"kernel info {model}", lambda: plan._cuda.kernel_info(0))
                result["kernel_info"][model] = info
                log(f"  kernel: {info}")
            for batch in BATCHES:
                for context in CONTEXTS:
                    row = attempt(f"timing {model} {mix} batch {batch} context {context}",
                                  lambda: time_case(pool, model, mix, staged, batch, context, q_heads,
                                                    result["copy_gbps"], dense[(batch, context)]))
                    if row:
                        result["decode"].append(row)
                    save()
            del pool
            free_cache(device)

    rows = result["decode"]
    if rows:
        keys = ("bw_triton", "bw_cuda", "bw_stream", "bw_dense_sdpa", "cuda_speedup_vs_triton", "cuda_vs_dense_bytes")
        result["summary"] = {mix: {key: statistics.median(r[key] for r in rows
                                                          if r["mix"] == mix and r[key] is not None)
                                   for key in keys} for mix in dict.fromkeys(r["mix"] for r in rows)}
        log("\n" + f"{'model':<11} {'mix':<15} {'batch':>5} {'ctx':>6} {'MB':>7} {'triton':>8} {'cuda':>8} "
            f"{'stream':>8} {'dense':>8}   bw: {'triton':>6} {'cuda':>6} {'stream':>6}")
        for r in rows:
            log(f"{r['model']:<11} {r['mix']:<15} {r['batch']:>5} {r['context']:>6} {r['bytes_read'] / 1e6:>7.1f} "
                f"{r['triton_us']:>8.1f} {r['cuda_us']:>8.1f} {r['stream_us']:>8.1f} "
                f"{r['dense_sdpa_us'] or float('nan'):>8.1f}        {r['bw_triton']:>6.2f} {r['bw_cuda']:>6.2f} "
                f"{r['bw_stream']:>6.2f}")
        log("summary (medians per mix): " + json.dumps(result["summary"]))
    return _finish(result, failed, save)


def _finish(result: dict, failed: list[str], save) -> int:
    """Save, print what failed; the exit status (1 if a check failed or anything raised)."""
    save()
    if failed:
        log(f"CHECKS FAILED: {', '.join(failed)}")
    if result["errors"]:
        log(f"ERRORS in: {', '.join(e['where'] for e in result['errors'])}")
    log(f"wrote the results in {result['seconds']:.0f} s")
    return 1 if failed or result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
