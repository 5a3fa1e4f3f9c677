"""Host syncs of a decode step on the kernel path: planning and writing the new tokens must not wait for the GPU.

A decode step of the SGLang backend is: (seal the pages that left the window: its own syncs), ``plan`` the batch,
and per layer ``write_tokens`` then ``run``. ``run`` launches only (it is captured in CUDA graphs, which would fail
on a sync); this file holds ``plan`` and ``write_tokens`` to no sync at all, so the step's only sync outside
sealing is the backend's check whether any page needs sealing.

On CPU a probe counts the torch calls that synchronize on a CUDA tensor (``.item()``, ``.tolist()``, ``bool()`` of
a tensor, ``nonzero``, boolean-mask indexing, ``repeat_interleave`` without a size, ...); on CUDA the test also runs
the whole step, ``run`` included, under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any sync.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode

from diffkv_sglang.attention import DecodeAttentionWrapper
from diffkv_sglang.backend_select import KERNELS_ENV
from diffkv_sglang.config import DiffKVConfig
from kernel_stores import PRUNING, build

# torch functions that copy a device value to the host, or size an output by device data
_SYNCING = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere", "unique",
            "unique_consecutive", "masked_select", "cpu", "numpy", "equal", "allclose"}


class HostSyncProbe(TorchFunctionMode):
    """Records the torch calls inside it that would make the host wait for a CUDA device."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        boolean_index = name in ("__getitem__", "__setitem__") and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in _flatten(args[1:2]))
        to_host = name == "to" and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu" and any(
            str(a) == "cpu" for a in (*args[1:], *kwargs.values()))
        sized_by_data = name == "repeat_interleave" and kwargs.get("output_size") is None
        if name in _SYNCING or boolean_index or to_host or sized_by_data:
            self.calls.append(name)
        return func(*args, **kwargs)


def _flatten(items):
    for item in items:
        if isinstance(item, (tuple, list)):
            yield from _flatten(item)
        else:
            yield item


def test_the_probe_sees_syncs():
    x = torch.arange(6)
    with HostSyncProbe() as probe:
        bool(x.any()), x[x > 2], x.tolist(), torch.repeat_interleave(x, x)
        x[torch.tensor([1, 2])] = 0                              # an integer index: no sync
        x.to("cpu")                                              # already there: no sync
    assert probe.calls == ["__bool__", "__getitem__", "tolist", "repeat_interleave"]


@pytest.mark.triton
def test_decode_plan_and_writes_never_sync(monkeypatch, seeded):
    config = DiffKVConfig.from_dict({"page_size": 16, "window": 32, **PRUNING})
    heads, gqa, dim, layers = 2, 2, 32, 2
    cpu_store, table, lens = build(config, heads, dim, [70, 33, 150], layers=layers, staged_pages=2)
    monkeypatch.setenv(KERNELS_ENV, "triton")                  # the copy runs the kernels (natively on CUDA)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    store, table, lens = cpu_store.to(device), table.to(device), lens.to(device)
    assert store.kernels
    wrapper = DecodeAttentionWrapper(store, heads * gqa, max_staged_pages=config.window // config.page_size + 2)
    wrapper.plan(table, lens, check=False)                     # the first plan builds the kernel plan's buffers
    positions = lens - 1
    locs = table[torch.arange(len(lens), device=device), positions // 16] * 16 + positions % 16
    k, v, q = (torch.randn(layers, len(lens), h, dim, device=device) for h in (heads, heads, heads * gqa))
    out = torch.empty_like(q)

    def step(run: bool):
        wrapper.plan(table, lens, check=False)
        for layer in range(layers):
            store.write_tokens(layer, locs, k[layer], v[layer])
            if run:
                wrapper.run(q[layer], layer, out=out[layer])

    with HostSyncProbe() as probe:
        step(run=False)
    assert probe.calls == []
    if device == "cuda":
        step(run=True)                                         # compile outside the sync check
        torch.cuda.synchronize()
        with _cuda_sync_errors():
            step(run=True)
        torch.cuda.synchronize()


@contextlib.contextmanager
def _cuda_sync_errors():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
