"""The store's data path on a GPU: sealing, writes, decode planning and host syncs, before and after a change.

Llama-3-8B shape (32 layers, 8 KV heads, head_dim 128, 32 query heads, bfloat16), default DiffKV config. Measures,
for the ``diffkv_sglang`` on ``sys.path`` (run it once per version, e.g. with ``PYTHONPATH`` at an older tree):

* ``seal``: a 64-page chunk (time, peak temporary device memory over the store's own, the chunk's staged bytes);
* ``write_tokens``: one layer's write of a decode step (batch 64 and 256) and of a 4k prefill as the backend runs
  it (rows planned once per batch where the store plans them), eagerly and (decode) replayed from a CUDA graph,
  against SGLang's own ``MHATokenToKVPool.set_kv_buffer`` for the same bytes (``k_buffer[layer][loc] = k``: a
  row-wise index put, reproduced here since this script runs without SGLang);
* ``plan``: the backend's per-step planning at batch 64 (1024-token requests) and 256 (512), mostly sealed, and the
  host syncs of a whole decode step outside sealing (backend planning, ``write_tokens`` and ``run`` of every
  layer), counted with ``torch.cuda.set_sync_debug_mode("warn")``.

    python benchmarks/gpu/data_path.py --label after --out $OUT/after.json
    PYTHONPATH=.cache/before python benchmarks/gpu/data_path.py --label before --out $OUT/before.json
    python benchmarks/gpu/data_path.py --merge $OUT/before.json $OUT/after.json --out $OUT/data-path.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import warnings

import torch

LAYERS, KV_HEADS, HEAD_DIM, Q_HEADS = 32, 8, 128, 32


def _median_us(fn, repeat: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def _store(num_pages: int):
    from diffkv_sglang.config import DiffKVConfig
    from diffkv_sglang.store import CompressedKVStore

    config = DiffKVConfig()
    staged = LAYERS * KV_HEADS * (2 * config.page_size * HEAD_DIM * 2 + 8 * config.page_size)
    return CompressedKVStore(config, LAYERS, KV_HEADS, HEAD_DIM, num_pages=num_pages + 1,
                             arena_bytes=int(staged * num_pages * 1.6) + (1 << 24), dtype=torch.bfloat16,
                             device="cuda")


def _fill(store, pages: torch.Tensor) -> torch.Tensor:
    """Stage ``pages`` and write every token of every layer with random K/V and importance; returns the slots."""
    page = store.page_size
    store.stage(pages)
    locs = (pages[:, None] * page + torch.arange(page, device="cuda")).reshape(-1)
    for layer in range(LAYERS):
        k = torch.randn(locs.numel(), KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        store.write_tokens(layer, locs, k, k)
        store.add_importance(layer, locs, torch.rand(locs.numel(), KV_HEADS, device="cuda") / 50,
                             torch.ones(locs.numel(), device="cuda"))
    return locs


def measure_seal(chunk: int = 64) -> dict:
    store = _store(2 * chunk)
    warm = torch.arange(chunk + 1, 2 * chunk + 1, device="cuda")
    _fill(store, warm)
    store.seal(warm[:1], torch.full((1,), 4096, device="cuda"))      # compile the seal kernel outside the timing
    store.release(warm)
    pages = torch.arange(1, chunk + 1, device="cuda")
    _fill(store, pages)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    store.seal(pages, torch.full((chunk,), 4096, device="cuda"))
    end.record()
    torch.cuda.synchronize()
    return {"seal_pages": chunk, "seal_us": start.elapsed_time(end) * 1000,
            "seal_peak_temp_bytes": torch.cuda.max_memory_allocated() - base,
            "seal_staged_bytes": chunk * LAYERS * KV_HEADS * store.formats.staged.nbytes,
            "seal_gb_per_s": chunk * LAYERS * KV_HEADS * store.formats.staged.nbytes / (start.elapsed_time(end) * 1e6),
            "seal_compression": store.stats().sealed_compression_ratio}


def _graph_us(fn, repeat: int = 20) -> float | str:
    """Median GPU time of ``fn`` replayed from a captured CUDA graph (no host launch overhead), or why it could not
    be captured (a version that syncs with the host)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as exc:
        return f"not capturable: {str(exc).splitlines()[0]}"
    return _median_us(graph.replay, repeat)


