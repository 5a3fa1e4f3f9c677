"""Physical compression of the DiffKV block format against bf16, measured from a real store (CPU, seconds).

For each head_dim and tier mix, the script stages pages, writes random K/V, gives each token an importance
that lands it in the wanted tier (or pruned), seals, and divides the bf16 bytes of those tokens by every byte
the store then uses for them: block bytes (codes, per-group scale/zero, token indices, per-block meta scale,
padding) plus the descriptor-table rows. Writes ``benchmarks/results/format.json``.

    python benchmarks/format_ratio.py [--tiers k8v4,k4v2] [--out benchmarks/results/format.json]

``--tiers`` takes the two tiers (high, low) as ``--diffkv-tiers`` does, e.g. ``k8v4,k4v2+kc`` for per-channel keys in
the low tier (``benchmarks/results/format-kc.json``).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from diffkv_sglang.config import build_config
from diffkv_sglang.store import CompressedKVStore

PAGES, LAYERS, HEADS, CONTEXT = 32, 2, 2, 1000
# relative importance that lands a token in the high tier, the low tier, or pruned (thresholds 1.0 / 0.02: DiffKV's
# alpha_low, so that the mixes can prune; the shipped default turns pruning off)
R_HIGH, R_LOW, R_PRUNED = 5.0, 0.5, 0.001
MIXES = {
    "all_high": (1.0, 0.0, 0.0),
    "all_low": (0.0, 1.0, 0.0),
    "diffkv_typical": (0.3, 0.5, 0.2),
    "low_heavy": (0.1, 0.7, 0.2),
    "heavy_pruning": (0.1, 0.4, 0.5),
}


def measure(head_dim: int, mix: tuple[float, float, float], config: DiffKVConfig) -> dict:
    """Seal PAGES pages with the given (high, low, pruned) token shares; return measured bytes per token."""
    page = config.page_size
    store = CompressedKVStore(config, num_layers=LAYERS, num_kv_heads=HEADS, head_dim=head_dim,
                              num_pages=PAGES + 1, arena_bytes=1 << 26, dtype=torch.bfloat16)
    pages = torch.arange(1, PAGES + 1)
    store.stage(pages)
    locs = (pages[:, None] * page + torch.arange(page)).reshape(-1)
    n = locs.numel()
    bounds = torch.tensor([mix[0], mix[0] + mix[1]]) * n
    rank = torch.randperm(n)
    r = torch.where(rank < bounds[0], R_HIGH, torch.where(rank < bounds[1], R_LOW, R_PRUNED))
    for layer in range(LAYERS):
        kv = torch.randn(2, n, HEADS, head_dim)
        store.write_tokens(layer, locs, kv[0], kv[1])
        store.add_importance(layer, locs, (r / CONTEXT)[:, None].expand(n, HEADS), torch.ones(n))
    store.seal(pages, torch.full((PAGES,), CONTEXT))
    stats = store.stats()
    entries = n * LAYERS * HEADS                        # (token, layer, head) entries
    physical = stats.sealed_bytes + stats.descriptor_bytes
    return {
        "physical_bytes_per_token_per_head": physical / entries,
        "bf16_bytes_per_token_per_head": head_dim * 2 * 2,
        "ratio_vs_bf16": stats.sealed_compression_ratio,
        "measured_shares": {
            "high": stats.tokens_per_tier[0] / entries, "low": stats.tokens_per_tier[1] / entries,
            "pruned": stats.pruned_tokens / entries},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiers", default="k8v4,k4v2", help="high and low tier, comma-separated (default: k8v4,k4v2)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "format.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    config = build_config(None, {"tiers": args.tiers, "alpha_low": 0.02})
    if config.num_tiers != 2:
        parser.error(f"argument --tiers: invalid value {args.tiers!r}; allowed: two tiers, high then low")
    results: dict = {"config": config.to_dict(), "head_dim": {}}
    print(f"{'head_dim':>8} {'mix':>15} {'B/token/head':>13} {'bf16':>6} {'ratio':>6}")
    for head_dim in (64, 128):
        per_dim = {"mixes": {}}
        for name, mix in MIXES.items():
            row = measure(head_dim, mix, config)
            per_dim["mixes"][name] = row
            print(f"{head_dim:>8} {name:>15} {row['physical_bytes_per_token_per_head']:>13.2f} "
                  f"{row['bf16_bytes_per_token_per_head']:>6} {row['ratio_vs_bf16']:>6.2f}")
        per_dim["bytes_per_token_high"] = per_dim["mixes"]["all_high"]["physical_bytes_per_token_per_head"]
        per_dim["bytes_per_token_low"] = per_dim["mixes"]["all_low"]["physical_bytes_per_token_per_head"]
        per_dim["bf16_bytes_per_token"] = head_dim * 2 * 2
        results["head_dim"][str(head_dim)] = per_dim
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
