"""Ops that exist on CPU but not on CUDA for a dtype, kept out of the store's, arena's, wrappers' and glue's code.

The first run of ``--kv-pool diffkv`` under SGLang on an H200 died in ``CompressedKVStore.release`` on an int64
matrix-vector product (``"addmv_impl_cuda" not implemented for 'Long'``): CPU has integer matrix products, CUDA
does not, so no CPU test saw it. Two guards over one life cycle of a store (:func:`life_cycle`: stage, write,
extend plan/run, importance, the decode step's page table and sealing through the SGLang backend's own methods,
decode plan/run, release of staged and sealed pages, compaction, reads, stats, clear):

* on CPU, every run: the life cycle under :class:`IntegerMatmulGuard`, a dispatch mode that fails on any
  matrix-product op (``mm``, ``mv``, ``addmv``, ``bmm``, ``dot``... which ``@``, ``matmul`` and ``einsum``
  become) with an integer operand;
* on CUDA (skipped without a GPU): the life cycle on the GPU, torch reference and Triton kernels, against the CPU
  run: tables, dequantized pages and stats equal, attention outputs within bf16 rounding.

The glue steps need SGLang importable (the backend module imports it; on CPU with ``diffkv_devtools.CPU_SHIMS``, so that
check runs in a subprocess); without SGLang they are skipped. The whole
plugin under a real ``sglang.Engine`` on a GPU is ``tests/test_gpu_serving.py``.
"""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from kernel_stores import tier_values
from torch.utils._python_dispatch import TorchDispatchMode

from diffkv_devtools import CPU_SHIMS
from diffkv_sglang.attention import DecodeAttentionWrapper, ExtendAttentionWrapper
from diffkv_sglang.config import DiffKVConfig
from diffkv_sglang.policy import sealable_pages
from diffkv_sglang.store import CompressedKVStore

L, H, HQ, D, P = 2, 2, 4, 64, 16
SEQ = (70, 40)                                   # prompt tokens of two requests
PAGES = ((3, 1, 7, 5, 9), (2, 8, 4))             # their logical pages (5 and 3; page 0 is SGLang's padding page)

_aten = torch.ops.aten
MATMUL_OPS = frozenset({_aten.mm, _aten.mv, _aten.addmv, _aten.addmm, _aten.bmm, _aten.baddbmm, _aten.addbmm,
                        _aten.dot, _aten.vdot, _aten.addr, _aten._addmm_activation, _aten.matmul})
_INTEGER = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)


class IntegerMatmulGuard(TorchDispatchMode):
    """Raises AssertionError on a matrix-product aten op with an integer or bool tensor operand (CUDA has none)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in MATMUL_OPS:
            dtypes = [a.dtype for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if any(dtype in _INTEGER for dtype in dtypes):
                raise AssertionError(f"{func} on {dtypes}: CUDA has no integer matrix products")
        return func(*args, **kwargs)


def _glue_backend(store: CompressedKVStore, req_to_token: torch.Tensor):
    """The SGLang backend's page-table and sealing methods bound to ``store`` (imports SGLang).

    They use only ``store``, ``page_size``, ``window`` and ``req_to_token`` of the backend, so a namespace holding
    those runs SGLang's exact code path without a model runner."""
    from diffkv_sglang.integration.backend import DiffKVAttnBackend

    fields = types.SimpleNamespace(store=store, page_size=store.page_size, window=store.config.window,
                                   req_to_token=req_to_token)
    return types.SimpleNamespace(**{name: getattr(DiffKVAttnBackend, name).__get__(fields)
                                    for name in ("_page_table", "_seal_old_pages")})


