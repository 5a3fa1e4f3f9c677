"""Triton decode attention over the compressed store, on the GPU: checks against the torch reference, then timings.

One run builds random one-layer stores at real sizes (sealed blocks written in bulk with
``quant.write_sealed_blocks``, the last two pages of every request staged), checks the kernel against
``DecodeAttentionWrapper`` (outputs poisoned with NaN first, staged-token importance compared too), then times
one layer's decode attention with ``triton.testing.do_bench`` (median) next to the fastest dense
``scaled_dot_product_attention`` (flash or cuDNN) on contiguous bf16 K/V, and writes
``$OUT/kernels-h100.json`` (``benchmarks/results/`` without ``$OUT``)::

    python benchmarks/kernels_gpu.py            # H100, a few minutes
    python benchmarks/kernels_gpu.py --tune     # also times every TUNE_CONFIGS entry on a few cases
    python benchmarks/kernels_gpu.py --smoke    # tiny sizes; runs on CPU under TRITON_INTERPRET=1

``bytes_read`` counts what the kernel must read: the blocks of the request's pages (codes, metadata, padding;
staged pages in full), the descriptor rows it touches (block offset, tier counts, page state, page table and
staged rank), q and the output. ``bw_fraction = bytes_read / diffkv time / copy_gbps``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")          # before triton is imported

import triton  # noqa: E402
import triton.testing  # noqa: E402

from diffkv_sglang.attention import DecodeAttentionWrapper  # noqa: E402
from diffkv_sglang.config import DiffKVConfig  # noqa: E402
from diffkv_sglang.kernels.decode_attention import TUNE_CONFIGS, DecodeConfig, DecodePlan  # noqa: E402
from diffkv_sglang.quant import tier_counts, write_sealed_blocks  # noqa: E402
from diffkv_sglang.store import CompressedKVStore, PageState  # noqa: E402

MODELS = {"llama-3-8b": (32, 8, 128), "smollm2": (9, 3, 64)}       # q heads, kv heads, head_dim
MIXES = {"all_high": (1.0, 0.0, 0.0), "diffkv_typical": (0.3, 0.5, 0.2), "heavy_pruning": (0.1, 0.4, 0.5)}
BATCHES, CONTEXTS = (1, 16, 64, 256), (1024, 4096, 16384, 32768)
SMOKE_MODELS = {"llama-like": (4, 2, 32), "smollm-like": (3, 1, 32)}
SMOKE_BATCHES, SMOKE_CONTEXTS = (1, 2), (96, 160)
STAGED_TAIL = 2                 # staged pages at the end of every request (the protected window)
MEMORY_LIMIT = 60 << 30         # skip cases whose arena or dense K/V would not fit
CHUNK_BLOCKS = 1 << 11          # blocks quantized at once; the rest of a pool repeats their bytes
TUNE_CASES = (("llama-3-8b", 1, 32768), ("llama-3-8b", 64, 16384), ("smollm2", 64, 4096))


def log(*args) -> None:
    print(*args, flush=True)


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
        if staged_pages:
            store.stage(self.staged)
            locs = (self.staged[:, None] * page + torch.arange(page, device=device)).reshape(-1)
            kv = torch.randn(2, locs.numel(), heads, dim, generator=gen).to(device)
            store.write_tokens(0, locs, kv[0] * 2, kv[1])

    def table(self, seq_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Page table ``[B, max_pages]`` giving each request its own sealed pages then STAGED_TAIL staged pages."""
        page = self.store.page_size
        pages = [math.ceil(n / page) for n in seq_lens]
        table = torch.zeros(len(seq_lens), max(pages), dtype=torch.int64, device=self.store.device)
        next_sealed = 0
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


def mirror(store: CompressedKVStore, device) -> CompressedKVStore:
    """A copy of ``store`` (arena bytes, slot table, descriptors) on ``device``, for reading and importance."""
    copy = CompressedKVStore(store.config, store.num_layers, store.num_kv_heads, store.head_dim, store.num_pages,
                             store.arena.capacity_bytes, store.dtype, device)
    for dst, src in ((copy.arena.data, store.arena.data), (copy.arena.block_offset, store.arena.block_offset),
                     (copy.arena.block_nbytes, store.arena.block_nbytes), (copy.tier_counts, store.tier_counts),
                     (copy.page_state, store.page_state)):
        dst.copy_(src)
    return copy


def csr(table: torch.Tensor, seq_lens: torch.Tensor, page: int):
    pages = (seq_lens + page - 1) // page
    indptr = torch.cat([pages.new_zeros(1), pages.cumsum(0)])
    indices = table[torch.arange(table.shape[1], device=table.device)[None, :] < pages[:, None]]
    return indptr, indices


