"""CUDA decode split kernel (kernels/cuda_decode.py, kernels/cuda/sealed_decode.cu) through DecodePlan
(``split_kernel="cuda"``, what ``DIFFKV_KERNELS=cuda`` selects) against the torch reference DecodeAttentionWrapper,
with the error bound derived in tests/test_kernel_decode.py (a bfloat16 query: ``u = 2^-11``; staged tokens'
probabilities rounded to the 16-bit model dtype: ``staged_u``), staged-token importance included.

Stores come from ``kernel_stores.build`` in a 16-bit model dtype: shuffled pages, the last pages of each request
staged, the others sealed with steered tiers (pages with both tiers, a single tier, or everything pruned),
requests whose last page is partly valid. On CPU: the source compiles with nvcc (when it is on PATH) without
spills, the refusals, the layout the binding gets, a numpy emulation of the kernel's 4-bit key and 2-bit value
operand extraction against format.py's packing, and the ``DIFFKV_KERNELS=cuda`` switch. On CUDA: outputs and
importance against the reference at small and serving sizes, GQA 1, 3, 4, 7, 8, head_dim 64 and 128, CUDA-graph
capture and replay, and the switch end to end through DecodeAttentionWrapper.
"""

import math
import shutil
import subprocess

import numpy as np
import pytest
import torch

from diffkv_sglang.attention import DecodeAttentionWrapper
from diffkv_sglang.backend_select import KERNELS_ENV, decode_split_kernel, kernel_mode, use_kernels
from diffkv_sglang.config import DiffKVConfig
from diffkv_sglang.format import KEYS, VALUES, LayerFormats, PageState
from diffkv_sglang.kernels import cuda_decode
from diffkv_sglang.kernels.decode_attention import DecodePlan
from decode_bound import error_bound
from kernel_stores import PRUNING, build

pytestmark = pytest.mark.usefixtures("torch_reference")

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="the CUDA kernel runs on a GPU only")
RTOL = 1e-5
STAGED_U = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}


def staged_pages(store, table, seq_lens):
    """The STAGED pages of the batch's requests ``[n]``."""
    page = store.page_size
    in_request = torch.arange(table.shape[1]) < (seq_lens[:, None] + page - 1) // page
    return table[(store.page_state[table] == PageState.STAGED) & in_request]


def check_against_reference(store, table, seq_lens, num_q_heads, num_splits=None, seed=0):
    """Reference (on the CPU ``store``) and the CUDA split kernel (a copy on CUDA, through DecodePlan) for every
    layer on a query in the model dtype; asserts outputs and staged-token importance within the derived bound."""
    gen = torch.Generator().manual_seed(seed)
    staged = staged_pages(store, table, seq_lens)
    reference = DecodeAttentionWrapper(store, num_q_heads)
    reference.plan(table, seq_lens)
    kernel_store = store.to("cuda")
    plan = DecodePlan(kernel_store.view, num_q_heads, max_batch=len(seq_lens) + 1, max_pages=table.shape[1] + 1,
                      num_splits=num_splits, split_kernel="cuda")
    assert plan._cuda is not None, "the CUDA extension did not build"
    plan.plan(table.cuda(), seq_lens.cuda())
    for workspace in (plan._part_m, plan._part_l, plan._part_acc, plan._logits):
        workspace.fill_(float("nan"))                        # nothing unwritten may be read
    for layer in range(store.num_layers):
        q_kernel = torch.randn(len(seq_lens), num_q_heads, store.head_dim, generator=gen).to(store.dtype)
        q = q_kernel.float()
        assert plan._cuda.supports(layer, q_kernel.cuda())
        ref = reference.run(q, layer)
        ref_score, ref_seen = store.staged_importance(layer, staged)
        out = torch.full(q_kernel.shape, float("nan"), device="cuda")          # float32 output
        assert plan.run(q_kernel.cuda(), layer, out=out) is out
        out = out.cpu()
        score, seen = (x.cpu() for x in kernel_store.staged_importance(layer, staged.cuda()))
        bound, logit_err = error_bound(store, table, seq_lens, layer, q, plan.sm_scale, 2 ** -11, ref,
                                       staged_u=STAGED_U[store.dtype], float32_slack=RTOL)
        ratio = (out - ref).double().abs() / bound
        assert torch.isfinite(out).all() and torch.all(ratio <= 1), (layer, float(ratio.max()))
        torch.testing.assert_close(score, ref_score, rtol=math.expm1(2 * float(logit_err.max())) + RTOL, atol=1e-7)
        assert torch.equal(seen, ref_seen)


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
    assert len(spills) >= 4 and all("0 bytes spill stores, 0 bytes spill loads" in line for line in spills), spills


