"""CUDA sealed-page decode prototype (kernels/cuda_decode.py, kernels/cuda/sealed_decode.cu) against the torch
reference DecodeAttentionWrapper, with the error bound derived in tests/test_kernel_decode.py (a bfloat16 query:
``u = 2^-11``; the prototype's arithmetic is the Triton kernel's).

Stores are built through the store's own API with every token of every page steered to the high tier or pruned
(some pages entirely pruned), all pages sealed; requests whose length is not a multiple of the page size end in a
sealed page of which only the first tokens count (the kernel then reads the tokens' in-page indices). On CPU: the
source compiles with nvcc (when it is on PATH) and the launcher's refusals; on CUDA: outputs against the reference,
small and serving sizes, GQA 1, 3, 4, 7, 8, head_dim 64 and 128, CUDA-graph capture.
"""

import math
import shutil
import subprocess

import pytest
import torch

from diffkv_sglang.attention import DecodeAttentionWrapper
from diffkv_sglang.config import DiffKVConfig
from diffkv_sglang.format import LayerFormats
from diffkv_sglang.kernels import cuda_decode
from diffkv_sglang.kernels.decode_attention import DecodePlan
from diffkv_sglang.store import CompressedKVStore, PageState
from decode_bound import error_bound
from kernel_stores import CONTEXT, PRUNING, tier_values

pytestmark = pytest.mark.usefixtures("torch_reference")

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="the CUDA kernel runs on a GPU only")
RTOL = 1e-5


def sealed_high_store(config: DiffKVConfig, heads: int, dim: int, seq_lens: list[int], pruned: float = 0.1,
                      seed: int = 0):
    """A one-layer CPU store (float32) with ``ceil(n / page)`` full pages per request, all sealed, every token in
    tier 0 or pruned (share ``pruned``; a page in eight entirely pruned). Returns the store, page table
    ``[B, max_pages]`` and ``seq_lens`` (the tokens that count; the last page may hold more)."""
    gen = torch.Generator().manual_seed(seed)
    page = config.page_size
    counts = [math.ceil(n / page) for n in seq_lens]
    store = CompressedKVStore(config, 1, heads, dim, num_pages=sum(counts) + 2,
                              arena_bytes=sum(counts) * heads * (4 * page * dim * 4 + 256) + (1 << 16))
    store.arena.data.random_(0, 256, generator=gen)          # unwritten bytes hold garbage, NaN patterns too
    pages = (torch.randperm(sum(counts), generator=gen) + 1).tolist()
    table = torch.zeros(len(seq_lens), max(counts), dtype=torch.int64)
    high, prune = tier_values(config)[0], tier_values(config)[-1]
    for b, c in enumerate(counts):
        own = torch.tensor(pages[:c])
        pages = pages[c:]
        table[b, :c] = own
        store.stage(own)
        locs = (own[:, None] * page + torch.arange(page)).reshape(-1)
        store.write_tokens(0, locs, torch.randn(len(locs), heads, dim, generator=gen) * 2,
                           torch.randn(len(locs), heads, dim, generator=gen))
        drop = torch.rand(c, page, heads, generator=gen) < pruned
        drop |= (torch.rand(c, 1, 1, generator=gen) < 1 / 8)
        r = torch.where(drop, prune, high).reshape(-1, heads)
        store.add_importance(0, locs, r / CONTEXT, torch.ones(len(locs)))
        store.seal(own, torch.full((c,), CONTEXT))
    return store, table, torch.tensor(seq_lens)


