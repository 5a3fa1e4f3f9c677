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

from sglang_server import SGLangServer, cpu_env, run_cli      # tests/e2e_support, put on sys.path by conftest
from tiny_model import build_tiny_llama

pytestmark = pytest.mark.server

PAGE, WINDOW = 16, 16
DIFFKV = ["--kv-pool", "diffkv", "--diffkv-page-size", str(PAGE), "--diffkv-window", str(WINDOW),
          "--enable-metrics", "--enable-cache-report"]
STORY = ("Once upon a time there was a small language model that lived on a CPU. The quick brown fox jumps over "
         "the lazy dog. Keys and values are stored in a paged cache; some tokens matter more than others. ")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(tiny_model):
    with SGLangServer(tiny_model, DIFFKV, max_total_tokens=4096) as running:
        yield running
        assert not running.unexpected_errors(), running.unexpected_errors()


def generate(server, text, max_new_tokens=24, **sampling):
    params = {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True, **sampling}
    return server.post("/generate", {"text": text, "sampling_params": params})


def gauge(server, name):
    values = [v for k, v in server.metrics().items() if k.startswith(f"sglang:diffkv_{name}")]
    assert values, f"gauge sglang:diffkv_{name} missing"
    return sum(values)


def test_generate_and_sealing(server):
    out = generate(server, STORY * 3, max_new_tokens=40)
    assert out["meta_info"]["completion_tokens"] == 40 and out["meta_info"]["prompt_tokens"] > 100
    generate(server, "x", max_new_tokens=2)                       # next forward refreshes the gauges
    assert gauge(server, "sealed_pages") > 0                      # prompt pages left the window and were sealed
    assert gauge(server, "compression_ratio") > 1.0
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
    assert "Cache flushed" in server.post_text("/flush_cache")
    padding_page = gauge(server, "used_bytes")
    assert gauge(server, "sealed_pages") == 0 and gauge(server, "staged_pages") == 1     # only the padding page
    assert padding_page > 0


def test_memory_pressure_evicts_and_retracts(tiny_model):
    """A pool far too small for the load: requests must wait, evict the tree or be retracted, yet all finish with
    the requested length, and the arena is empty again after a flush."""
    args = [*DIFFKV, "--diffkv-window", "32"]
    with SGLangServer(tiny_model, args, max_total_tokens=768) as small:
        prompts = [f"{STORY} {i}" * 3 for i in range(10)]
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            outs = list(pool.map(lambda p: generate(small, p, max_new_tokens=120), prompts))
        assert [o["meta_info"]["completion_tokens"] for o in outs] == [120] * 10
        log = small.log_text()
        assert not small.unexpected_errors(), small.unexpected_errors()
        assert "Cache flushed" in small.post_text("/flush_cache")
        assert gauge(small, "sealed_pages") == 0 and gauge(small, "staged_pages") == 1
        print("retractions:", log.count("retract"), "| evictions seen in log:", log.count("evict"))


def test_engine_offline(tiny_model):
    script = textwrap.dedent(f"""
        import sglang
        if __name__ == "__main__":
            engine = sglang.Engine(model_path="{tiny_model}", kv_pool="diffkv", diffkv_window=16,
                                   diffkv_page_size=16, device="cpu", sampling_backend="pytorch",
                                   max_total_tokens=2048, skip_server_warmup=True, disable_overlap_schedule=True,
                                   log_level="warning")
            outs = engine.generate([{STORY!r} * 2, "Hello"], {{"max_new_tokens": 12, "temperature": 0,
                                                                "ignore_eos": True}})
            engine.shutdown()
            print("LENGTHS", [o["meta_info"]["completion_tokens"] for o in outs])
    """)
    done = subprocess.run([sys.executable, "-c", script], env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LENGTHS [12, 12]" in done.stdout


# One case per stage that can reject a launch (argparse, DiffKV config, SGLang resolution); every flag's
# message is unit-tested in test_integration_args.py without starting processes.
@pytest.mark.parametrize("args, message", [
    (["--kv-pool", "compressed"], "--kv-pool"),
    (["--kv-pool", "diffkv", "--diffkv-alpha-low", "-1"], "--diffkv-alpha-low"),
    (["--kv-pool", "diffkv", "--kv-cache-dtype", "fp8_e4m3"], "--kv-cache-dtype fp8_e4m3 is not supported"),
])
def test_bad_flags_fail_at_start_up(tiny_model, args, message):
    done = run_cli(["--model-path", str(tiny_model), "--device", "cpu", "--port", "1", *args], timeout=300)
    assert done.returncode != 0
    assert message in done.stderr + done.stdout, (done.stderr + done.stdout)[-2000:]


def test_tensor_parallel_each_rank_holds_its_heads(tiny_model):
    """--tp-size 2 splits the 2 KV heads across ranks (one each); greedy output equals --tp-size 1.
    float32 weights keep the two all-reduce orders from flipping near-tie argmaxes of the random model."""
    prompts = [STORY * 3, STORY + "Hello there", "The quick brown fox " * 9]
    outputs, logs = {}, {}
    for tp in (1, 2):
        env = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"} if tp == 2 else None
        with SGLangServer(tiny_model, [*DIFFKV, "--tp-size", str(tp), "--dtype", "float32"], env=env) as running:
            outputs[tp] = [generate(running, p, max_new_tokens=32)["output_ids"] for p in prompts]
            generate(running, "x", max_new_tokens=2)
            assert gauge(running, "sealed_pages") > 0
            logs[tp] = running.log_text()
            assert not running.unexpected_errors(), running.unexpected_errors()
    for rank in (0, 1):
        assert f"DiffKV pool ready on tp rank {rank}: 4 layers x 1 KV heads" in logs[2]
    assert outputs[1] == outputs[2]
