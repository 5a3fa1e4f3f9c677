"""End to end with the real SGLang 0.5.23 server on CPU and ``--kv-pool diffkv`` (a tiny random Llama).

Run alone with ``pytest -m server``. Each module-scoped server takes ~20 s to start on 2 cores.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess
import sys
import textwrap
import urllib.request

import pytest

from diffkv_devtools.e2e_common import DIFFKV, STORY, generate
from diffkv_devtools.gauges import gauge
from diffkv_devtools.sglang_server import SGLangServer, cpu_env

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tiny_model):
    with SGLangServer(tiny_model, DIFFKV, max_total_tokens=4096) as running:
        yield running
        assert not running.unexpected_errors(), running.unexpected_errors()


def test_generate_and_sealing(server):
    out = generate(server, STORY * 3, max_new_tokens=40)
    assert out["meta_info"]["completion_tokens"] == 40 and out["meta_info"]["prompt_tokens"] > 100
    generate(server, "x", max_new_tokens=2)                       # next forward refreshes the gauges
    assert gauge(server, "sealed_pages") > 0                      # prompt pages left the window and were sealed
    assert gauge(server, "compression_ratio") > 1.0
    assert gauge(server, "compaction_seconds") >= 0.0 and gauge(server, "compactions") >= 0
    assert "DiffKV pool ready on tp rank 0: 4 layers x 2 KV heads" in server.log_text()


def test_chat_completions_plain_and_streaming(server):
    body = {"model": "default", "messages": [{"role": "user", "content": STORY}], "max_tokens": 16,
            "temperature": 0}
    reply = server.post("/v1/chat/completions", body)
    assert reply["choices"][0]["message"]["content"] is not None
    assert reply["usage"]["completion_tokens"] > 0
    request = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    chunks = []
    with urllib.request.urlopen(request, timeout=600) as stream:
        for line in stream:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert len(chunks) > 2 and text == reply["choices"][0]["message"]["content"]


def test_multi_turn_reuses_compressed_prefix(server):
    messages = [{"role": "user", "content": STORY * 4 + "What lives on a CPU?"}]
    cached = []
    for turn in range(3):
        reply = server.post("/v1/chat/completions", {"model": "default", "messages": messages, "max_tokens": 24,
                                                     "temperature": 0})
        cached.append(reply["usage"]["prompt_tokens_details"]["cached_tokens"])
        messages += [{"role": "assistant", "content": reply["choices"][0]["message"]["content"]},
                     {"role": "user", "content": f"And then, part {turn}?"}]
    print("cached tokens per turn:", cached)
    assert cached[1] > 100 and cached[2] > cached[1]


def test_eight_concurrent_requests(server):
    prompts = [f"{STORY} Request number {i}: " * (1 + i % 3) for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda p: generate(server, p, max_new_tokens=20), prompts))
    assert [o["meta_info"]["completion_tokens"] for o in outs] == [20] * 8


def test_frontend_fork_shares_prefix(server):
    script = textwrap.dedent(f"""
        import sglang as sgl
        @sgl.function
        def branches(s):
            s += {STORY * 2!r}
            forks = s.fork(2)
            for i, f in enumerate(forks):
                f += " Branch " + str(i) + ":" + sgl.gen("out", max_tokens=12, temperature=0)
            s["outs"] = [f["out"] for f in forks]
            s["cached"] = [f.get_meta_info("out")["cached_tokens"] for f in forks]
        sgl.set_default_backend(sgl.RuntimeEndpoint("{server.url}"))
        state = branches.run()
        print("CACHED", state["cached"])
        assert all(len(o) > 0 for o in state["outs"])
    """)
    done = subprocess.run([sys.executable, "-c", script], env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cached = json.loads(re.search(r"CACHED (\[.*\])", done.stdout).group(1))
    assert min(cached) > 32, cached                       # the shared prefix came from the radix cache


def test_flush_returns_every_byte(server):
    generate(server, STORY * 2, max_new_tokens=8)
    assert "Cache flushed" in server.post_text("/flush_cache?timeout=30")
    padding_page = gauge(server, "used_bytes")
    assert gauge(server, "sealed_pages") == 0 and gauge(server, "staged_pages") == 1     # only the padding page
    assert padding_page > 0