def run_both(store, table, seq_lens, num_q_heads, num_splits=None, seed=0):
    """Reference and CUDA kernel on one bfloat16 query; returns (out, ref, bound, plan)."""
    gen = torch.Generator().manual_seed(seed)
    reference = DecodeAttentionWrapper(store, num_q_heads)
    reference.plan(table, seq_lens)
    kernel_store = store.to("cuda")
    plan = DecodePlan(kernel_store.view, num_q_heads, max_batch=len(seq_lens),
                                  max_pages=table.shape[1])
    plan.plan(table.cuda(), seq_lens.cuda())
    sealed = cuda_decode.CudaSealedDecode(plan, num_splits=num_splits)
    for workspace in (plan._part_m, plan._part_l, plan._part_acc):
        workspace.fill_(float("nan"))                        # nothing unwritten may be read
    q = torch.randn(len(seq_lens), num_q_heads, store.head_dim, generator=gen).to(torch.bfloat16)
    ref = reference.run(q.float(), 0)
    out = torch.full(q.shape, float("nan"), device="cuda")
    assert sealed.run(q.cuda(), 0, out=out) is out
    bound, _ = error_bound(store, table, seq_lens, 0, q.float(), plan.sm_scale, 2 ** -11, ref, float32_slack=RTOL)
    return out.cpu(), ref, bound, plan