def life_cycle(device: str, glue: bool = False) -> dict:
    """One store's life on ``device`` with fixed inputs; returns its observable results on the CPU.

    ``glue``: the decode step builds its page table and seals through the SGLang backend's methods
    (:func:`_glue_backend`) instead of calling ``store.seal`` directly; both seal the same pages.
    """
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device)                  # noqa: E731
    config = DiffKVConfig(page_size=P, window=16, alpha_prune=0.02, compaction_trigger=0.0)
    store = CompressedKVStore(config, L, H, D, num_pages=12, arena_bytes=1 << 20, dtype=torch.bfloat16,
                              device=device)
    pages = [torch.tensor(p, device=device) for p in PAGES]
    locs = [(p[:, None] * P + torch.arange(P, device=device)).reshape(-1)[:n] for p, n in zip(pages, SEQ)]
    all_pages, all_locs = torch.cat(pages), torch.cat(locs)
    seq_lens = torch.tensor(SEQ, device=device)
    page_table = torch.nn.utils.rnn.pad_sequence(pages, batch_first=True)                  # [2, max_pages]
    result = {}

    # prefill: stage, write, extend attention (records window importance), then steer the importance
    store.stage(all_pages)
    extend = ExtendAttentionWrapper(store, HQ)
    extend.plan(torch.tensor([0, SEQ[0], sum(SEQ)], device=device), page_table, seq_lens)
    values = torch.tensor(tier_values(config))
    for layer in range(L):
        store.write_tokens(layer, all_locs, rand(sum(SEQ), H, D), rand(sum(SEQ), H, D))
        result[f"extend_out_{layer}"] = extend.run(rand(sum(SEQ), HQ, D).bfloat16(), layer).float().cpu()
        steer = values[torch.randint(0, len(values), (sum(SEQ), H), generator=gen)]
        store.add_importance(layer, all_locs, (steer / 1000).to(device), torch.ones(sum(SEQ), device=device),
                             accumulate=False)

    # decode step: one new token per request; seal the pages before the window (context = the request's length)
    new_lens = seq_lens + 1
    new_locs = torch.stack([p[n // P] * P + n % P for p, n in zip(pages, SEQ)])
    if glue:
        req_to_token = torch.zeros(2, 128, dtype=torch.int32, device=device)
        for b, loc in enumerate(locs):
            req_to_token[b, :SEQ[b]] = loc.int()
        req_to_token[torch.arange(2, device=device), seq_lens] = new_locs.int()
        backend = _glue_backend(store, req_to_token)
        batch = types.SimpleNamespace(seq_lens=new_lens.int(), seq_lens_cpu=new_lens.cpu(),
                                      req_pool_indices=torch.arange(2, device=device))
        table, valid = backend._page_table(batch)
        backend._seal_old_pages(table, valid, new_lens)
    else:
        counts = sealable_pages(new_lens, P, config.window).tolist()
        sealed = torch.cat([p[:c] for p, c in zip(pages, counts)])
        order = sealed.argsort()                                   # the backend seals in page order
        store.seal(sealed[order], torch.cat([new_lens[b].repeat(c) for b, c in enumerate(counts)])[order])
        table = page_table
    store.maybe_compact()
    decode = DecodeAttentionWrapper(store, HQ)
    decode.plan(table, new_lens)
    for layer in range(L):
        store.write_tokens(layer, new_locs, rand(2, H, D), rand(2, H, D))
        result[f"decode_out_{layer}"] = decode.run(rand(2, HQ, D).bfloat16(), layer).float().cpu()

    # request 1 ends (a sealed page among its pages), compaction closes the hole, request 0 is read back
    store.release(pages[1])
    compaction = store.maybe_compact()
    assert compaction is not None and compaction.moved_bytes > 0
    store.arena.check_invariants()
    for layer in range(L):
        keys, vals, present = store.read_pages(layer, pages[0])                           # [n, H, P(, D)]
        written = lambda x: x.transpose(1, 2).flatten(0, 1)[:SEQ[0] + 1].cpu()            # noqa: E731
        result[f"keys_{layer}"], result[f"values_{layer}"] = written(keys), written(vals)
        result[f"present_{layer}"] = written(present)
    for name in ("page_state", "tier_counts"):                         # copies: the store is cleared below
        result[name] = getattr(store, name).cpu().clone()
    result["block_offset"] = store.arena.block_offset.cpu().clone()
    result["block_nbytes"] = store.arena.block_nbytes.cpu().clone()
    stats = store.stats().as_dict()
    del stats["compaction_seconds"]
    result["stats"] = stats
    store.release(all_pages)
    assert store.arena.used_bytes == 0 and store.stats().sealed_bytes == 0 and store.stats().tokens_per_tier == (0, 0)
    store.clear()
    store.arena.check_invariants()
    return result


def _assert_same(got: dict, want: dict) -> None:
    """Tables, reads and stats equal; attention outputs within bf16 rounding (different kernels and orders)."""
    assert got.keys() == want.keys()
    for name, value in want.items():
        if name.endswith(tuple(f"_out_{layer}" for layer in range(L))):
            torch.testing.assert_close(got[name], value, atol=2e-2, rtol=2e-2, msg=name)
        elif isinstance(value, torch.Tensor):
            assert torch.equal(got[name], value), name
        else:
            assert got[name] == value, name


# ------------------------------------------------------------------------------------------- CPU guard
def test_the_guard_catches_integer_matrix_products():
    a = torch.ones(3, 2, dtype=torch.int64)
    for product in (lambda: a.T @ torch.ones(3, dtype=torch.int64), lambda: torch.einsum("ij,ik->jk", a, a),
                    lambda: torch.mm(a.T, a), lambda: torch.bmm(a[None], a.T[None])):
        with IntegerMatmulGuard(), pytest.raises(AssertionError, match="integer matrix products"):
            product()
    with IntegerMatmulGuard():
        torch.ones(3, 2) @ torch.ones(2)                       # float products pass


def test_life_cycle_has_no_integer_matrix_products(torch_reference):
    with IntegerMatmulGuard():
        life_cycle("cpu")


def check_glue_on_cpu() -> None:
    """The glue life cycle under the guard, equal to the store's own (run by the test below in a subprocess)."""
    with IntegerMatmulGuard():
        glued = life_cycle("cpu", glue=True)
    _assert_same(glued, life_cycle("cpu"))


def test_glue_life_cycle_has_no_integer_matrix_products():
    """In a subprocess: importing SGLang on a CPU-only machine needs the CPU shims (torchvision, sgl_kernel) on the
    path, which must not leak into this test session."""
    pytest.importorskip("sglang")
    here = Path(__file__).parent
    shims = [] if torch.cuda.is_available() else [str(CPU_SHIMS)]
    env = {**os.environ, "DIFFKV_KERNELS": "torch",
           "PYTHONPATH": os.pathsep.join([*shims, os.environ.get("PYTHONPATH", "")])}
    code = (f"import sys; sys.path[:0] = [{str(here)!r}, {str(here / 'kernel_support')!r}]; "
            "import test_cuda_ops; test_cuda_ops.check_glue_on_cpu()")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


# ------------------------------------------------------------------------------------------ CUDA runs
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("mode", ["torch", "triton"])
@pytest.mark.parametrize("glue", [False, True], ids=["store", "glue"])
def test_life_cycle_on_cuda_matches_cpu(mode, glue, monkeypatch):
    if glue:
        pytest.importorskip("sglang")
    monkeypatch.setenv("DIFFKV_KERNELS", "torch")
    want = life_cycle("cpu")
    monkeypatch.setenv("DIFFKV_KERNELS", mode)
    got = life_cycle("cuda", glue=glue)
    torch.cuda.synchronize()
    _assert_same(got, want)
