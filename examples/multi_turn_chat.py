"""Multi-turn chat against a DiffKV server through the OpenAI-compatible API, showing prefix reuse and KV bytes.

Four turns of one conversation; the first user message carries a ~600-token essay, and each later question
builds on the earlier answers. Every turn resends the whole conversation, so SGLang's radix tree should serve
the earlier turns from the cache (over DiffKV's compressed pages). After each turn the script prints the
prompt / cached / completion tokens from the API's usage record, the reply (shortened), and the KV memory the
server reports on ``/metrics`` (``sglang:diffkv_*`` gauges): arena bytes used, what the held tokens would cost
as bf16, bytes saved, the compression ratio and the tier shares.

Start a server first (``--enable-cache-report`` makes the API report cached tokens; ``--enable-metrics``
exports the gauges):

    python -m sglang.launch_server --model-path M --kv-pool diffkv --enable-metrics --enable-cache-report
    python examples/multi_turn_chat.py --base-url http://127.0.0.1:30000
    python examples/multi_turn_chat.py --base-url http://127.0.0.1:30000 --kv-only   # the KV memory lines only

(On a CPU-only machine, see ``scripts/main_job.sh`` for the extra server flags; ``make demo`` does it all.)
Against a server without the DiffKV pool or without ``--enable-metrics`` the chat still runs and the memory
lines say why they are missing.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request

ESSAY = """\
How to Keep What Matters

When people talk about memory they usually mean capacity: how much can you hold? But the more interesting
question is what you choose to keep. A mind that remembered everything equally would be nearly useless. It
would spend as much effort recalling the color of a stranger's shoes as the name of a friend. The skill is not
storing things; it is deciding, quickly and mostly correctly, what deserves to be stored well.

Startups face the same problem with attention. A founder in the first year gets a hundred inputs a day: user
complaints, investor advice, bugs, ideas from friends, articles about competitors. Most of it is noise. Some
of it is important but can be handled roughly, the way you remember a meeting as "it went fine." A small
fraction changes everything, and that fraction has to be kept in full detail. The founders who do well are
not the ones who process the most information. They are the ones who notice which few things are being
looked at again and again, and keep those sharp while letting the rest blur.

There is a useful trick here. You rarely know in advance what will matter, but you can watch what keeps
coming back. If a customer mentions the same annoyance in three different conversations, that annoyance is
telling you something. If an idea you had in March keeps resurfacing in June, it is probably not a passing
thought. Importance reveals itself through repeated attention. So instead of trying to judge each input the
moment it arrives, you can let things sit for a while and then ask: which of these have I actually returned to?

This suggests three tiers rather than two. The things you return to constantly deserve to be kept precisely.
The things you glance at occasionally can be kept in compressed form: the gist, not the transcript. And the
things you never look at again can be dropped entirely, and you will not miss them. Most people only have
the first and last tiers. They either try to remember everything precisely, which exhausts them, or they
forget things they later need. The middle tier is where most of the savings are.

The interesting part is that the middle tier is cheap but not free. A compressed memory is still a memory.
If you compress too aggressively you lose the detail that would have let you notice a pattern later. So the
thresholds matter. You want to be generous about what you keep at full fidelity when you are uncertain, and
ruthless only about things you are confident nobody will look at again.

Finally, the decision has to be fast. A policy for what to remember that takes longer than remembering
everything is not a policy, it is a hobby. The best systems, human or otherwise, make the choice once, at the
moment something moves from recent to old, and then never revisit it. Recent things stay vivid because you
are still using them. Older things settle into whatever form they earned while they were recent."""

QUESTIONS = [
    "Here is a short essay.\n\n{essay}\n\nIn one sentence: what is the essay's main claim?",
    "How many tiers does the essay propose, and what goes in each?",
    "Which of those tiers does the essay say holds most of the savings, and what risk comes with it?",
    "Using your previous answers, give one concrete piece of advice for a startup founder.",
]


# ---------------------------------------------------------------------------------------- metrics
def read_diffkv_gauges(base_url: str) -> tuple[dict[str, float] | None, str]:
    """The ``sglang:diffkv_*`` gauges summed over TP ranks (tier gauges keyed ``tier_tokens:<t>``), or None
    and the reason they are unavailable."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=30) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as e:
        return None, f"/metrics answered HTTP {e.code} (start the server with --enable-metrics)"
    except (urllib.error.URLError, OSError) as e:
        return None, f"/metrics unreachable: {e}"
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("sglang:diffkv_"):
            continue
        key, _, value = line.rpartition(" ")
        name, _, labels = key[len("sglang:diffkv_"):].partition("{")
        if name == "tier_tokens":
            tier = next((part.split("=")[1].strip('"') for part in labels.rstrip("}").split(",")
                         if part.startswith("tier=")), "?")
            name = f"tier_tokens:{tier}"
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    if not out:
        return None, ("no sglang:diffkv_* gauges on /metrics: this server is not running the DiffKV pool "
                      "(start it with --kv-pool diffkv --enable-metrics)")
    return out, ""


