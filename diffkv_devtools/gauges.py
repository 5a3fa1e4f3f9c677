"""The DiffKV pool's ``sglang:diffkv_*`` gauges from a server's ``/metrics`` (needs ``--enable-metrics``).

Names are the gauge names without the prefix (``used_bytes``, ``sealed_pages``, ...), each summed over its label
sets (TP ranks); the per-tier gauge is split by its ``tier`` label into ``tier_tokens:<tier>``. The gauges and
their meaning: ``diffkv_sglang/integration/metrics.py``. (``examples/multi_turn_chat.py`` has its own copy of the
reader, so that the example runs with nothing but the plugin installed.)
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request

PREFIX = "sglang:diffkv_"


def parse(text: str) -> dict[str, float]:
    """The gauges of a ``/metrics`` text, summed over label sets (``tier_tokens`` keyed ``tier_tokens:<t>``)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(PREFIX):
            continue
        key, _, value = line.rpartition(" ")
        name, _, labels = key[len(PREFIX):].partition("{")
        if name == "tier_tokens":
            tier = next((part.split("=")[1].strip('"') for part in labels.rstrip("}").split(",")
                         if part.startswith("tier=")), "?")
            name = f"tier_tokens:{tier}"
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


def read(base_url: str, timeout: float = 30.0) -> tuple[dict[str, float] | None, str]:
    """The gauges of the server at ``base_url``, or None and the reason they are unavailable."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=timeout) as answer:
            text = answer.read().decode()
    except urllib.error.HTTPError as error:
        return None, f"/metrics answered HTTP {error.code} (start the server with --enable-metrics)"
    except (urllib.error.URLError, OSError) as error:
        return None, f"/metrics unreachable: {error}"
    gauges = parse(text)
    if not gauges:
        return None, ("no sglang:diffkv_* gauges on /metrics: this server is not running the DiffKV pool "
                      "(start it with --kv-pool diffkv --enable-metrics)")
    return gauges, ""


def settled(base_url: str, interval_s: float = 0.5, tries: int = 6) -> tuple[dict[str, float] | None, str]:
    """The gauges once two reads ``interval_s`` apart agree: the server sends a reply before it has released the
    finished request's last pages, and the pool refreshes its gauges at most every 0.25 s."""
    previous, why = read(base_url)
    for _ in range(tries):
        if previous is None:
            break
        time.sleep(interval_s)
        current, why = read(base_url)
        if current == previous:
            break
        previous = current
    return previous, why


def gauge(server, name: str) -> float:
    """One gauge of a running test server (anything with a ``url``, e.g. ``SGLangServer``), summed over TP ranks;
    fails when the server does not export it."""
    gauges, why = read(server.url)
    assert gauges is not None, why
    assert name in gauges, f"gauge {PREFIX}{name} missing (have {sorted(gauges)})"
    return gauges[name]