def check(name: str, config: DiffKVConfig, q_heads: int, heads: int, dim: int, seq_lens: list[int],
          mix, device, decode_config: DecodeConfig | None = None) -> dict:
    """Kernel vs DecodeAttentionWrapper on one pool: output (poisoned first) and staged-token importance."""
    page = config.page_size
    sealed = sum(math.ceil(n / page) - STAGED_TAIL for n in seq_lens)
    pool = Pool(config, heads, dim, sealed, STAGED_TAIL * len(seq_lens), mix, "cpu", seed=1)
    table, lens = pool.table(seq_lens)
    store = mirror(pool.store, device)                      # the reference runs on the CPU copy
    q = torch.randn(len(seq_lens), q_heads, dim)
    reference = DecodeAttentionWrapper(pool.store)
    reference.plan(*csr(table, lens, page), lens)
    ref = reference.run(q, 0)
    ref_score, ref_seen = pool.store.staged_importance(0, pool.staged)
    plan = DecodePlan(store, q_heads, max_batch=len(seq_lens), max_pages=table.shape[1], config=decode_config)
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


def bench(fn, smoke: bool) -> float:
    """Median microseconds of ``fn`` (one call in the interpreter)."""
    if smoke and not torch.cuda.is_available():
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3


def copy_gbps(device, smoke: bool) -> float:
    nbytes = (1 << 20) if smoke else (2 << 30)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src), smoke)
    return 2 * nbytes / (us * 1e-6) / 1e9