# ------------------------------------------------------------------------------------------------ on CPU
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_source_compiles(tmp_path):
    """The kernel source compiles for sm_90a (with the flags the JIT build uses), without spilling registers."""
    from torch.utils.cpp_extension import include_paths

    command = ["nvcc", "-c", *cuda_decode.CUDA_FLAGS, "-Xptxas=-v", *(f"-I{p}" for p in include_paths()),
               str(cuda_decode.SOURCE_DIR / "sealed_decode.cu"), "-o", str(tmp_path / "sealed_decode.o")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    spills = [line for line in proc.stderr.splitlines() if "spill" in line]
    assert spills and all("0 bytes spill stores, 0 bytes spill loads" in line for line in spills), spills


@pytest.mark.parametrize("change, words", [
    (dict(tiers=["k4v2", "k8v4"]), "tier 0 is k4v2"),
    (dict(tiers=["k8v4g2"]), "tier 0 is k8v4g2"),
    (dict(key_rotation="hadamard"), "rotation"),
    (dict(value_rotation="hadamard"), "rotation"),
])
def test_unsupported_formats_are_refused(change, words):
    fmt = LayerFormats(DiffKVConfig.from_dict(change), 1, 128, torch.bfloat16)[0]
    with pytest.raises(ValueError, match=words):
        cuda_decode.check_format(fmt, 4)


def test_unsupported_shapes_are_refused():
    fmt = LayerFormats(DiffKVConfig(), 1, 32, torch.bfloat16)[0]
    with pytest.raises(ValueError, match="head_dim 32"):
        cuda_decode.check_format(fmt, 4)
    fmt = LayerFormats(DiffKVConfig(), 1, 128, torch.bfloat16)[0]
    with pytest.raises(ValueError, match="9 query heads"):
        cuda_decode.check_format(fmt, 9)
    with pytest.raises(ValueError, match="ring slots"):
        cuda_decode.ring_stages(cuda_decode.ring_slot_bytes(
            LayerFormats(DiffKVConfig.from_dict({"page_size": 256}), 1, 128, torch.bfloat16)[0]), 228 * 1024)


def test_block_layout_follows_the_format():
    """The layout the kernel gets is format.py's: section starts of a tier-0-only block, for several row counts."""
    fmt = LayerFormats(DiffKVConfig(), 1, 128, torch.bfloat16)[0]
    layout = cuda_decode.block_layout(fmt)
    for rows in (1, 17, 32):
        counts = torch.tensor([rows, 0])
        starts = fmt.section_starts(counts)[:, 0].tolist()                   # keys, values, key meta, value meta, index
        lines = [layout[2 * i] * rows + layout[2 * i + 1] for i in range(6)]
        assert lines[:4] == starts[:4] and lines[5] == starts[4]
        assert lines[4] == int(fmt.meta_scale_start(counts))
        assert (rows * layout[12] + layout[13] + 15) // 16 * 16 == int(fmt.block_nbytes(counts))


def test_cpu_store_is_refused():
    store, table, lens = sealed_high_store(DiffKVConfig.from_dict({"page_size": 16, **PRUNING}), 2, 64, [40])
    plan = DecodePlan(store.view, 4, max_batch=1, max_pages=table.shape[1])
    with pytest.raises(ValueError, match="CUDA store"):
        cuda_decode.CudaSealedDecode(plan)


# ----------------------------------------------------------------------------------------------- on CUDA
CASES = {
    # name: (kv heads, head_dim, gqa, seq_lens, page size, splits)
    "llama-3-8b shape (gqa 4), partial last pages": (8, 128, 4, [1, 37, 700, 1500, 2048], 32, None),
    "smollm2 shape (gqa 3), head_dim 64": (3, 64, 3, [64, 333, 1000, 2900], 32, None),
    "gqa 8, one split": (2, 128, 8, [2000, 129, 4096], 32, 1),
    "gqa 7, many splits": (4, 128, 7, [3000, 31, 1024], 32, 16),
    "gqa 1, head_dim 64, page 16": (2, 64, 1, [500, 16, 17], 16, 3),
    "page 64 (two steps per block)": (2, 128, 4, [1000, 130, 64], 64, 2),
}


@needs_cuda
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_decode_matches_reference(case, seeded):
    heads, dim, gqa, seq_lens, page, splits = CASES[case]
    config = DiffKVConfig.from_dict({"page_size": page, **PRUNING})
    store, table, lens = sealed_high_store(config, heads, dim, seq_lens, seed=seeded)
    out, ref, bound, plan = run_both(store, table, lens, heads * gqa, num_splits=splits, seed=seeded)
    err = (out - ref).double().abs()
    assert torch.isfinite(out).all()
    assert torch.all(err <= bound), float((err / bound).max())


@needs_cuda
@pytest.mark.parametrize("heads, dim, gqa, batch, longest", [(8, 128, 4, 64, 16384), (4, 128, 7, 256, 32768),
                                                             (3, 64, 3, 64, 16384)])
def test_cuda_decode_at_serving_sizes(heads, dim, gqa, batch, longest, seeded):
    gen = torch.Generator().manual_seed(seeded)
    lens = [longest, 1, longest] + torch.randint(1, 2049, (batch - 3,), generator=gen).tolist()
    config = DiffKVConfig.from_dict({"page_size": 32, **PRUNING})
    store, table, lens = sealed_high_store(config, heads, dim, lens, seed=seeded)
    out, ref, bound, _ = run_both(store, table, lens, heads * gqa, seed=seeded)
    err = (out - ref).double().abs()
    assert torch.all(err <= bound), float((err / bound).max())


@needs_cuda
def test_cuda_decode_refuses_staged_and_mixed_pages(seeded):
    config = DiffKVConfig.from_dict({"page_size": 32, **PRUNING})
    store, table, lens = sealed_high_store(config, 2, 128, [300, 200], seed=seeded)
    store = store.to("cuda")
    plan = DecodePlan(store.view, 8, max_batch=2, max_pages=table.shape[1])
    plan.plan(table.cuda(), lens.cuda())
    sealed = cuda_decode.CudaSealedDecode(plan)
    q = torch.randn(2, 8, 128, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        sealed.run(q.float(), 0)
    store.tier_counts[int(table[0, 0]), 0, 0, 1] = 1                # a token in the low tier
    with pytest.raises(ValueError, match="other than the high tier"):
        sealed.run(q, 0)
    store.page_state[int(table[1, 0])] = PageState.STAGED
    with pytest.raises(ValueError, match="staged or empty"):
        sealed.run(q, 0)


@needs_cuda
def test_cuda_decode_is_capturable_in_a_cuda_graph(seeded):
    config = DiffKVConfig.from_dict({"page_size": 32, **PRUNING})
    store, table, lens = sealed_high_store(config, 4, 128, [700, 100, 1500], seed=seeded)
    store = store.to("cuda")
    plan = DecodePlan(store.view, 16, max_batch=3, max_pages=table.shape[1])
    plan.plan(table.cuda(), lens.cuda())
    sealed = cuda_decode.CudaSealedDecode(plan)
    q = torch.randn(3, 16, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    expected = sealed.run(q, 0).clone()                     # builds and checks outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sealed.run(q, 0, out=out, check=False)
    out.fill_(float("nan"))
    graph.replay()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
