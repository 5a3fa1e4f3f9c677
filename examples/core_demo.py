"""Core demo (no SGLang): one request's life in the DiffKV store, with SmolLM2-135M's attention shape.

A 1000-token prompt is prefilled through the extend wrapper (its last 64 queries record importance), pages
outside the protected window are sealed (classified per layer and KV head, quantized, packed), then 32 tokens
are decoded, sealing pages as they leave the window. The demo prints where the bytes went, the tier shares,
and how far the compressed attention output is from dense attention over the same random K/V.

Random K/V have no attention structure, so the tier shares here come from synthetic "attention sinks" planted
in the keys; the accuracy of real models is measured by the accuracy benchmarks, not here.

    python examples/core_demo.py
"""

from __future__ import annotations

import math
import time

import torch

from diffkv_sglang.attention import DecodeAttentionWrapper, ExtendAttentionWrapper
from diffkv_sglang.config import DiffKVConfig
from diffkv_sglang.policy import sealable_pages
from diffkv_sglang.store import CompressedKVStore

LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM = 4, 3, 9, 64          # SmolLM2-135M: 9 query / 3 KV heads, head_dim 64
PROMPT, DECODE = 1000, 32


def dense_decode(q, k, v):
    """float32 dense attention of one query ``[Hq, D]`` over ``[T, H, D]``."""
    k = k.float().repeat_interleave(Q_HEADS // KV_HEADS, 1)
    v = v.float().repeat_interleave(Q_HEADS // KV_HEADS, 1)
    p = torch.softmax(torch.einsum("hd,thd->ht", q.float(), k) / math.sqrt(HEAD_DIM), -1)
    return torch.einsum("ht,thd->hd", p, v)


def main() -> None:
    torch.manual_seed(0)
    config = DiffKVConfig()
    page = config.page_size
    total = PROMPT + DECODE
    num_pages = math.ceil(total / page) + 1
    store = CompressedKVStore(config, LAYERS, KV_HEADS, HEAD_DIM, num_pages=num_pages, arena_bytes=64 << 20)
    pages = torch.arange(1, num_pages)                                    # page 0 is SGLang's padding page
    # keys with structure: a few "sink" tokens every query attends to, the rest near-random
    keys = torch.randn(LAYERS, total, KV_HEADS, HEAD_DIM)
    keys[:, ::50] *= 4
    values = torch.randn(LAYERS, total, KV_HEADS, HEAD_DIM)
    queries = keys.mean(1, keepdim=True).repeat_interleave(Q_HEADS // KV_HEADS, 2) + torch.randn(LAYERS, total, Q_HEADS, HEAD_DIM)
    locs = (pages[:, None] * page + torch.arange(page)).reshape(-1)[:total]

    start = time.perf_counter()
    needed = math.ceil(PROMPT / page)
    store.stage(pages[:needed])
    extend = ExtendAttentionWrapper(store, Q_HEADS)
    extend.plan(torch.tensor([0, PROMPT]), pages[None, :needed], torch.tensor([PROMPT]))    # qo_indptr, page table
    for layer in range(LAYERS):
        store.write_tokens(layer, locs[:PROMPT], keys[layer, :PROMPT], values[layer, :PROMPT])
        extend.run(queries[layer, :PROMPT], layer)
    sealed = int(sealable_pages(torch.tensor([PROMPT]), page, config.window))
    store.seal(pages[:sealed], torch.full((sealed,), PROMPT))
    print(f"prefill: {PROMPT} tokens, {sealed} of {needed} pages sealed in {time.perf_counter() - start:.2f} s")

    decode = DecodeAttentionWrapper(store, Q_HEADS)
    worst = 0.0
    for step in range(DECODE):
        pos = PROMPT + step
        if pos % page == 0:
            store.stage(pages[pos // page:pos // page + 1])
        n_pages = pos // page + 1
        decode.plan(pages[None, :n_pages], torch.tensor([pos + 1]))
        for layer in range(LAYERS):
            store.write_tokens(layer, locs[pos:pos + 1], keys[layer, pos:pos + 1], values[layer, pos:pos + 1])
            out = decode.run(queries[layer, pos:pos + 1], layer)[0]
            ref = dense_decode(queries[layer, pos], keys[layer, :pos + 1], values[layer, :pos + 1])
            worst = max(worst, float((out - ref).norm() / ref.norm()))
        now_sealable = int(sealable_pages(torch.tensor([pos + 1]), page, config.window))
        if now_sealable > sealed:
            store.seal(pages[sealed:now_sealable], torch.full((now_sealable - sealed,), pos + 1))
            sealed = now_sealable
        if (step + 1) % 8 == 0:
            print(f"decode step {step + 1}/{DECODE}: {sealed} pages sealed, worst relative error so far {worst:.4f}")

    s = store.stats()
    entries = s.sealed_pages * page * LAYERS * KV_HEADS
    print("\nstore after", total, "tokens:")
    print(f"  arena used {s.used_bytes / 2**20:.2f} MiB of {s.capacity_bytes / 2**20:.0f} MiB "
          f"(staged {s.staged_bytes / 2**20:.2f}, sealed {s.sealed_bytes / 2**20:.2f}, descriptors {s.descriptor_bytes / 2**10:.1f} KiB)")
    print(f"  sealed tokens per tier (token x layer x head entries): high {s.tokens_per_tier[0] / entries:.1%}, "
          f"low {s.tokens_per_tier[1] / entries:.1%}, pruned {s.pruned_tokens / entries:.1%}")
    print(f"  compression vs bf16, all metadata counted: {s.compression_ratio:.2f}x overall, "
          f"{s.sealed_compression_ratio:.2f}x on sealed pages")
    print(f"  decode output vs dense attention: worst relative L2 error {worst:.4f}")
    store.release(pages)
    assert store.arena.used_bytes == 0
    print("  released every page: arena back to 0 bytes used")


if __name__ == "__main__":
    main()