@pytest.mark.parametrize("change, words", [
    (dict(tiers=["k4v2", "k8v4"]), "tiers k4v2,k8v4"),
    (dict(tiers=["k8v4g2"]), "tiers k8v4g2"),
    (dict(tiers=["k8v4", "k2v2"]), "tiers k8v4,k2v2"),
    (dict(tiers=["k8v4", "k4v2", "k2v2"], thresholds=[2.0, 0.5]), "at most 2 tiers"),
    (dict(key_rotation="hadamard"), "rotation"),
    (dict(value_rotation="hadamard"), "rotation"),
])
def test_unsupported_formats_are_refused(change, words):
    fmt = LayerFormats(DiffKVConfig.from_dict(change), 1, 128, torch.bfloat16)[0]
    with pytest.raises(ValueError, match=words):
        cuda_decode.check_format(fmt, 4)


def test_unsupported_shapes_and_dtypes_are_refused():
    for tiers in (["k8v4"], ["k8v4", "k4v2"]):
        config = DiffKVConfig.from_dict({"tiers": tiers, "thresholds": [1.0][:len(tiers) - 1]})
        cuda_decode.check_format(LayerFormats(config, 1, 64, torch.bfloat16)[0], 8)
    fmt = LayerFormats(DiffKVConfig(), 1, 32, torch.bfloat16)[0]
    with pytest.raises(ValueError, match="head_dim 32"):
        cuda_decode.check_format(fmt, 4)
    fmt = LayerFormats(DiffKVConfig(), 1, 128, torch.bfloat16)[0]
    with pytest.raises(ValueError, match="9 query heads"):
        cuda_decode.check_format(fmt, 9)
    with pytest.raises(ValueError, match="float32"):
        cuda_decode.check_dtype(torch.float32)
    with pytest.raises(ValueError, match="ring slots"):
        cuda_decode.ring_stages(cuda_decode.ring_slot_bytes(
            LayerFormats(DiffKVConfig.from_dict({"page_size": 256}), 1, 128, torch.bfloat16)[0]), 228 * 1024)


@pytest.mark.parametrize("tiers", [["k8v4"], ["k8v4", "k4v2"]])
def test_block_layout_follows_the_format(tiers):
    """The layout the binding gets is format.py's: every section start, the meta scales and the block size of
    blocks with tier-0 and tier-1 rows in several proportions, the staged values' offset and the page states."""
    config = DiffKVConfig.from_dict({"tiers": tiers, "thresholds": [1.0][:len(tiers) - 1]})
    formats = LayerFormats(config, 1, 128, torch.bfloat16)
    fmt, staged = formats[0], formats.staged
    layout = cuda_decode.block_layout(fmt, staged)
    lines = 5 * 2 * 3
    for n0, n1 in ((1, 0), (17, 0), (32, 0), (0, 5), (10, 22), (31, 1)):
        if n1 and fmt.num_tiers == 1:
            continue
        counts = torch.tensor([n0, n1][:fmt.num_tiers])
        starts = fmt.section_starts(counts)
        for kind in range(5):
            for tier in range(fmt.num_tiers):
                c0, c1, const = layout[(kind * 2 + tier) * 3:(kind * 2 + tier) * 3 + 3]
                assert n0 * c0 + n1 * c1 + const == int(starts[kind, tier]), (kind, tier, n0, n1)
        assert n0 * layout[lines] + n1 * layout[lines + 1] == int(fmt.meta_scale_start(counts))
        data = n0 * layout[lines + 2] + n1 * layout[lines + 3] + layout[lines + 4]
        assert (data + layout[lines + 5] - 1) // layout[lines + 5] * layout[lines + 5] == int(fmt.block_nbytes(counts))
    assert layout[lines + 6:] == (staged.values_start, int(PageState.STAGED), int(PageState.SEALED))
    assert cuda_decode.ring_slot_bytes(fmt) >= int(fmt.block_nbytes(torch.tensor([32, 0][:fmt.num_tiers])))