def measure_writes() -> dict:
    """One layer's write as the backend runs it: with a batch plan (``token_rows``, once per batch, shared by the
    layers) where the store has one, plus the plan's own time; eagerly and, for the decode steps SGLang replays,
    32 layers' writes from a CUDA graph (per layer), both against SGLang-style ``set_kv_buffer``."""
    out = {}
    for name, tokens in (("decode64", 64), ("decode256", 256), ("prefill4k", 4096)):
        page = 32
        num_pages = tokens if name.startswith("decode") else tokens // page
        store = _store(num_pages)
        pages = torch.arange(1, num_pages + 1, device="cuda")
        store.stage(pages)
        if name.startswith("decode"):          # one new token in each of `tokens` requests' last page
            locs = pages[:tokens] * page + 5
        else:
            locs = (pages[:, None] * page + torch.arange(page, device="cuda")).reshape(-1)
        k = torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        planned = "rows" in inspect.signature(store.write_tokens).parameters
        rows = store.token_rows(locs) if planned else None
        write = (lambda layer: store.write_tokens(layer, locs, k, k, rows=rows)) if planned else \
            (lambda layer: store.write_tokens(layer, locs, k, k))
        out[f"write_tokens_us_{name}"] = _median_us(lambda: write(3))
        if planned:
            out[f"token_rows_us_{name}"] = _median_us(lambda: store.token_rows(locs))
        if name.startswith("decode"):
            graphed = _graph_us(lambda: [write(layer) for layer in range(LAYERS)])
            out[f"write_tokens_graph_us_{name}"] = graphed / LAYERS if isinstance(graphed, float) else graphed
        del store
        k_buffer = torch.zeros(LAYERS, (num_pages + 1) * page, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v_buffer = torch.zeros_like(k_buffer)

        def set_kv_buffer(layer):
            k_buffer[layer][locs] = k
            v_buffer[layer][locs] = k

        out[f"sglang_set_kv_buffer_us_{name}"] = _median_us(lambda: set_kv_buffer(3))
        if name.startswith("decode"):
            graphed = _graph_us(lambda: [set_kv_buffer(layer) for layer in range(LAYERS)])
            out[f"sglang_set_kv_buffer_graph_us_{name}"] = graphed / LAYERS if isinstance(graphed, float) else graphed
        del k_buffer, v_buffer
        torch.cuda.empty_cache()
    return out


class _Step:
    """The backend's decode step for one batch, in the wrapper API of the ``diffkv_sglang`` being measured."""

    def __init__(self, store, table, lens, window_pages):
        from diffkv_sglang.attention import DecodeAttentionWrapper

        self.store, self.table, self.lens = store, table, lens
        self.new_api = "page_table" in inspect.signature(DecodeAttentionWrapper.plan).parameters
        capacity = dict(max_batch=table.shape[0], max_pages=table.shape[1], max_staged_pages=window_pages + 2)
        if self.new_api:
            self.wrapper = DecodeAttentionWrapper(store, Q_HEADS, **capacity)
        else:
            self.wrapper = DecodeAttentionWrapper(store, num_q_heads=Q_HEADS, **capacity)
        batch = table.shape[0]
        positions = lens - 1
        self.locs = table[torch.arange(batch, device="cuda"), positions // store.page_size] * store.page_size \
            + positions % store.page_size
        self.k = torch.randn(batch, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        self.q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        self.out = torch.empty_like(self.q)

    def plan(self):
        if self.new_api:
            self.wrapper.plan(self.table, self.lens, check=False)
        else:                                   # the old backend: padded table -> CSR -> the wrapper
            page = self.store.page_size
            num_pages = (self.lens + page - 1) // page
            valid = torch.arange(self.table.shape[1], device="cuda")[None, :] < num_pages[:, None]
            indptr = torch.zeros(num_pages.numel() + 1, dtype=torch.int64, device="cuda")
            indptr[1:] = torch.cumsum(num_pages, 0)
            self.wrapper.plan(indptr, self.table[valid], self.lens)

    def layers(self):
        planned = "rows" in inspect.signature(self.store.write_tokens).parameters
        rows = {"rows": self.store.token_rows(self.locs)} if planned else {}
        for layer in range(LAYERS):
            self.store.write_tokens(layer, self.locs, self.k, self.k, **rows)
            self.wrapper.run(self.q, layer, out=self.out)


def measure_plan(batch: int, context: int = 1024) -> dict:
    from diffkv_sglang.config import DiffKVConfig

    page, window = DiffKVConfig().page_size, DiffKVConfig().window
    per_request = context // page
    store = _store(batch * per_request)
    pages = torch.arange(1, batch * per_request + 1, device="cuda")
    store.stage(pages)
    table = pages.reshape(batch, per_request)
    sealed = table[:, :per_request - window // page - 1].reshape(-1)
    store.seal(sealed, torch.full((sealed.numel(),), context, device="cuda"))
    lens = torch.full((batch,), context, device="cuda", dtype=torch.int64)
    step = _Step(store, table, lens, window // page)
    step.plan()
    step.layers()                                          # compile, size buffers
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        step.plan()
        step.layers()
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "called a synchronizing" in str(w.message)]
    return {f"plan_us_b{batch}": _median_us(step.plan), f"decode_step_us_b{batch}": _median_us(lambda: (step.plan(), step.layers())),
            f"host_syncs_per_decode_step_b{batch}": len(syncs) + 1,   # + the backend's "anything to seal?" check
            f"sync_sites_b{batch}": syncs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="after")
    parser.add_argument("--out", required=True)
    parser.add_argument("--merge", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.merge:
        before, after = (json.load(open(p)) for p in args.merge)
        after["before"] = before
        json.dump(after, open(args.out, "w"), indent=1)
        return
    import diffkv_sglang

    package = os.path.relpath(os.path.dirname(diffkv_sglang.__file__))       # never a machine path in results
    result = {"label": args.label, "package": package, "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "shape": "Llama-3-8B (32 layers, 8 KV heads, head_dim 128, 32 q heads)"}
    for part in (measure_seal, measure_writes, lambda: measure_plan(64, 1024), lambda: measure_plan(256, 512)):
        result.update(part())
        torch.cuda.empty_cache()
        print(json.dumps({k: v for k, v in result.items() if not k.startswith("sync_sites")}), flush=True)
    json.dump(result, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
