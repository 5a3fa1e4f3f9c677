"""DiffKV pool metrics: a periodic log line and, with ``--enable-metrics``, Prometheus gauges.

Gauges (labelled by ``tp_rank``), exported on SGLang's ``/metrics`` endpoint:

=====================================  ==========================================================
``sglang:diffkv_arena_bytes``          arena capacity
``sglang:diffkv_used_bytes``           bytes held by blocks (staged + sealed)
``sglang:diffkv_free_bytes``           capacity - used
``sglang:diffkv_staged_pages``         pages held dense (recent window, prompts in flight)
``sglang:diffkv_sealed_pages``         pages held compressed
``sglang:diffkv_tier_tokens``          (token, layer, head) entries per tier (label ``tier``)
``sglang:diffkv_pruned_tokens``        pruned (token, layer, head) entries of sealed pages
``sglang:diffkv_dense_equivalent_bytes``  what the held tokens would cost as bf16 K/V
``sglang:diffkv_compression_ratio``    bf16 bytes of the held tokens / every byte they use
``sglang:diffkv_sealed_compression_ratio``  the same over sealed pages only
``sglang:diffkv_compactions``          compaction steps so far
``sglang:diffkv_compacted_bytes``      bytes moved by compaction so far
``sglang:diffkv_compaction_seconds``   wall seconds spent compacting so far (its share of serving time)
=====================================  ==========================================================
"""

from __future__ import annotations

import logging
import time

from ..store import CompressedKVStore, StoreStats
from . import upstream

logger = logging.getLogger(__name__)

LOG_INTERVAL_S = 30.0
GAUGE_INTERVAL_S = 0.25


def format_stats(stats: StoreStats) -> str:
    """One human-readable line."""
    mib = 1 << 20
    entries = sum(stats.tokens_per_tier) + stats.pruned_tokens
    shares = ", ".join(f"tier{t} {n / entries:.0%}" for t, n in enumerate(stats.tokens_per_tier)) if entries else "-"
    pruned = f", pruned {stats.pruned_tokens / entries:.0%}" if entries else ""
    return (f"DiffKV pool: {stats.used_bytes / mib:.1f}/{stats.capacity_bytes / mib:.1f} MiB used, "
            f"{stats.staged_pages} staged + {stats.sealed_pages} sealed pages, sealed entries {shares}{pruned}, "
            f"compression {stats.compression_ratio:.2f}x (sealed {stats.sealed_compression_ratio:.2f}x) vs bf16, "
            f"{stats.compactions} compactions ({stats.compacted_bytes / mib:.1f} MiB, {stats.compaction_seconds:.3f} s)")


class StoreReporter:
    """Logs the store's stats every ``LOG_INTERVAL_S`` and refreshes Prometheus gauges at most every
    ``GAUGE_INTERVAL_S`` (``refresh()`` forces it, e.g. after the pool is cleared)."""

    def __init__(self, store: CompressedKVStore, tp_rank: int = 0):
        self.store = store
        self.tp_rank = str(tp_rank)
        self._last_log = time.monotonic()
        self._last_gauge = 0.0
        self._gauges = self._make_gauges() if upstream.get_observability().enable_metrics else None
        logger.info("DiffKV pool ready on tp rank %s: %d layers x %d KV heads x head_dim %d, %s", self.tp_rank,
                    store.num_layers, store.num_kv_heads, store.head_dim, format_stats(store.stats()))

    def _make_gauges(self):
        from prometheus_client import Gauge

        def gauge(name, doc, labels=("tp_rank",)):
            return Gauge(f"sglang:diffkv_{name}", doc, labelnames=labels, multiprocess_mode="mostrecent")

        return {
            "arena_bytes": gauge("arena_bytes", "DiffKV arena capacity in bytes"),
            "used_bytes": gauge("used_bytes", "DiffKV arena bytes held by blocks"),
            "free_bytes": gauge("free_bytes", "DiffKV arena bytes free"),
            "staged_pages": gauge("staged_pages", "DiffKV pages held dense"),
            "sealed_pages": gauge("sealed_pages", "DiffKV pages held compressed"),
            "tier_tokens": gauge("tier_tokens", "DiffKV sealed (token, layer, head) entries per tier", ("tp_rank", "tier")),
            "pruned_tokens": gauge("pruned_tokens", "DiffKV pruned (token, layer, head) entries"),
            "dense_equivalent_bytes": gauge("dense_equivalent_bytes", "bf16 K/V bytes of the held tokens"),
            "compression_ratio": gauge("compression_ratio", "bf16 bytes of held tokens / bytes they use"),
            "sealed_compression_ratio": gauge("sealed_compression_ratio", "the same over sealed pages"),
            "compactions": gauge("compactions", "DiffKV compaction steps"),
            "compacted_bytes": gauge("compacted_bytes", "bytes moved by DiffKV compaction"),
            "compaction_seconds": gauge("compaction_seconds", "wall seconds spent in DiffKV compaction"),
        }

    def refresh(self) -> None:
        """Update the gauges now."""
        self.maybe_report(force=True)

    def maybe_report(self, force: bool = False) -> None:
        """Cheap unless an interval has passed (then one host sync for the stats)."""
        now = time.monotonic()
        log_due = now - self._last_log >= LOG_INTERVAL_S
        gauge_due = self._gauges is not None and (force or now - self._last_gauge >= GAUGE_INTERVAL_S)
        if not (log_due or gauge_due):
            return
        stats = self.store.stats()
        if log_due:
            self._last_log = now
            logger.info(format_stats(stats))
        if gauge_due:
            self._last_gauge = now
            self._set_gauges(stats)

    def _set_gauges(self, stats: StoreStats) -> None:
        g, rank = self._gauges, self.tp_rank
        g["arena_bytes"].labels(rank).set(stats.capacity_bytes)
        g["used_bytes"].labels(rank).set(stats.used_bytes)
        g["free_bytes"].labels(rank).set(stats.free_bytes)
        g["staged_pages"].labels(rank).set(stats.staged_pages)
        g["sealed_pages"].labels(rank).set(stats.sealed_pages)
        for tier, count in enumerate(stats.tokens_per_tier):
            g["tier_tokens"].labels(rank, str(tier)).set(count)
        g["pruned_tokens"].labels(rank).set(stats.pruned_tokens)
        g["dense_equivalent_bytes"].labels(rank).set(stats.dense_equivalent_bytes)
        g["compression_ratio"].labels(rank).set(stats.compression_ratio)
        g["sealed_compression_ratio"].labels(rank).set(stats.sealed_compression_ratio)
        g["compactions"].labels(rank).set(stats.compactions)
        g["compacted_bytes"].labels(rank).set(stats.compacted_bytes)
        g["compaction_seconds"].labels(rank).set(stats.compaction_seconds)