def dense_sdpa_us(batch: int, context: int, q_heads: int, heads: int, dim: int, device, smoke: bool):
    """Fastest of SDPA's flash and cuDNN backends on contiguous bf16 K/V ``[B, H, ctx, D]``; (us, backend)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    q = torch.randn(batch, q_heads, 1, dim, device=device, dtype=torch.bfloat16)
    k = torch.randn(batch, heads, context, dim, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    best = (None, None)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel(backend):
                sdpa(q, k, v, enable_gqa=True)
                us = bench(lambda: sdpa(q, k, v, enable_gqa=True), smoke)
        except RuntimeError as exc:                      # backend unavailable for this shape or build
            log(f"  sdpa {backend.name}: {str(exc).splitlines()[0][:100]}")
            continue
        if best[0] is None or us < best[0]:
            best = (us, backend.name.lower())
    return best


def time_decode(pool: Pool, batch: int, context: int, q_heads: int, smoke: bool,
                decode_config: DecodeConfig | None = None) -> tuple[float, int, int]:
    """One layer of decode attention for ``batch`` requests of ``context`` tokens: (us, bytes read, splits)."""
    store = pool.store
    table, lens = pool.table([context] * batch)
    plan = DecodePlan(store, q_heads, max_batch=batch, max_pages=table.shape[1], config=decode_config)
    plan.plan(table, lens)
    q = torch.randn(batch, q_heads, store.head_dim, device=store.device, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    us = bench(lambda: plan.run(q, 0, out=out), smoke)
    return us, pool.bytes_read(table, lens, q_heads), plan.num_splits


def write(path: str, result: dict, rows: list, tune_rows: list, started: float) -> None:
    result["decode"] = rows
    if tune_rows:
        result["tune"] = tune_rows
    result["seconds"] = time.perf_counter() - started
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU interpreter)")
    parser.add_argument("--tune", action="store_true", help="time every TUNE_CONFIGS entry on a few cases")
    parser.add_argument("--out", default=None, help="JSON path (default $OUT/kernels-h100.json)")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    out_path = args.out or os.path.join(out_dir, "kernels-h100.json")
    models = SMOKE_MODELS if args.smoke else MODELS
    batches, contexts = (SMOKE_BATCHES, SMOKE_CONTEXTS) if args.smoke else (BATCHES, CONTEXTS)
    config = DiffKVConfig()
    page = config.page_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (triton interpreter)"
    log(f"device {name}, torch {torch.__version__}, triton {triton.__version__}")
    result: dict = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
                    "command": "python benchmarks/kernels_gpu.py" + (" --smoke" if args.smoke else "")
                    + (" --tune" if args.tune else "")}
    result["copy_gbps"] = copy_gbps(device, args.smoke)
    log(f"copy bandwidth {result['copy_gbps']:.0f} GB/s")

    # ---- correctness at a couple of sizes (poisoned outputs and workspaces)
    (big_name, (big_q, big_h, big_d)), (small_name, (small_q, small_h, small_d)) = list(models.items())[:2]
    lens = [96, 150, 133] if args.smoke else [1024, 2000, 3333]
    rotated = DiffKVConfig.from_dict({"tiers": ["k8v4g2x1", "k4v2g2x4", "k2v2"], "thresholds": [2.0, 0.5],
                                      "key_rotation": "hadamard", "value_rotation": "hadamard"})
    result["checks"] = [
        check(f"{big_name} diffkv_typical", config, big_q, big_h, big_d, lens, MIXES["diffkv_typical"], device),
        check(f"{small_name} heavy_pruning", config, small_q, small_h, small_d, lens[::-1], MIXES["heavy_pruning"],
              device),
        check(f"{small_name} 3 tiers, groups, hadamard", rotated, small_q, small_h, small_d, lens,
              (0.3, 0.3, 0.2, 0.2), device),
    ]

    # ---- dense peer, per (model, batch, context)
    cases = []
    for model, (q_heads, heads, dim) in models.items():
        for batch in batches:
            for context in contexts:
                dense_bytes = 2 * batch * heads * context * dim * 2
                arena_bytes = batch * heads * context * (dim * 2 + 64)        # upper bound: all tokens high tier
                if max(dense_bytes, arena_bytes) > MEMORY_LIMIT:
                    log(f"skip {model} batch {batch} context {context}: needs more than {MEMORY_LIMIT >> 30} GB")
                    continue
                cases.append((model, batch, context))
    dense = {}
    for model, batch, context in cases:
        q_heads, heads, dim = models[model]
        dense[(model, batch, context)] = dense_sdpa_us(batch, context, q_heads, heads, dim, device, args.smoke)
        torch.cuda.empty_cache() if device.type == "cuda" else None
    log(f"dense sdpa timed ({time.perf_counter() - started:.0f} s)")

    # ---- DiffKV decode: one pool per (model, mix), large enough for the largest case
    rows, tune_rows = [], []
    for model, (q_heads, heads, dim) in models.items():
        model_cases = [c for c in cases if c[0] == model]
        sealed = max(b * (c // page - STAGED_TAIL) for _, b, c in model_cases)
        staged = max(b for _, b, _ in model_cases) * STAGED_TAIL
        for mix_name, mix in MIXES.items():
            t0 = time.perf_counter()
            pool = Pool(config, heads, dim, sealed, staged, mix, device)
            built = time.perf_counter() - t0
            log(f"{model} {mix_name}: pool {pool.arena_bytes / 2**30:.2f} GiB, built in {built:.1f} s")
            for _, batch, context in model_cases:
                us, nbytes, splits = time_decode(pool, batch, context, q_heads, args.smoke)
                sdpa_us, backend = dense[(model, batch, context)]
                row = {"model": model, "batch": batch, "context": context, "head_dim": dim, "q_heads": q_heads,
                       "kv_heads": heads, "mix": dict(zip(("high", "low", "pruned"), mix)), "bytes_read": nbytes,
                       "diffkv_us": us, "dense_sdpa_us": sdpa_us, "dense_sdpa_backend": backend,
                       "bw_fraction": nbytes / (us * 1e-6) / (result["copy_gbps"] * 1e9), "num_splits": splits}
                rows.append(row)
                log(f"  batch {batch:>3} context {context:>5}: {us:8.1f} us, dense {sdpa_us or float('nan'):8.1f} us, "
                    f"bw {row['bw_fraction']:.2f}, splits {splits}")
                if args.tune and mix_name == "diffkv_typical" and (model, batch, context) in TUNE_CASES:
                    for cfg in TUNE_CONFIGS:
                        t_us, _, _ = time_decode(pool, batch, context, q_heads, args.smoke, cfg)
                        tune_rows.append({"model": model, "batch": batch, "context": context,
                                          "config": cfg.__dict__, "diffkv_us": t_us,
                                          "bw_fraction": nbytes / (t_us * 1e-6) / (result["copy_gbps"] * 1e9)})
                        log(f"    tune {cfg}: {t_us:.1f} us")
            del pool
            torch.cuda.empty_cache() if device.type == "cuda" else None
            write(out_path, result, rows, tune_rows, started)            # partial results survive a time-out
    write(out_path, result, rows, tune_rows, started)

    log(f"\n{'model':<12} {'mix':<15} {'batch':>5} {'ctx':>6} {'MB read':>8} {'diffkv us':>10} {'sdpa us':>9} "
        f"{'bw frac':>7}")
    mix_names = {v: k for k, v in MIXES.items()}
    for r in rows:
        mix = mix_names[tuple(r["mix"].values())]
        log(f"{r['model']:<12} {mix:<15} {r['batch']:>5} {r['context']:>6} {r['bytes_read'] / 1e6:>8.1f} "
            f"{r['diffkv_us']:>10.1f} {r['dense_sdpa_us'] or float('nan'):>9.1f} {r['bw_fraction']:>7.2f}")
    failed = [c["name"] for c in result["checks"] if not c["ok"]]
    log(f"wrote {out_path} in {result['seconds']:.0f} s; checks {'FAILED: ' + ', '.join(failed) if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
