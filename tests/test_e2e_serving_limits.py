"""End to end with the real SGLang server on CPU, one server at a time: memory pressure, sglang.Engine,
tensor parallel, chunked prefill (a tiny random Llama). Run alone with ``pytest -m server``; the start-up
refusals are in test_startup_refusals.py.

Kept apart from test_e2e_server.py so that module's long-lived server is stopped before these start their own
(two SGLang schedulers busy-polling on 2 cores slow each other down several times).
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import textwrap

import pytest
from transformers import AutoTokenizer

from diffkv_devtools.e2e_common import DIFFKV, PAGE, STORY, generate
from diffkv_devtools.gauges import gauge
from diffkv_devtools.sglang_server import SGLangServer, cpu_env
from diffkv_devtools.teacher_forced import compare, greedy_continuation, score
from diffkv_sglang.config import DiffKVConfig

pytestmark = pytest.mark.server
# float32 weights and activations: summing in another order moves a log-probability by ~1e-6; the margin also
# absorbs a quantization code that such a difference pushes across a rounding boundary (one element, one step)
FLOAT32_ORDER_NATS = 1e-3


def _counter(server, name: str) -> float:
    """Sum of an SGLang Prometheus counter over its label sets (0 before its first increment)."""
    return sum(float(line.rpartition(" ")[2]) for line in server.get_text("/metrics").splitlines()
               if line.startswith(name + "{"))


def test_memory_pressure_evicts_and_never_crashes(tiny_model):
    """A pool far too small for the load (768 logical tokens for 2 x 10 requests of ~270 tokens, and SGLang told
    to over-admit): requests wait, the radix tree is evicted (and requests retracted when decode runs short), yet
    every request finishes with its full length, and the arena is empty again after a flush."""
    args = [*DIFFKV, "--diffkv-window", "32", "--schedule-conservativeness", "0.05"]
    with SGLangServer(tiny_model, args, max_total_tokens=768) as small:
        for wave in range(2):
            prompts = [f"{STORY} wave {wave} request {i}" * 3 for i in range(10)]
            with concurrent.futures.ThreadPoolExecutor(10) as pool:
                outs = list(pool.map(lambda p: generate(small, p, max_new_tokens=120), prompts))
            assert [o["meta_info"]["completion_tokens"] for o in outs] == [120] * 10
        assert not small.unexpected_errors(), small.unexpected_errors()
        evicted = _counter(small, "sglang:evicted_tokens_total")
        retracted = _counter(small, "sglang:num_retracted_requests_total")
        print(f"evicted tokens: {evicted:.0f}, retracted requests: {retracted:.0f}")
        assert evicted > 0
        assert "Cache flushed" in small.post_text("/flush_cache?timeout=30")
        assert gauge(small, "sealed_pages") == 0 and gauge(small, "staged_pages") == 1


def test_prompts_limited_by_arena_bytes_wait_and_never_crash(tiny_model):
    """The arena, not the logical capacity, runs out: 8192 logical slots planned at the compressed cost give an
    arena that stages only a few of these prompts dense at once (a prompt stays dense until its first decode step),
    while SGLang, counting tokens, would admit them all. The budget must admit only what the free bytes can stage
    (evicting tree pages for them), every request must finish, and a second wave must get through a radix tree
    full of the first wave's compressed pages (an estimate of what evicting them gives back admitted a prompt
    whose staging then failed: SGLang's 'Prefill out of memory' is fatal)."""
    args = [*DIFFKV, "--context-length", "512", "--schedule-conservativeness", "0.05"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    with SGLangServer(tiny_model, args, max_total_tokens=8192) as server:
        assert gauge(server, "staged_pages") == 1                  # the padding page: one staged page's bytes
        staged_page_bytes = gauge(server, "used_bytes")
        for wave in range(2):
            prompts = [(f"wave {wave} request {i}. " + STORY * 8)[:1800] for i in range(10)]
            lengths = [len(tokenizer(p).input_ids) for p in prompts]
            dense_need = sum(-(-(n + 40) // PAGE) for n in lengths) * staged_page_bytes
            assert max(lengths) + 40 <= 512 and dense_need > 2 * gauge(server, "arena_bytes"), (lengths, dense_need)
            with concurrent.futures.ThreadPoolExecutor(10) as pool:
                outs = list(pool.map(lambda p: generate(server, p, max_new_tokens=40), prompts))
            assert [o["meta_info"]["completion_tokens"] for o in outs] == [40] * 10
        assert not server.unexpected_errors(), server.unexpected_errors()
        assert "Cache flushed" in server.post_text("/flush_cache?timeout=30")
        assert gauge(server, "sealed_pages") == 0 and gauge(server, "staged_pages") == 1


def test_engine_offline(tiny_model, tmp_path):
    """``sglang.Engine`` with the DiffKV keywords and no precision chosen: the start-up calibration runs (its
    result lands in the cache directory given) and the engine generates with the calibrated pool."""
    cache = tmp_path / "calibration"
    script = textwrap.dedent(f"""
        import json
        import sglang
        if __name__ == "__main__":
            engine = sglang.Engine(model_path="{tiny_model}", kv_pool="diffkv", diffkv_window=16,
                                   diffkv_page_size=16, diffkv_calibration="{cache}", device="cpu",
                                   sampling_backend="pytorch",
                                   max_total_tokens=2048, skip_server_warmup=True, disable_overlap_schedule=True,
                                   log_level="warning")
            outs = engine.generate([{STORY!r} * 2, "Hello"], {{"max_new_tokens": 12, "temperature": 0,
                                                                "ignore_eos": True}})
            engine.shutdown()
            print("LENGTHS", [o["meta_info"]["completion_tokens"] for o in outs])
            from diffkv_sglang.integration.args import published_config     # what the schedulers inherited
            print("SERVED", json.dumps(published_config().to_dict()))
    """)
    done = subprocess.run([sys.executable, "-c", script], env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LENGTHS [12, 12]" in done.stdout
    [cached] = (p for p in cache.glob("*.json") if not p.name.endswith(".report.json"))
    served = done.stdout.split("SERVED ", 1)[1].splitlines()[0]
    assert DiffKVConfig.parse(served) == DiffKVConfig.parse(cached.read_text())


def test_tensor_parallel_and_chunked_prefill_keep_the_output(tiny_model):
    """--tp-size 2 splits the 2 KV heads across ranks (one each), and a chunked prefill (32-token chunks; the
    prompt stays staged until its first decode step) changes nothing: the plain server's greedy replies, scored
    teacher-forced by a server doing both (one server start less than testing them apart), get the same
    log-probabilities within ``FLOAT32_ORDER_NATS``. float32 weights: the setups differ only in summation order
    (all-reduce over ranks, attention over chunks).

    The observation window is the last 8 queries of the prompt's final chunk, so the prompts are chosen with a
    final chunk of at least 8 tokens (a shorter last chunk observes with fewer queries: see docs/design.md)."""
    chunk, window = 32, 8
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompts = [tokenizer(p)["input_ids"] for p in (STORY * 3, STORY + "Hello there", "The quick brown fox " * 11)]
    assert min(len(p) % chunk or chunk for p in prompts) >= window
    common = [*DIFFKV, "--diffkv-obs-window", str(window), "--dtype", "float32"]
    setups = {"plain": ([], None),
              "tp2 chunked": (["--tp-size", "2", "--chunked-prefill-size", str(chunk)],
                              {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"})}
    continuations, scores, logs = None, {}, {}
    for name, (extra, env) in setups.items():
        with SGLangServer(tiny_model, [*common, *extra], env=env) as running:
            if continuations is None:
                continuations = [greedy_continuation(running, p, 32) for p in prompts]
                running.post_text("/flush_cache?timeout=30")     # score every setup from the same empty cache
            scores[name] = [score(running, p, c) for p, c in zip(prompts, continuations)]
            assert gauge(running, "sealed_pages") > 0
            logs[name] = running.log_text()
            assert not running.unexpected_errors(), running.unexpected_errors()
    for rank in (0, 1):
        assert f"DiffKV pool ready on tp rank {rank}: 4 layers x 1 KV heads" in logs["tp2 chunked"]
    found = compare(scores["plain"], scores["tp2 chunked"], margin=2 * FLOAT32_ORDER_NATS)
    print(f"tp2 chunked against plain: {found.as_dict()}")
    assert found.max_abs_logprob_diff <= FLOAT32_ORDER_NATS, found
    assert found.top1_disagreements == 0, found