# numpy emulation of the kernel's operand extraction (sealed_decode.cu: key_codes, value_field0/1, the chunk's
# bit / word / selector / shift): the float16 pairs a lane feeds to mma must be the codes of the dimensions the
# fragment mapping assigns (key_dim for keys; (D / 8) g + 2c, + 1 for values), for rows packed as format.py says.
def _byte_perm(x: int, y: int, selector: int) -> int:
    data = (x | y << 32).to_bytes(8, "little")
    return int.from_bytes(bytes(data[(selector >> (4 * i)) & 7] for i in range(4)), "little")


def _halves(word: int, scale: tuple[float, float], offset: tuple[float, float]) -> tuple[float, float]:
    """The two float16 of ``word`` (low first) times ``scale`` plus ``offset`` (float16 fma: exact here)."""
    h = np.array([word & 0xFFFF, word >> 16], dtype=np.uint16).view(np.float16).astype(np.float64)
    return tuple(float(np.float16(v * s + o)) for v, s, o in zip(h, scale, offset))


def _mask_or(x: int, mask: int, bits: int = 0x64006400) -> int:
    return (x & mask) | bits


def _pack(codes: np.ndarray, bits: int) -> bytes:
    """format.py's packing: element j in byte j * bits // 8 at bit (j * bits) % 8."""
    out = bytearray(len(codes) * bits // 8)
    for j, c in enumerate(codes):
        out[j * bits // 8] |= int(c) << (j * bits) % 8
    return bytes(out)


@pytest.mark.parametrize("dim", [64, 128])
def test_operand_extraction_emulated(dim):
    rng = np.random.default_rng(dim)
    key_bits, value_bits = 4, 2                           # tier 1 (k4v2), the kernel's new decoders
    fmt = LayerFormats(DiffKVConfig(), 1, dim, torch.bfloat16)[0]
    assert (fmt.row_bytes(KEYS, 1), fmt.row_bytes(VALUES, 1)) == (dim * key_bits // 8, dim * value_bits // 8)
    keys, values = rng.integers(0, 16, dim), rng.integers(0, 4, dim)
    key_row, value_row = _pack(keys, key_bits), _pack(values, value_bits)
    for t in range(4):
        for half in range(dim // 64):
            at = half * 8 * key_bits + t * 2 * key_bits                  # the lane's 8 bytes of the half
            words = [int.from_bytes(key_row[at + 4 * w:at + 4 * w + 4], "little") for w in range(2)]
            for i in range(4):
                c = 4 * half + i
                for k2 in range(2):                                      # key_codes<4>(words, i, k2)
                    byte = 2 * (i % 2) + k2
                    spread = _byte_perm(words[i // 2], 0, 0x4040 | byte | byte << 8)
                    got = _halves(_mask_or(spread, 0x00F0000F), (1.0, 1 / 16), (-1024.0, -64.0))
                    dims = [(c // 4) * 64 + 16 * t + 4 * (c % 4) + 2 * k2 + j for j in range(2)]   # key_dim
                    assert got == tuple(float(keys[d]) for d in dims), (t, c, k2)
    slice_bytes = dim * value_bits // 64
    for g in range(8):                 # value_field0/1<2> of the chunk's pair; token y is the same row here
        raw = value_row[slice_bytes * g:slice_bytes * (g + 1)]
        words = [int.from_bytes(raw[4 * w:4 * w + 4], "little") for w in range(max(1, slice_bytes // 4))]
        for c in range(dim // 16):
            bit = 2 * value_bits * c
            word, shift = bit // 32, bit % 16
            pair = _byte_perm(words[word], words[word], 0x5410 if bit % 32 < 16 else 0x7632) >> shift
            low = _halves(_mask_or(pair, 0x00030003), (1.0, 1.0), (-1024.0, -1024.0))
            high = _halves(_mask_or(pair, 0x000C000C), (0.25, 0.25), (-256.0, -256.0))
            dim_lo = (dim // 8) * g + 2 * c
            assert low == (float(values[dim_lo]),) * 2 and high == (float(values[dim_lo + 1]),) * 2, (g, c)


def test_kernels_env_cuda(monkeypatch):
    """``DIFFKV_KERNELS=cuda``: a valid mode, like ``auto`` for where kernels run; decode wrappers built under it
    plan with the CUDA split kernel, under any other mode with Triton's."""
    monkeypatch.setenv(KERNELS_ENV, " CUDA ")
    assert kernel_mode() == "cuda" and decode_split_kernel() == "cuda"
    assert not use_kernels("cpu", 128)
    assert use_kernels("cuda", 128)
    monkeypatch.setenv(KERNELS_ENV, "auto")
    assert decode_split_kernel() == "triton"
    with pytest.raises(ValueError, match="split_kernel='xla'"):
        DecodePlan(build(DiffKVConfig.from_dict({"page_size": 16}), 2, 64, [40], layers=1)[0].view, 2, max_batch=1,
                   max_pages=4, split_kernel="xla")
    monkeypatch.setenv(KERNELS_ENV, "xla")
    with pytest.raises(ValueError, match="auto, torch, triton, cuda"):
        kernel_mode()


def test_cuda_split_off_cuda():
    """On a CPU store a ``split_kernel="cuda"`` plan runs the Triton kernel; the CUDA wrapper refuses the store."""
    store, table, lens = build(DiffKVConfig.from_dict({"page_size": 16}), 2, 64, [40], layers=1,
                               dtype=torch.bfloat16)
    plan = DecodePlan(store.view, 4, max_batch=1, max_pages=table.shape[1], split_kernel="cuda")
    assert plan._cuda is None
    with pytest.raises(ValueError, match="CUDA store"):
        cuda_decode.CudaDecodeSplit(store.view, 2, module=None)


# ----------------------------------------------------------------------------------------------- on CUDA
CASES = {
    # name: (kv heads, head_dim, gqa, seq_lens, config overrides, splits, staged pages per request, model dtype)
    "llama-3-8b shape (gqa 4), pruning, partial pages": (8, 128, 4, [1, 37, 700, 1500, 2048], PRUNING, None, 2,
                                                         torch.bfloat16),
    "smollm2 shape (gqa 3), head_dim 64, 3 staged": (3, 64, 3, [64, 333, 1000, 2900], {}, None, 3, torch.bfloat16),
    "gqa 8, one split": (2, 128, 8, [2000, 129, 4096], PRUNING, 1, 1, torch.bfloat16),
    "gqa 7, many splits, float16": (4, 128, 7, [3000, 31, 1024], PRUNING, 16, 2, torch.float16),
    "gqa 1, head_dim 64, page 16": (2, 64, 1, [500, 16, 17], {"page_size": 16, **PRUNING}, 3, 1, torch.bfloat16),
    "page 64 (two steps per block)": (2, 128, 4, [1000, 130, 64], {"page_size": 64, **PRUNING}, 2, 1,
                                      torch.bfloat16),
    "one tier (k8v4)": (2, 128, 4, [700, 90, 33], {"tiers": ["k8v4"], "thresholds": [], **PRUNING}, None, 1,
                        torch.bfloat16),
}


@needs_cuda
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_decode_matches_reference(case, seeded):
    heads, dim, gqa, seq_lens, overrides, splits, staged, dtype = CASES[case]
    torch.manual_seed(seeded)
    store, table, lens = build(DiffKVConfig.from_dict(overrides), heads, dim, seq_lens, layers=2,
                               staged_pages=staged, dtype=dtype)
    check_against_reference(store, table, lens, heads * gqa, num_splits=splits, seed=seeded)


@needs_cuda
@pytest.mark.parametrize("dim, gqa", [(128, 4), (64, 3)])
def test_cuda_decode_partly_valid_sealed_pages(dim, gqa, seeded):
    """Requests whose last page is SEALED (both tiers, pruned tokens) with only its first tokens counting: the
    kernel reads each tier's in-page token indices."""
    torch.manual_seed(seeded)
    store, table, lens = build(DiffKVConfig.from_dict(PRUNING), 4, dim, [704, 96, 2048, 32], layers=1,
                               staged_pages=0, dtype=torch.bfloat16)
    check_against_reference(store, table, lens - torch.tensor([11, 31, 1, 0]), 4 * gqa, seed=seeded)


@needs_cuda
@pytest.mark.parametrize("heads, dim, gqa, batch, longest", [(8, 128, 4, 64, 16384), (4, 128, 7, 256, 32768),
                                                             (3, 64, 3, 64, 16384)])
def test_cuda_decode_at_serving_sizes(heads, dim, gqa, batch, longest, seeded):
    gen = torch.Generator().manual_seed(seeded)
    torch.manual_seed(seeded)
    lens = [longest, 1, longest] + torch.randint(1, 2049, (batch - 3,), generator=gen).tolist()
    store, table, lens = build(DiffKVConfig.from_dict(PRUNING), heads, dim, lens, layers=1, staged_pages=2,
                               dtype=torch.bfloat16)
    check_against_reference(store, table, lens, heads * gqa, seed=seeded)


@needs_cuda
def test_cuda_decode_kernel_info():
    store, _, _ = build(DiffKVConfig(), 8, 128, [64], layers=1, dtype=torch.bfloat16)
    plan = DecodePlan(store.to("cuda").view, 32, max_batch=1, max_pages=2, split_kernel="cuda")
    info = plan._cuda.kernel_info(0)
    assert info["local_bytes"] == 0 and info["ctas_per_sm"] >= 2, info


@needs_cuda
def test_float32_query_runs_triton(seeded):
    """A query the CUDA kernel does not take (float32) runs the Triton split kernel of the same plan."""
    torch.manual_seed(seeded)
    store, table, lens = build(DiffKVConfig(), 2, 128, [300, 200], layers=1, dtype=torch.bfloat16)
    plan = DecodePlan(store.to("cuda").view, 8, max_batch=2, max_pages=table.shape[1], split_kernel="cuda")
    plan.plan(table.cuda(), lens.cuda())
    q = torch.randn(2, 8, 128, device="cuda")
    assert not plan._cuda.supports(0, q)
    assert torch.isfinite(plan.run(q, 0)).all()


@needs_cuda
def test_cuda_decode_is_capturable_in_a_cuda_graph(seeded):
    torch.manual_seed(seeded)
    store, table, lens = build(DiffKVConfig.from_dict(PRUNING), 4, 128, [700, 100, 1500], layers=1, staged_pages=2,
                               dtype=torch.bfloat16)
    kernel_store = store.to("cuda")
    plan = DecodePlan(kernel_store.view, 16, max_batch=4, max_pages=table.shape[1], max_staged_pages=4,
                      split_kernel="cuda")
    plan.plan(table.cuda(), lens.cuda())
    q = torch.randn(3, 16, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    staged = staged_pages(store, table, lens).cuda()
    seen_before = kernel_store.staged_importance(0, staged)[1].clone()
    expected = plan.run(q, 0).clone()                       # builds and warms up outside the capture
    seen_eager = kernel_store.staged_importance(0, staged)[1].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.run(q, 0, out=out)
    out.fill_(float("nan"))
    graph.replay()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # the replay observed the staged tokens as the eager run did (+1 where visible, nothing beyond the lengths)
    assert torch.equal(kernel_store.staged_importance(0, staged)[1] - seen_eager, seen_eager - seen_before)


@needs_cuda
def test_kernels_env_cuda_end_to_end(monkeypatch, seeded):
    """``DIFFKV_KERNELS=cuda``: a CUDA store's DecodeAttentionWrapper runs the CUDA split kernel, within the bound
    of the reference, importance included."""
    torch.manual_seed(seeded)
    store, table, lens = build(DiffKVConfig.from_dict(PRUNING), 4, 128, [900, 45, 2000], layers=2, staged_pages=2,
                               dtype=torch.bfloat16)
    staged = staged_pages(store, table, lens)
    reference = DecodeAttentionWrapper(store, 16)
    reference.plan(table, lens)
    monkeypatch.setenv(KERNELS_ENV, "cuda")
    cuda_store = store.to("cuda")
    assert cuda_store.kernels
    wrapper = DecodeAttentionWrapper(cuda_store, 16)
    wrapper.plan(table.cuda(), lens.cuda())
    for layer in range(2):
        q = torch.randn(3, 16, 128).to(torch.bfloat16)
        out = wrapper.run(q.cuda(), layer, out=torch.empty(q.shape, device="cuda")).cpu()
        assert wrapper._kernel_plan._cuda is not None and wrapper._kernel_plan._cuda.supports(layer, q.cuda())
        ref = reference.run(q.float(), layer)
        bound, _ = error_bound(store, table, lens, layer, q.float(), 128 ** -0.5, 2 ** -11, ref,
                               staged_u=2 ** -8, float32_slack=RTOL)
        assert torch.all((out - ref).abs() <= bound), float(((out - ref).abs() / bound).max())
        torch.testing.assert_close(cuda_store.staged_importance(layer, staged.cuda())[1].cpu(),
                                   store.staged_importance(layer, staged)[1])