def settled_gauges(base_url: str, interval_s: float = 0.5, tries: int = 6) -> tuple[dict[str, float] | None, str]:
    """The gauges once two reads ``interval_s`` apart agree: the server sends a reply before it has released the
    finished request's last pages, and the pool refreshes its gauges at most every 0.25 s."""
    previous, why = read_diffkv_gauges(base_url)
    for _ in range(tries):
        if previous is None:
            break
        time.sleep(interval_s)
        current, why = read_diffkv_gauges(base_url)
        if current == previous:
            break
        previous = current
    return previous, why


def mib(n: float) -> str:
    return f"{n / (1 << 20):.2f} MiB"


def format_memory(g: dict[str, float]) -> list[str]:
    used, dense = g.get("used_bytes", 0.0), g.get("dense_equivalent_bytes", 0.0)
    tiers = sorted((k for k in g if k.startswith("tier_tokens:")), key=lambda k: k.split(":")[1])
    entries = sum(g[k] for k in tiers) + g.get("pruned_tokens", 0.0)
    if entries:
        shares = ", ".join(f"tier{k.split(':')[1]} {g[k] / entries:.0%}" for k in tiers)
        shares += f", pruned {g.get('pruned_tokens', 0.0) / entries:.0%}"
    else:
        shares = "none sealed yet"
    return [
        f"  KV arena   : {mib(used)} used of {mib(g.get('arena_bytes', 0.0))} "
        f"({int(g.get('staged_pages', 0))} staged + {int(g.get('sealed_pages', 0))} sealed pages)",
        f"  as bf16    : {mib(dense)} for the held tokens -> saved {mib(max(dense - used, 0.0))}, "
        f"compression {g.get('compression_ratio', 0.0):.2f}x "
        f"(sealed pages {g.get('sealed_compression_ratio', 0.0):.2f}x)",
        f"  tier shares: {shares} (sealed (token, layer, head) entries)",
    ]


# ------------------------------------------------------------------------------------------- chat
def shorten(text: str, width: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:30000", help="server root (without /v1)")
    parser.add_argument("--max-tokens", type=int, default=48, help="completion tokens per turn")
    parser.add_argument("--kv-only", action="store_true",
                        help="print the server's KV memory lines now (or why they are unavailable) and exit")
    args = parser.parse_args(argv)
    base_url = args.base_url.rstrip("/")
    if args.kv_only:
        gauges, why = read_diffkv_gauges(base_url)
        print("\n".join(line.strip() for line in format_memory(gauges)) if gauges is not None else why)
        return 0

    from openai import APIConnectionError, OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="none", timeout=600.0)
    try:
        model = client.models.list().data[0].id
    except APIConnectionError as e:
        print(f"multi_turn_chat: cannot reach {base_url}: {e}", file=sys.stderr)
        return 1

    gauges, why = read_diffkv_gauges(base_url)
    print(f"server {base_url}, model {model}")
    diffkv = gauges is not None
    if not diffkv:
        print(f"note: {why}; KV memory lines will be skipped")

    messages: list[dict[str, str]] = []
    totals = {"prompt": 0, "cached": 0}
    cached_missing = False
    for turn, question in enumerate(QUESTIONS, 1):
        messages.append({"role": "user", "content": question.format(essay=ESSAY)})
        t0 = time.monotonic()
        response = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                  max_tokens=args.max_tokens)
        elapsed = time.monotonic() - t0
        reply = response.choices[0].message.content or ""
        messages.append({"role": "assistant", "content": reply})
        usage = response.usage
        details = getattr(usage, "prompt_tokens_details", None)
        cached = getattr(details, "cached_tokens", None) if details is not None else None
        if cached is None:
            cached_missing = True
        totals["prompt"] += usage.prompt_tokens
        totals["cached"] += cached or 0

        print(f"\n--- turn {turn} ({elapsed:.1f} s) " + "-" * 60)
        print(f"  user       : {shorten(question.format(essay='<essay>'), 120)}")
        print(f"  tokens     : prompt {usage.prompt_tokens}, cached {cached if cached is not None else 'n/a'}, "
              f"completion {usage.completion_tokens}")
        print(f"  reply      : {shorten(reply)}")
        if diffkv:
            gauges, why = settled_gauges(base_url)
            print("\n".join(format_memory(gauges)) if gauges is not None else f"  KV memory  : unavailable ({why})")

    print("\n=== summary " + "=" * 66)
    share = totals["cached"] / totals["prompt"] if totals["prompt"] else 0.0
    print(f"prompt tokens over {len(QUESTIONS)} turns: {totals['prompt']}, served from the prefix cache: "
          f"{totals['cached']} ({share:.0%})")
    if cached_missing:
        print("note: the server did not report cached tokens (start it with --enable-cache-report)")
    if diffkv and gauges is not None:
        used, dense = gauges.get("used_bytes", 0.0), gauges.get("dense_equivalent_bytes", 0.0)
        print(f"KV held now: {mib(used)} in the DiffKV arena vs {mib(dense)} as bf16 "
              f"({gauges.get('compression_ratio', 0.0):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
