"""The dense-read kernel (kernels/dense_read.py) against ``CompressedKVStore.read_pages``.

Fresh random stores built through the store's own API (tests/kernel_support/kernel_stores.py; pages sealed with
mixed tiers, a single tier or everything pruned, the last page of each request staged; with per-channel key
tiers, rebuilt until such a tier is empty, partial and full in some block), plus an EMPTY page; read on the test
device into outputs that ``torch.empty`` leaves with whatever bits were there. Without rotation the
kernel dequantizes exactly as the reference ((code * scale + zero) * meta scale in float32, no fused multiply-add)
and rounds to the output dtype the same way: equal bit for bit. With Hadamard rotation the kernel multiplies by the
matrix where the reference runs a butterfly: the two float32 sums of ``D`` terms ``+-x_j / sqrt(D)`` differ by at
most ``(D + log2 D) u sum_j |x_j| / sqrt(D) <= (D + log2 D) u ||y||_2`` (``u = 2^-24``; ``||x||_1 <= sqrt(D) ||x||_2``
and the rotation keeps the norm: ``||x||_2 = ||y||_2`` of the row), and a bfloat16 output may then round to a
neighbouring value (one ulp, at most ``2^-7 |ref|``). Staged slots past a
request's end hold arbitrary bits (NaN patterns too): only written tokens are compared by value, presence everywhere.
"""

import pytest
import torch

from diffkv_sglang.config import DiffKVConfig
from diffkv_sglang.kernels.dense_read import read_pages_dense
from diffkv_sglang.store import PageState
from kernel_stores import PRUNING, build

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("torch_reference")]

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

CONFIGS = {
    "default tiers": {},
    "3 tiers, groups": {"tiers": ["k8v4g2x1", "k4v2g2x4", "k2v2"], "thresholds": [2.0, 0.5]},
    "rotation, layer override": {"key_rotation": "hadamard", "value_rotation": "hadamard",
                                 "layer_tiers": {1: ["k4v2g2", "k2v2"]}},
    "per-channel keys": {"tiers": ["k8v4", "k4v2+kc"], "layer_tiers": {1: ["k8v4+kc", "k2v2+kc"]}},
    "3 tiers, per-channel keys, rotation": {"tiers": ["k8v4+kc", "k4v2g2x4", "k2v2+kc"], "thresholds": [2.0, 0.5],
                                            "key_rotation": "hadamard", "value_rotation": "hadamard"},
}
CHANNEL_CASES = {"empty", "partial", "full"}


def channel_cases(store) -> set[str]:
    """How full the per-channel key tiers of the store's non-empty sealed blocks are: "empty" (key meta section
    absent), "partial", "full" (the whole page)."""
    cases = set()
    sealed = store.page_state == PageState.SEALED
    for layer in range(store.num_layers):
        counts = store.tier_counts[sealed, layer]                                       # [n, H, T]
        channel = torch.tensor([tier.channel_keys for tier in store.formats[layer].tiers])
        counts = counts[counts.sum(-1) > 0][:, channel]
        hits = {"empty": counts == 0, "partial": (counts > 0) & (counts < store.page_size),
                "full": counts == store.page_size}
        cases |= {name for name, hit in hits.items() if hit.any()}
    return cases


def build_covering(config: DiffKVConfig, heads: int, dim: int, seq_lens: list[int], dtype: torch.dtype):
    """``build``, repeated (the tiers are random) until per-channel key tiers, if the config has any, are empty,
    partial and full in some sealed blocks."""
    tiers = [tier for layer in (config.tiers, *config.layer_tiers.values()) for tier in layer]
    channel = any(tier.key_mode == "channel" for tier in tiers)
    for _ in range(10):
        store, table, lens = build(config, heads, dim, seq_lens, dtype=dtype)
        if not channel or channel_cases(store) == CHANNEL_CASES:
            return store, table, lens
    raise AssertionError(f"no store with every per-channel tier case {CHANNEL_CASES} in 10 builds")


@pytest.mark.parametrize("out_dtype", ["model", "float32"])
@pytest.mark.parametrize("store_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_dense_read_matches_reference(name, store_dtype, out_dtype, seeded):
    page, heads, dim = (32, 4, 128) if CUDA else (16, 2, 32)
    config = DiffKVConfig.from_dict({"page_size": page, **PRUNING, **CONFIGS[name]})
    seq_lens = [40, 3 * page + 5, 1] if not CUDA else [700, 100, 1500, 1]
    store, table, lens = build_covering(config, heads, dim, seq_lens, store_dtype)
    pages = torch.cat([table.reshape(-1), torch.tensor([0])])            # padded table: page 0 is EMPTY
    assert store.page_state[0] == PageState.EMPTY
    assert (store.page_state[pages] == PageState.SEALED).any() and (store.page_state[pages] == PageState.STAGED).any()
    pos = torch.arange(table.shape[1])[:, None] * page + torch.arange(page)
    written = torch.cat([(pos[None] < lens[:, None, None]).reshape(-1, page), torch.zeros(1, page, dtype=torch.bool)])
    written = written[:, None, :, None].expand(-1, heads, -1, dim)
    dtype = store_dtype if out_dtype == "model" else torch.float32
    kernel_store = store.to(DEVICE)
    rotated = config.key_rotation == "hadamard"
    for layer in range(store.num_layers):
        ref_k, ref_v, ref_present = store.read_pages(layer, pages)
        got_k, got_v, got_present = read_pages_dense(kernel_store.view, layer, pages.to(DEVICE), dtype)
        assert got_k.dtype == dtype and torch.equal(got_present.cpu(), ref_present)
        for ref, got in ((ref_k, got_k), (ref_v, got_v)):
            ref, got = ref.to(dtype), got.cpu()
            if not rotated:
                assert torch.equal(got[written], ref[written]), layer
            else:
                err = (got.float() - ref.float())[written].abs()
                order = (dim + dim.bit_length()) * 2.0 ** -24 * ref.float().norm(dim=-1, keepdim=True)
                slack = order.expand_as(ref)[written]
                ulp = 2.0 ** -7 * ref.float()[written].abs() if dtype == torch.bfloat16 else 0.0
                assert torch.all(err <= ulp + slack), (layer, float((err - slack).max()))
            absent = ~ref_present[..., None].expand_as(ref)                 # pruned slots and the EMPTY page
            assert torch.all(got[absent] == 0)


def test_dense_read_checks_the_dtype(seeded):
    store, table, _ = build(DiffKVConfig.from_dict({"page_size": 16, **PRUNING}), 1, 32, [20], layers=1, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        read_pages_dense(store.to(DEVICE).view, 0, table[0].to(DEVICE), torch.float16)
