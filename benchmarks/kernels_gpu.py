"""GPU benchmark of the Triton kernels (decode attention, seal, compaction, extend): checked, then timed, in one run.

One run measures the device-to-device copy bandwidth, checks every kernel against its torch reference (outputs
and workspaces poisoned first; seal and compaction byte for byte), times kernels and peers with
``triton.testing.do_bench`` (median; decode: CUDA-graph replay, see below), and writes ``$OUT/kernels-h100.json`` (``benchmarks/results/`` without
``$OUT``)::

    python benchmarks/kernels_gpu.py            # H100: the full grid (several minutes)
    python benchmarks/kernels_gpu.py --quick    # decode batch 16/64, context 4k/16k, all-high and 30/50/20,
                                                # plus seal and compaction: under ~3 minutes on an H100
    python benchmarks/kernels_gpu.py --tune     # also times every TUNE_CONFIGS entry on a few decode cases
    python benchmarks/kernels_gpu.py --smoke    # tiny sizes; runs on CPU under TRITON_INTERPRET=1

The result: ``device``, ``versions``, ``command`` (this command line), ``copy_gbps`` (bytes read + written per
second of a 2 GiB copy, / 1e9), ``checks`` (``decode`` / ``seal`` / ``compaction``, each with ``ok``),
``decode``, ``decode_summary`` and ``targets`` (batch >= 16 and context >= 4k), ``seal``, ``seal_launch_host_us``,
``compaction``, ``seconds``. The file is written after each decode pool (a time-out keeps partial results) and
at the end; the exit status is 1 if a check failed.

Decode: Llama-3-8B (32 q / 8 kv heads, head_dim 128) and SmolLM2 (9 / 3, 64) shapes, default tiers (k8v4, k4v2),
one layer, every request its own sealed pages then two staged pages. ``bytes_read`` counts what the kernel must
read: the blocks of the request's pages (codes, metadata, padding; staged pages in full), the descriptor rows it
touches (block offset, tier counts, page state, page table and staged rank), q and the output;
``bw_fraction = bytes_read / diffkv time / copy_gbps``. ``dense_sdpa_us``: the fastest of SDPA's flash and cuDNN
backends on contiguous bf16 K/V of the same batch and context (the best-case dense peer). Both are GPU times from
CUDA-graph replays (how SGLang runs decode), cycling over disjoint copies of the batch's data where one copy would
stay in the 50 MB L2 cache between calls; ``diffkv_eager_us`` / ``dense_sdpa_eager_us`` time the eager calls
(``do_bench``, L2 flushed), where host launch overhead shows when it exceeds the GPU time.

Seal: Llama-3-8B (128) and SmolLM2 (64) blocks, page 32, tiers k8v4/k4v2, 256, 4096 and 16384 blocks (16384: one
store chunk of 64 pages x 32 layers x 8 KV heads), mixes all-high / 30-50-20 / heavy pruning, K/V read from
staged blocks in the arena; ``torch_us`` times ``quant.write_sealed_blocks`` on the same device. Compaction:
64 MiB and 1 GiB of blocks (16 B to 8 KiB) sliding down over holes; ``bytes_moved`` counts the gather and the
scatter, each read + write.

Extend: one request's chunk over a sealed prefix (see :func:`bench_extend`; its correctness is tested natively by
``tests/test_kernel_extend.py``), written to ``extend`` after the rest.

The references run on CPU stores (torch) and the kernels on CUDA, so ``DIFFKV_KERNELS`` must be unset (auto).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")          # before triton is imported

import triton  # noqa: E402
import triton.testing  # noqa: E402

from diffkv_sglang.attention import DecodeAttentionWrapper, ExtendAttentionWrapper  # noqa: E402
from diffkv_sglang.backend_select import KERNELS_ENV, kernel_mode  # noqa: E402
from diffkv_sglang.config import DiffKVConfig, TierSpec  # noqa: E402
from diffkv_sglang.format import BlockFormat, StagedBlockFormat  # noqa: E402
from diffkv_sglang.kernels.compaction import move_blocks, move_blocks_reference  # noqa: E402
from diffkv_sglang.kernels.decode_attention import TUNE_CONFIGS, DecodeConfig, DecodePlan  # noqa: E402
from diffkv_sglang.kernels.extend_attention import ExtendPlan  # noqa: E402
from diffkv_sglang.kernels.seal import seal_blocks  # noqa: E402
from diffkv_sglang.quant import tier_counts, write_sealed_blocks  # noqa: E402
from diffkv_sglang.store import CompressedKVStore, PageState  # noqa: E402

MiB = 1 << 20
MODELS = {"llama-3-8b": (32, 8, 128), "smollm2": (9, 3, 64)}       # q heads, kv heads, head_dim
MIXES = {"all_high": (1.0, 0.0, 0.0), "diffkv_typical": (0.3, 0.5, 0.2), "heavy_pruning": (0.1, 0.4, 0.5)}
STAGED_TAIL = 2                 # staged pages at the end of every request (the protected window)
MEMORY_LIMIT = 60 << 30         # skip cases whose arena or dense K/V would not fit
CHUNK_BLOCKS = 1 << 11          # blocks quantized at once; the rest of a pool repeats their bytes
TUNE_CASES = (("llama-3-8b", 1, 32768), ("llama-3-8b", 16, 4096), ("llama-3-8b", 64, 16384), ("smollm2", 16, 16384),
              ("smollm2", 64, 4096))
SEAL_TIERS = (TierSpec(8, 4), TierSpec(4, 2))
SEAL_MIXES = {"all_high": (1.0, 0.0, 0.0), "diffkv_typical": (0.3, 0.5, 0.2), "heavy_pruning": (0.1, 0.3, 0.6)}
SEAL_PAGE = 32
EXTEND_CASES = (("llama-3-8b", 0, 4096), ("llama-3-8b", 0, 16384), ("llama-3-8b", 14336, 2048),
                ("smollm2", 0, 8192), ("smollm2", 6144, 2048))      # model, sealed prefix tokens, new tokens

GRIDS = {
    "full": dict(models=MODELS, batches=(1, 16, 64, 256), contexts=(1024, 4096, 16384, 32768), mixes=MIXES,
                 check_lens=[1024, 2000, 3333], seal_blocks=(256, 4096, 16384), seal_check_blocks=256,
                 compaction_bytes=(64 * MiB, 1024 * MiB), copy_bytes=2 << 30, extend=EXTEND_CASES),
    "quick": dict(models=MODELS, batches=(16, 64), contexts=(4096, 16384),
                  mixes={name: MIXES[name] for name in ("all_high", "diffkv_typical")},
                  check_lens=[1024, 2000, 3333], seal_blocks=(4096, 16384), seal_check_blocks=256,
                  compaction_bytes=(64 * MiB, 1024 * MiB), copy_bytes=2 << 30, extend=EXTEND_CASES),
    "smoke": dict(models={"llama-like": (4, 2, 32), "smollm-like": (3, 1, 32)}, batches=(1, 2), contexts=(96, 160),
                  mixes=MIXES, check_lens=[96, 150, 133], seal_blocks=(4,), seal_check_blocks=3,
                  compaction_bytes=(64 * 1024,), copy_bytes=MiB, extend=(("smollm2", 64, 96),)),
}
"""Per mode: decode models, batches, contexts and mixes; decode check lengths; seal block counts (and the
check's); compaction sizes (the first is also checked); copy size."""

WHY_MISSED = (
    "Decode, Nsight Compute on an H100 (benchmarks/profile_decode.py, batch 64, context 16k; 16-row tiles, one warp "
    "per program): latency-bound at low occupancy, neither DRAM- nor issue-bound. Registers limit an SM to 8 "
    "one-warp programs (Llama-3-8B shape: 255 registers per thread and spills to local memory; SmolLM2 shape: 240), "
    "theoretical occupancy 12.5%. Llama-3-8B shape: 56-59% of cycles have no eligible warp, issue slots are 39-42% "
    "busy, DRAM throughput is 38% of peak all-high and 18% at 30/50/20, where L1/TEX throughput is 70% (a mixed "
    "page is read as per-tier tiles: more, smaller loads for its bytes). SmolLM2 shape at 30/50/20: issue slots "
    "50%, DRAM 18%, L1/TEX 60%. At batch >= 64 the Llama-3-8B-shaped decode takes 0.92-0.99x the dense SDPA time "
    "all-high (0.40x the bytes) and 1.11-1.16x at 30/50/20 (0.23x the bytes).")
"""Why the decode targets were missed, as measured with Nsight Compute (H100, Triton 3.6; ``profile`` in the
committed results); written to ``targets["why_missed"]`` when a target is missed. Re-measure after changing the
kernels."""


def log(*args) -> None:
    print(*args, flush=True)


def time_us(fn, device, rep_ms: int = 50) -> float:
    """Median microseconds of ``fn``: ``do_bench`` on CUDA, one wall-clock call elsewhere (the interpreter)."""
    if torch.device(device).type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median") * 1e3


def graph_us(calls, device) -> float:
    """Median microseconds per call of ``calls`` (callables over disjoint data, cycled so that what one call reads
    has left the L2 cache when it runs again) replayed from a CUDA graph: GPU time without launch overhead, as
    SGLang's CUDA-graph decode runs them. Elsewhere (the interpreter): one wall-clock call."""
    if torch.device(device).type != "cuda":
        return time_us(calls[0], device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:                                   # warm-up (compilation) outside the capture
            call()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for call in calls:
            call()
        end.record()
        torch.cuda.synchronize()
        rounds = max(1, min(200, int(20.0 / max(start.elapsed_time(end), 1e-3))))   # ~20 ms of GPU work a replay
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(rounds):
                for call in calls:
                    call()
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / (rounds * len(calls)))
    return statistics.median(times)


def l2_copies(nbytes: int, device, limit: int) -> int:
    """How many disjoint copies of an ``nbytes`` working set make cycling through them spill the L2 cache
    (three times its size), at most ``limit``."""
    if torch.device(device).type != "cuda":
        return 1
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, min(limit, math.ceil(3 * l2 / max(nbytes, 1))))


def copy_gbps(device, nbytes: int) -> float:
    """Device-to-device copy bandwidth: bytes read + written per second / 1e9."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (time_us(lambda: dst.copy_(src), device) * 1e-6) / 1e9


def free_cache(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- decode
class Pool:
    """A one-layer store: ``sealed`` pages and ``staged`` pages, all tokens written. ``mix``: the share of tokens
    in each tier, then the pruned share (e.g. ``(0.3, 0.5, 0.2)`` with two tiers).

    Sealed blocks are quantized (reference codec, on the CPU) for one chunk of at most CHUNK_BLOCKS blocks;
    further chunks repeat the chunk's tiers, so their blocks have the same sizes and their bytes are copies
    (timing depends on sizes, not values).
    """

    def __init__(self, config: DiffKVConfig, heads: int, dim: int, sealed_pages: int, staged_pages: int,
                 mix: tuple[float, float, float], device, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        page = config.page_size
        chunk_pages = max(1, min(sealed_pages, CHUNK_BLOCKS // heads))
        reps = math.ceil(sealed_pages / chunk_pages)
        u = torch.rand(chunk_pages * heads, page, generator=gen)
        bounds = torch.tensor(mix[:-1]).cumsum(0)                                # tier shares, then pruned
        tiers = torch.searchsorted(bounds, u.reshape(-1), right=True).reshape(u.shape)
        tiers = torch.where(tiers < len(mix) - 1, tiers, -1)
        probe = CompressedKVStore(config, 1, heads, dim, num_pages=1, arena_bytes=16)
        fmt, staged_fmt = probe.formats[0], probe.formats.staged
        counts = tier_counts(tiers, fmt.num_tiers)
        nbytes = fmt.block_nbytes(counts)
        sealed_bytes = int(nbytes.sum()) * reps
        self.arena_bytes = sealed_bytes + staged_pages * heads * staged_fmt.nbytes + (1 << 20)
        self.store = store = CompressedKVStore(config, 1, heads, dim, num_pages=1 + reps * chunk_pages + staged_pages,
                                               arena_bytes=self.arena_bytes, dtype=torch.bfloat16, device=device)
        self.sealed = torch.arange(1, 1 + reps * chunk_pages, device=device)
        self.staged = torch.arange(1 + reps * chunk_pages, 1 + reps * chunk_pages + staged_pages, device=device)
        if sealed_pages:
            self._write_sealed(fmt, tiers, counts, nbytes, chunk_pages, reps, heads, page, dim, gen)
        if staged_pages:
            store.stage(self.staged)
            locs = (self.staged[:, None] * page + torch.arange(page, device=device)).reshape(-1)
            kv = torch.randn(2, locs.numel(), heads, dim, generator=gen).to(device)
            store.write_tokens(0, locs, kv[0] * 2, kv[1])

    def _write_sealed(self, fmt, tiers, counts, nbytes, chunk_pages, reps, heads, page, dim, gen) -> None:
        """Quantize one chunk of sealed blocks and repeat its bytes over the pool's sealed pages."""
        store, device = self.store, self.store.device
        offsets = store.arena.allocate(store.slots(self.sealed, 0).reshape(-1), nbytes.to(device).repeat(reps))
        n0, span = chunk_pages * heads, int(nbytes.sum())
        first = int(offsets[0])
        assert int(offsets[-n0]) == first + (reps - 1) * span, "blocks of a pool must be laid out chunk by chunk"
        chunk = torch.zeros(span, dtype=torch.uint8)
        keys = torch.randn(n0, page, dim, generator=gen) * 2
        write_sealed_blocks(fmt, chunk, offsets[:n0].cpu() - first, keys, torch.randn(keys.shape, generator=gen), tiers)
        chunk = chunk.to(device)
        for r in range(reps):
            store.arena.data[first + r * span:first + (r + 1) * span].copy_(chunk)
        counts = counts.to(device, torch.int32).repeat(reps, 1).reshape(-1, heads, fmt.num_tiers)
        store.tier_counts[self.sealed, 0] = counts
        store.page_state[self.sealed] = PageState.SEALED

    def table(self, seq_lens: list[int], copy: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Page table ``[B, max_pages]`` giving each request its own sealed pages then STAGED_TAIL staged pages;
        ``copy`` k takes the sealed pages after those of copies 0..k-1 (disjoint data, same sizes)."""
        page = self.store.page_size
        pages = [math.ceil(n / page) for n in seq_lens]
        table = torch.zeros(len(seq_lens), max(pages), dtype=torch.int64, device=self.store.device)
        next_sealed = copy * sum(n - STAGED_TAIL for n in pages)
        for b, n in enumerate(pages):
            body = n - STAGED_TAIL
            if next_sealed + body > self.sealed.numel() or (b + 1) * STAGED_TAIL > self.staged.numel():
                raise ValueError("pool too small for this batch")
            table[b, :body] = self.sealed[next_sealed:next_sealed + body]
            table[b, body:n] = self.staged[b * STAGED_TAIL:(b + 1) * STAGED_TAIL]
            next_sealed += body
        return table, torch.tensor(seq_lens, device=self.store.device)

    def bytes_read(self, table: torch.Tensor, seq_lens: torch.Tensor, q_heads: int) -> int:
        """What the kernel must read for this batch (see the module docstring)."""
        store, page = self.store, self.store.page_size
        pages = (seq_lens + page - 1) // page
        used = table[torch.arange(table.shape[1], device=table.device)[None, :] < pages[:, None]]
        slots = store.slots(used, 0).reshape(-1)
        blocks = int(store.arena.block_nbytes[slots].sum())
        per_block = 8 + 4 * store.config.num_tiers                 # block offset, tier counts
        per_page = 1 + 4 + 4                                       # page state, page table, staged rank
        vectors = 2 * seq_lens.numel() * q_heads * store.head_dim * 2   # q and out, bf16
        return blocks + slots.numel() * per_block + used.numel() * per_page + vectors + 4 * seq_lens.numel()


def check_decode(name: str, config: DiffKVConfig, q_heads: int, heads: int, dim: int, seq_lens: list[int],
          mix, device, decode_config: DecodeConfig | None = None) -> dict:
    """Kernel vs DecodeAttentionWrapper on one pool: output (poisoned first) and staged-token importance."""
    page = config.page_size
    sealed = sum(math.ceil(n / page) - STAGED_TAIL for n in seq_lens)
    pool = Pool(config, heads, dim, sealed, STAGED_TAIL * len(seq_lens), mix, "cpu", seed=1)
    table, lens = pool.table(seq_lens)
    store = pool.store.to(device)                      # the reference runs on the CPU copy
    q = torch.randn(len(seq_lens), q_heads, dim)
    reference = DecodeAttentionWrapper(pool.store, q_heads)
    reference.plan(table, lens)
    ref = reference.run(q, 0)
    ref_score, ref_seen = pool.store.staged_importance(0, pool.staged)
    plan = DecodePlan(store.view, q_heads, max_batch=len(seq_lens), max_pages=table.shape[1], config=decode_config)
    plan.plan(table, lens)
    for workspace in (plan._part_m, plan._part_l, plan._part_acc, plan._logits):
        workspace.fill_(float("nan"))
    out = torch.full(q.shape, float("nan"), device=device)
    plan.run(q.to(device), 0, out=out)
    out = out.cpu()
    score, seen = (x.cpu() for x in store.staged_importance(0, pool.staged.to(device)))
    err = float((out - ref).abs().max() / ref.abs().max())
    score_err = float((score - ref_score).abs().max() / ref_score.abs().max().clamp_min(1e-30))
    row = {"name": name, "seq_lens": seq_lens, "num_splits": plan.num_splits, "max_rel_err": err,
           "importance_max_rel_err": score_err, "seen_equal": bool(torch.equal(seen, ref_seen)),
           "finite": bool(torch.isfinite(out).all())}
    row["ok"] = row["finite"] and row["seen_equal"] and err < 1e-4 and score_err < 1e-4
    log(f"check {name}: rel err {err:.2e}, importance rel err {score_err:.2e}, seen equal {row['seen_equal']}, "
        f"splits {plan.num_splits} -> {'ok' if row['ok'] else 'FAILED'}")
    return row


def dense_sdpa_us(batch: int, context: int, q_heads: int, heads: int, dim: int, device, queries: int = 1,
                  causal: bool = False) -> dict:
    """Fastest of SDPA's flash and cuDNN backends for ``queries`` queries per request on contiguous bf16 K/V
    ``[B, H, ctx, D]``: ``us`` (CUDA-graph replay over disjoint K/V copies, like :func:`time_decode`; None where
    the backend cannot be captured), ``eager_us`` (``do_bench``), ``backend`` (the one with the lower ``us``, else
    the lower ``eager_us``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    kv_bytes = 2 * batch * heads * context * dim * 2
    inputs = [(torch.randn(batch, q_heads, queries, dim, device=device, dtype=torch.bfloat16),
               torch.randn(batch, heads, context, dim, device=device, dtype=torch.bfloat16),
               torch.randn(batch, heads, context, dim, device=device, dtype=torch.bfloat16))
              for _ in range(l2_copies(kv_bytes, device, 64))]
    best = {"us": None, "eager_us": None, "backend": None}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        calls = [lambda q=q, k=k, v=v: sdpa(q, k, v, is_causal=causal, enable_gqa=True) for q, k, v in inputs]
        with sdpa_kernel(backend):
            try:
                calls[0]()
            except RuntimeError as exc:                      # backend unavailable for this shape or build
                log(f"  sdpa {backend.name}: {str(exc).splitlines()[0][:100]}")
                continue
            eager = time_us(calls[0], device)
            try:
                us = graph_us(calls, device)
            except RuntimeError as exc:
                log(f"  sdpa {backend.name} in a CUDA graph: {str(exc).splitlines()[0][:100]}")
                us = None
        key = (us is None, us if us is not None else eager)
        if best["backend"] is None or key < (best["us"] is None, best["us"] if best["us"] is not None
                                             else best["eager_us"]):
            best = {"us": us, "eager_us": eager, "backend": backend.name.lower()}
    return best


def time_decode(pool: Pool, batch: int, context: int, q_heads: int,
                decode_config: DecodeConfig | None = None) -> dict:
    """One layer of decode attention for ``batch`` requests of ``context`` tokens: ``us`` (CUDA-graph replay,
    cycling over disjoint copies of the batch's pages when one fits in L2), ``eager_us`` (``do_bench`` of the
    eager call: launch overhead included where it exceeds the GPU time), ``bytes_read``, ``num_splits``."""
    store = pool.store
    table, lens = pool.table([context] * batch)
    nbytes = pool.bytes_read(table, lens, q_heads)
    per_copy = batch * (math.ceil(context / store.page_size) - STAGED_TAIL)
    copies = l2_copies(nbytes, store.device, max(1, pool.sealed.numel() // max(per_copy, 1)))
    plans = []
    for copy in range(copies):
        plan = DecodePlan(store.view, q_heads, max_batch=batch, max_pages=table.shape[1], config=decode_config)
        plan.plan(*pool.table([context] * batch, copy))
        q = torch.randn(batch, q_heads, store.head_dim, device=store.device, dtype=torch.bfloat16)
        plans.append((plan, q, torch.empty_like(q)))
    calls = [lambda plan=plan, q=q, out=out: plan.run(q, 0, out=out) for plan, q, out in plans]
    return {"us": graph_us(calls, store.device), "eager_us": time_us(calls[0], store.device), "bytes_read": nbytes,
            "num_splits": plans[0][0].num_splits, "l2_copies": copies}


def run_decode(grid: dict, config: DiffKVConfig, device, copy: float, tune: bool, save) -> list:
    """Dense peers first, then one pool per (model, mix) large enough for the model's largest case. Returns the
    decode rows; ``save(rows, tune_rows)`` runs after each pool."""
    models, page = grid["models"], config.page_size
    cases = []
    for model, (q_heads, heads, dim) in models.items():
        for batch in grid["batches"]:
            for context in grid["contexts"]:
                dense_bytes = 2 * batch * heads * context * dim * 2
                arena_bytes = batch * heads * context * (dim * 2 + 64)        # upper bound: all tokens high tier
                if max(dense_bytes, arena_bytes) > MEMORY_LIMIT:
                    log(f"skip {model} batch {batch} context {context}: needs more than {MEMORY_LIMIT >> 30} GB")
                    continue
                cases.append((model, batch, context))
    dense = {}
    for model, batch, context in cases:
        q_heads, heads, dim = models[model]
        dense[(model, batch, context)] = dense_sdpa_us(batch, context, q_heads, heads, dim, device)
        free_cache(device)
    log("dense sdpa timed")
    rows, tune_rows = [], []
    for model, (q_heads, heads, dim) in models.items():
        model_cases = [c for c in cases if c[0] == model]
        sealed = max(b * (c // page - STAGED_TAIL) for _, b, c in model_cases)
        staged = max(b for _, b, _ in model_cases) * STAGED_TAIL
        for mix_name, mix in grid["mixes"].items():
            t0 = time.perf_counter()
            pool = Pool(config, heads, dim, sealed, staged, mix, device)
            log(f"{model} {mix_name}: pool {pool.arena_bytes / 2**30:.2f} GiB, built in {time.perf_counter() - t0:.1f} s")
            for _, batch, context in model_cases:
                t = time_decode(pool, batch, context, q_heads)
                sdpa = dense[(model, batch, context)]
                row = {"model": model, "batch": batch, "context": context, "head_dim": dim, "q_heads": q_heads,
                       "kv_heads": heads, "mix": dict(zip(("high", "low", "pruned"), mix)),
                       "bytes_read": t["bytes_read"], "diffkv_us": t["us"], "dense_sdpa_us": sdpa["us"],
                       "dense_sdpa_backend": sdpa["backend"], "bw_fraction": t["bytes_read"] / t["us"] / (copy * 1e3),
                       "num_splits": t["num_splits"], "l2_copies": t["l2_copies"], "diffkv_eager_us": t["eager_us"],
                       "dense_sdpa_eager_us": sdpa["eager_us"]}
                rows.append(row)
                log(f"  batch {batch:>3} context {context:>5}: {t['us']:8.1f} us (eager {t['eager_us']:7.1f}), dense "
                    f"{sdpa['us'] or float('nan'):8.1f} us, bw {row['bw_fraction']:.2f}, splits {t['num_splits']}")
                if tune and (model, batch, context) in TUNE_CASES:
                    for cfg in TUNE_CONFIGS:
                        t_us = time_decode(pool, batch, context, q_heads, cfg)["us"]
                        tune_rows.append({"model": model, "batch": batch, "context": context, "mix": mix_name,
                                          "config": cfg.__dict__, "diffkv_us": t_us,
                                          "bw_fraction": t["bytes_read"] / t_us / (copy * 1e3)})
                        log(f"    tune {cfg}: {t_us:.1f} us")
            del pool
            free_cache(device)
            save(rows, tune_rows)
    return rows


def _dense_bytes(row: dict) -> int:
    return 2 * row["batch"] * row["kv_heads"] * row["context"] * row["head_dim"] * 2


def decode_targets(rows: list) -> tuple[list, dict]:
    """Medians per (model, mix) and the issue's targets, over the rows with batch >= 16 and context >= 4k."""
    big = [r for r in rows if r["batch"] >= 16 and r["context"] >= 4096]
    summary = []
    for key in dict.fromkeys((r["model"], tuple(r["mix"].values())) for r in big):
        group = [r for r in big if (r["model"], tuple(r["mix"].values())) == key]
        dense = [r["dense_sdpa_us"] for r in group if r["dense_sdpa_us"]]
        summary.append({"model": key[0], "mix": dict(zip(("high", "low", "pruned"), key[1])), "cases": len(group),
                        "diffkv_us": statistics.median(r["diffkv_us"] for r in group),
                        "dense_sdpa_us": statistics.median(dense) if dense else None,
                        "diffkv_gbps": statistics.median(r["bytes_read"] / r["diffkv_us"] / 1e3 for r in group),
                        "bytes_vs_dense": statistics.median(r["bytes_read"] / _dense_bytes(r) for r in group),
                        "bw_fraction": statistics.median(r["bw_fraction"] for r in group)})
    if not big:
        return summary, {"cases": 0}
    bw = [r["bw_fraction"] for r in big]
    ratios = [r["diffkv_us"] / (r["dense_sdpa_us"] * r["bytes_read"] / _dense_bytes(r)) for r in big
              if r["dense_sdpa_us"]]
    targets = {
        "cases": len(big),
        "decode_bw_fraction_min_0.8_at_batch_ge_16_ctx_ge_4k": {
            "met": min(bw) >= 0.8, "median": statistics.median(bw), "min": min(bw), "max": max(bw)},
        "decode_time_le_1.25x_dense_sdpa_x_byte_ratio": {
            "met": bool(ratios) and max(ratios) <= 1.25,
            "median_ratio": statistics.median(ratios) if ratios else None, "max_ratio": max(ratios, default=None)},
    }
    if not all(t["met"] for t in targets.values() if isinstance(t, dict)):
        targets["why_missed"] = WHY_MISSED
    return summary, targets


# --------------------------------------------------------------------------------------------------- seal
class _SealCase:
    """One arena with ``n`` staged blocks (random bf16 K/V) and room for their sealed blocks."""

    def __init__(self, fmt: BlockFormat, n: int, mix: tuple[float, float, float], device):
        page, dim = fmt.page_size, fmt.head_dim
        staged = StagedBlockFormat(dim, page, torch.bfloat16)
        self.fmt, self.n = fmt, n
        self.keys = torch.randn(n, page, dim, device=device).to(torch.bfloat16)
        self.values = torch.randn(n, page, dim, device=device).to(torch.bfloat16)
        draw = torch.rand(n, page, device=device)
        self.tiers = torch.where(draw < mix[0], 0, torch.where(draw < mix[0] + mix[1], 1, -1)).to(torch.int8)
        counts = tier_counts(self.tiers, fmt.num_tiers)
        sizes = fmt.block_nbytes(counts)
        self.src = torch.arange(n, device=device, dtype=torch.int64) * staged.nbytes
        self.dst = n * staged.nbytes + torch.cumsum(sizes, 0) - sizes
        self.data_bytes = int(fmt.data_nbytes(counts).sum())
        capacity = n * staged.nbytes + int(sizes.sum()) + 16
        self.data = torch.randint(0, 256, (capacity,), dtype=torch.uint8, device=device)
        elements = self.data.view(torch.bfloat16)
        index = (self.src // 2)[:, None] + torch.arange(page * dim, device=device)
        elements[index] = self.keys.reshape(n, -1)
        elements[index + page * dim] = self.values.reshape(n, -1)

    def run_kernel(self):
        return seal_blocks(self.fmt, self.data, self.src, self.tiers, self.dst)

    def run_reference(self, data=None):
        return write_sealed_blocks(self.fmt, self.data if data is None else data, self.dst, self.keys, self.values,
                                   self.tiers)

    @property
    def bytes_moved(self) -> tuple[int, int]:
        page, dim = self.fmt.page_size, self.fmt.head_dim
        read = self.n * (2 * page * dim * 2 + page + 16)             # bf16 K/V, tiers, two offsets
        written = self.data_bytes + self.n * self.fmt.num_tiers * 8  # block bytes, counts
        return read, written


def seal_launch_host_us(device, calls: int) -> float:
    """Host time of one ``seal_blocks`` call (launcher + Triton launch), calls back to back: the floor of a
    seal step when few blocks are sealed."""
    case = _SealCase(BlockFormat(SEAL_TIERS, 128, SEAL_PAGE), 64, SEAL_MIXES["diffkv_typical"], device)
    case.run_kernel()
    start = time.perf_counter()
    for _ in range(calls):
        case.run_kernel()
    elapsed = time.perf_counter() - start
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return elapsed / calls * 1e6


def check_seal(device, n: int, head_dims) -> dict:
    """Kernel against ``write_sealed_blocks`` run on the CPU, byte for byte on poisoned arenas, both rotations;
    the same reference run on ``device`` too (it is defined bit for bit on every device, so it must agree)."""
    kernel_diff, device_diff, counts_equal = {}, {}, True
    for dim in head_dims:
        for rotation in ("none", "hadamard"):
            fmt = BlockFormat(SEAL_TIERS, dim, SEAL_PAGE, rotation, rotation)
            case = _SealCase(fmt, n, SEAL_MIXES["diffkv_typical"], device)
            expected = case.data.cpu()
            counts_ref = write_sealed_blocks(fmt, expected, case.dst.cpu(), case.keys.cpu(), case.values.cpu(),
                                             case.tiers.cpu())
            on_device = case.data.clone()
            case.run_reference(on_device)
            counts_equal &= bool(torch.equal(case.run_kernel().cpu(), counts_ref))
            kernel_diff[f"{dim}/{rotation}"] = int((case.data.cpu() != expected).sum())
            device_diff[f"{dim}/{rotation}"] = int((on_device.cpu() != expected).sum())
    ok = counts_equal and not any(kernel_diff.values()) and not any(device_diff.values())
    log(f"check seal: kernel differing bytes {kernel_diff}, device reference differing bytes {device_diff}, "
        f"counts equal {counts_equal} -> {'ok' if ok else 'FAILED'}")
    return {"blocks": n, "head_dims": list(head_dims), "rotations": ["none", "hadamard"], "counts_equal": counts_equal,
            "kernel_differing_bytes": kernel_diff, "device_reference_differing_bytes": device_diff, "ok": ok}


def bench_seal(device, block_counts) -> list[dict]:
    """Seal rows (see the module docstring)."""
    rows = []
    for model, (_, _, dim) in MODELS.items():
        for n in block_counts:
            for mix_name, mix in SEAL_MIXES.items():
                for rotation in ("none", "hadamard") if mix_name == "diffkv_typical" else ("none",):
                    case = _SealCase(BlockFormat(SEAL_TIERS, dim, SEAL_PAGE, rotation, rotation), n, mix, device)
                    kernel_us = time_us(case.run_kernel, device, rep_ms=200)
                    torch_us = time_us(case.run_reference, device, rep_ms=200) if rotation == "none" else None
                    read, written = case.bytes_moved
                    rows.append({
                        "model": model, "head_dim": dim, "page_size": SEAL_PAGE, "blocks": n, "tiers": "k8v4,k4v2",
                        "mix": dict(zip(("high", "low", "pruned"), mix)), "rotation": rotation, "source": "staged",
                        "bytes_read": read, "bytes_written": written, "bytes_moved": read + written,
                        "kernel_us": kernel_us, "torch_us": torch_us, "gbps": (read + written) / kernel_us / 1e3,
                    })
                    log(f"seal {model:<11}{n:>6} blocks {mix_name:<15}{rotation:<9}{kernel_us:10.1f} us "
                        f"({rows[-1]['gbps']:5.0f} GB/s), torch {torch_us or float('nan'):10.1f} us")
    return rows


# --------------------------------------------------------------------------------------------- compaction
def _compaction_layout(total: int, device):
    """Blocks of 16 B..8 KiB totalling about ``total`` bytes, with holes before about half of them; returns
    (arena, old offsets, new packed offsets, sizes)."""
    mean_units = 256
    n = max(1, total // (16 * mean_units))
    sizes = torch.randint(1, 2 * mean_units, (n,), device=device) * 16
    holes = torch.randint(0, 2 * mean_units, (n,), device=device) * 16 * (torch.rand(n, device=device) < 0.5)
    old = torch.cumsum(sizes + holes, 0) - sizes
    new = torch.cumsum(sizes, 0) - sizes
    capacity = int(old[-1] + sizes[-1]) + 16
    data = torch.randint(0, 256, (capacity,), dtype=torch.uint8, device=device)
    return data, old, new, sizes


def check_compaction(device, total: int) -> dict:
    """Kernel vs ``move_blocks_reference`` on a poisoned arena (the whole arena compared)."""
    data, old, new, sizes = _compaction_layout(total, device)
    expected = data.clone()
    move_blocks_reference(expected, old, new, sizes)
    move_blocks(data, old, new, sizes)
    diff = int((data != expected).sum())
    log(f"check compaction: {diff} bytes differ -> {'ok' if diff == 0 else 'FAILED'}")
    return {"moved_bytes": int(sizes.sum()), "blocks": sizes.numel(), "differing_bytes": diff, "ok": diff == 0}


def bench_compaction(device, totals) -> list[dict]:
    """Compaction rows: ``bytes_moved`` counts the gather and the scatter, each read + write (4x the block bytes)."""
    rows = []
    for total in totals:
        data, old, new, nbytes = _compaction_layout(total, device)
        moved = int(nbytes.sum())
        tmp = torch.empty(moved, dtype=torch.uint8, device=device)
        kernel_us = time_us(lambda: move_blocks(data, old, new, nbytes, tmp), device, rep_ms=200)
        torch_us = time_us(lambda: move_blocks_reference(data, old, new, nbytes), device, rep_ms=200)
        rows.append({"moved_bytes": moved, "blocks": nbytes.numel(), "bytes_moved": 4 * moved,
                     "kernel_us": kernel_us, "torch_us": torch_us, "gbps": 4 * moved / kernel_us / 1e3})
        log(f"compaction {moved / MiB:8.1f} MiB: {kernel_us:10.1f} us ({rows[-1]['gbps']:.0f} GB/s), "
            f"torch {torch_us:10.1f} us")
        del data, tmp
        free_cache(device)
    return rows


# ------------------------------------------------------------------------------------------------- extend
def bench_extend(device, cases) -> list[dict]:
    """Extend rows: one request's chunk of ``new`` tokens over a sealed prefix of ``prefix`` tokens (DiffKV-typical
    mix), one layer, bf16. ``wrapper_us`` times ``ExtendAttentionWrapper.run`` (the dense read of the pages, both
    kernels, the importance write-back), ``kernels_us`` the two kernels alone; ``dense_sdpa_us`` SDPA's fastest of
    flash and cuDNN over contiguous bf16 K/V of the same query and key counts (causal for a fresh prompt,
    non-causal for a chunk over a prefix, which does more work). ``tflops`` counts the causal attention's
    ``4 * Hq * D`` flops per (query, visible key) pair over the wrapper time."""
    rows = []
    for model, prefix, new in cases:
        q_heads, heads, dim = MODELS[model]
        config = DiffKVConfig()
        page = config.page_size
        pool = Pool(config, heads, dim, prefix // page, math.ceil(new / page), MIXES["diffkv_typical"], device)
        store = pool.store
        pages = torch.cat([pool.sealed[:prefix // page], pool.staged])
        seq_len = prefix + new
        kv_indptr = torch.tensor([0, pages.numel()], device=device)
        qo_indptr = torch.tensor([0, new], device=device)
        wrapper = ExtendAttentionWrapper(store, q_heads)
        wrapper.plan(qo_indptr, pages[None, :], torch.tensor([seq_len], device=device))
        q = torch.randn(new, q_heads, dim, device=device, dtype=torch.bfloat16)
        wrapper_us = time_us(lambda: wrapper.run(q, 0), device)
        keys, values, present = store.read_pages(0, pages)
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        plan = ExtendPlan(store.view, q_heads)
        plan.plan(qo_indptr, kv_indptr, pages, torch.tensor([seq_len], device=device), config.obs_window)
        kernels_us = time_us(lambda: plan.run(q, keys, values, present, dim ** -0.5), device)
        del keys, values, present
        sdpa = dense_sdpa_us(1, seq_len, q_heads, heads, dim, device, queries=new, causal=prefix == 0)
        best, backend = sdpa["eager_us"], sdpa["backend"]
        pairs = new * prefix + new * (new + 1) // 2
        rows.append({"model": model, "prefix": prefix, "new": new, "q_heads": q_heads, "kv_heads": heads,
                     "head_dim": dim, "mix": dict(zip(("high", "low", "pruned"), MIXES["diffkv_typical"])),
                     "wrapper_us": wrapper_us, "kernels_us": kernels_us, "dense_sdpa_us": best,
                     "dense_sdpa_backend": backend,
                     "tflops": 4 * q_heads * dim * pairs / wrapper_us / 1e6})
        log(f"extend {model:<11} prefix {prefix:>6} new {new:>6}: wrapper {wrapper_us:9.1f} us, kernels "
            f"{kernels_us:9.1f} us, dense sdpa {best or float('nan'):9.1f} us, {rows[-1]['tflops']:.1f} TFLOP/s")
        del pool, store, wrapper, plan
        free_cache(device)
    return rows


# --------------------------------------------------------------------------------------------------- main
def write(path: str, result: dict, started: float) -> None:
    result["seconds"] = time.perf_counter() - started
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="reduced decode grid, seal and compaction (H100: < 3 min)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes (CPU and the Triton interpreter work)")
    parser.add_argument("--tune", action="store_true", help="time every TUNE_CONFIGS entry on a few decode cases")
    parser.add_argument("--out", default=None, help="JSON path (default $OUT/kernels-h100.json)")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA device: run with --smoke (Triton interpreter, tiny sizes)")
    if kernel_mode() != "auto":
        parser.error(f"{KERNELS_ENV}={kernel_mode()}: the references run on CPU stores, the kernels on CUDA; unset it")
    grid = GRIDS["smoke" if args.smoke else "quick" if args.quick else "full"]
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    out_path = args.out or os.path.join(out_dir, "kernels-h100.json")
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (triton interpreter)"
    log(f"device {name}, torch {torch.__version__}, triton {triton.__version__}")
    result: dict = {"device": name, "versions": {"torch": torch.__version__, "triton": triton.__version__},
                    "command": " ".join(["python", *sys.argv]), "copy_gbps": copy_gbps(device, grid["copy_bytes"])}
    log(f"copy bandwidth {result['copy_gbps']:.0f} GB/s")

    # ---- every kernel against its torch reference
    models, config, lens = grid["models"], DiffKVConfig(), grid["check_lens"]
    (big_name, (big_q, big_h, big_d)), (small_name, (small_q, small_h, small_d)) = list(models.items())[:2]
    rotated = DiffKVConfig.from_dict({"tiers": ["k8v4g2x1", "k4v2g2x4", "k2v2"], "thresholds": [2.0, 0.5],
                                      "key_rotation": "hadamard", "value_rotation": "hadamard"})
    checks = result["checks"] = {"decode": [
        check_decode(f"{big_name} diffkv_typical", config, big_q, big_h, big_d, lens, MIXES["diffkv_typical"],
                     device),
        check_decode(f"{small_name} heavy_pruning", config, small_q, small_h, small_d, lens[::-1],
                     MIXES["heavy_pruning"], device),
        check_decode(f"{small_name} 3 tiers, groups, hadamard", rotated, small_q, small_h, small_d, lens,
                     (0.3, 0.3, 0.2, 0.2), device),
    ]}
    checks["seal"] = check_seal(device, grid["seal_check_blocks"], sorted({d for _, _, d in MODELS.values()}))
    checks["compaction"] = check_compaction(device, grid["compaction_bytes"][0])
    free_cache(device)

    # ---- timings
    def save(rows, tune_rows):
        result["decode"] = rows
        if tune_rows:
            result["tune"] = tune_rows
        write(out_path, result, started)

    rows = run_decode(grid, config, device, result["copy_gbps"], args.tune, save)
    result["decode_summary"], result["targets"] = decode_targets(rows)
    result["seal"] = bench_seal(device, grid["seal_blocks"])
    result["seal_launch_host_us"] = seal_launch_host_us(device, 2 if args.smoke else 200)
    result["compaction"] = bench_compaction(device, grid["compaction_bytes"])
    write(out_path, result, started)
    result["extend"] = bench_extend(device, grid["extend"])
    write(out_path, result, started)

    log(f"\n{'model':<12} {'mix':<15} {'batch':>5} {'ctx':>6} {'MB read':>8} {'diffkv us':>10} {'sdpa us':>9} "
        f"{'bw frac':>7}")
    mix_names = {v: k for k, v in MIXES.items()}
    for r in rows:
        mix = mix_names[tuple(r["mix"].values())]
        log(f"{r['model']:<12} {mix:<15} {r['batch']:>5} {r['context']:>6} {r['bytes_read'] / 1e6:>8.1f} "
            f"{r['diffkv_us']:>10.1f} {r['dense_sdpa_us'] or float('nan'):>9.1f} {r['bw_fraction']:>7.2f}")
    log("targets: " + json.dumps({k: v for k, v in result["targets"].items() if k != "why_missed"}))
    failed = [c["name"] for c in checks["decode"] if not c["ok"]]
    failed += [kind for kind in ("seal", "compaction") if not checks[kind]["ok"]]
    log(f"wrote {out_path} in {result['seconds']:.0f} s; checks {'FAILED: ' + ', '.join(failed) if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
