"""``--kv-pool diffkv`` under the real SGLang 0.5.23 server on a GPU, eager and with decode CUDA graphs.

Skipped unless CUDA and SGLang are both present (never on CPU CI); run on the lent GPU machine through
``benchmarks/gpu/run.sh check`` (docs/serving-gpu.md), which installs SGLang and puts the ``sgl_kernel`` stand-in of
``benchmarks/gpu/standin`` on ``PYTHONPATH`` (test support: SGLang's compiled kernels do not load there).

Servers, one at a time (module-scoped fixture): two model shapes x eager / decode CUDA graphs with ``--kv-pool
diffkv``, plus SGLang's own dense pool eager / graphs on the SmolLM2 shape as the control of the graph comparison.

* ``smollm2-135m``: SmolLM2-135M's shape (30 layers, 9 / 3 heads, head_dim 64) with seeded random weights of the
  usual initializer scale (std 0.02, written by :func:`random_checkpoint`), so greedy tokens are not near-ties;
* ``llama3-8b``: Llama-3-8B's shape (32 layers, 32 / 8 heads, head_dim 128, the tokenizer's 49152-token vocab)
  with SGLang's dummy weights (``--load-format dummy``, uniform +-1e-3: near-ties everywhere).

Each DiffKV server: 4096 logical tokens, page 16, window 16, chunked prefill of 256 tokens, SGLang told to
over-admit (``--schedule-conservativeness 0.05``). Checks: generate (pages sealed, compression > 1); a multi-turn
conversation reporting cached tokens; ``fork`` sharing a cached prefix; memory pressure (every request completes,
``/flush_cache`` returns the arena to its start-up bytes).

Graph against eager: the same request script on both servers of a pool, greedy with top-2 log-probabilities, in
three parts. ``sequential``: three requests one at a time (batch 1). ``full``: 8 requests in one ``/generate`` call,
short prompts prefilled in one batch, so every decode step has 8 lanes, a captured size (no padding): SGLang runs
the same matrix shapes eagerly and in the graph, and the DiffKV decode kernel's splits depend on the batch size
only, so where the dense control is bit-identical here DiffKV must be too (pages are sealed between replays).
``padded``: 6 requests, graph lanes padded to 8: SGLang's own matrix products then see other shapes than eagerly,
so its dense pool is not bit-identical (the H100 run: 0.0157 nats, one bfloat16 step of a logit). There the pool's
inputs differ by bfloat16 roundings (2^-8 relative), and a quantized cache turns such a difference into a whole
quantization step where a value lies near a rounding boundary (2^-b of the group's range for b-bit values), so
the check is a corruption check (a padded lane writing into or reading from a real request's pages moves
log-probabilities by nats): ``tau = max(LOGPROB_TOL, 2 x`` the control's largest difference ``) x 2^(8 - b)``,
``b`` the value bits of the first tier; every log-probability before a request's first divergence within ``tau``
of eager's, and a divergence only where eager's top-2 gap is at most ``2 tau`` (each of the two moved by at most
``tau``). Where no control ran (Llama-3-8B shape), ``tau = LOGPROB_TOL x 2^(8 - b)`` for every part. The runs
are quoted in docs/serving-gpu.md.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from diffkv_devtools.e2e_common import DIFFKV, STORY, generate
from diffkv_sglang.config import DiffKVConfig
from diffkv_devtools.gauges import gauge
from diffkv_devtools.sglang_server import SGLangServer

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
sglang = pytest.importorskip("sglang")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "benchmarks" / "gpu" / "models"
TOKENIZER = Path(os.environ.get("DIFFKV_GPU_TOKENIZER", REPO / ".cache" / "gpu" / "tokenizer"))
GPU_ARGS = ["--host", "127.0.0.1", "--sampling-backend", "pytorch", "--grammar-backend", "none",
            "--skip-server-warmup", "--chunked-prefill-size", "256", "--schedule-conservativeness", "0.05",
            "--mem-fraction-static", "0.5", "--cuda-graph-max-bs-decode", "16"]
MAX_TOTAL_TOKENS = 4096
LOGPROB_TOL = 0.02       # nats: the least tolerance of a graph-vs-eager log-probability (module docstring)
AMPLIFICATION = 2 ** (8 - DiffKVConfig().tiers[0].value_bits)      # a bf16 rounding -> a quantization step
SCRIPTS: dict[tuple[str, str, bool], dict[str, list[dict]]] = {}    # (model, pool, graph) -> part -> outputs


class GPUServer(SGLangServer):
    """``sglang.launch_server`` on the GPU: SGLangServer's life cycle with GPU flags and environment."""

    def __init__(self, model_path: Path, args: list[str], env: dict[str, str]):
        super().__init__(model_path, args, max_total_tokens=MAX_TOTAL_TOKENS, startup_timeout=600)
        self.cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path), *GPU_ARGS,
                    "--port", str(self.port), "--max-total-tokens", str(MAX_TOTAL_TOKENS), *args]
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("SGLANG_USE_CPU_ENGINE", "SGLANG_DIFFKV_POOL", "SGLANG_DIFFKV_CONFIG")}
        self.env.update(env)


def random_checkpoint(config_path: Path, out: Path, seed: int = 0) -> Path:
    """A bf16 checkpoint of ``config_path``'s shape with seeded random weights (transformers' initializer, built
    on the GPU) and the carried tokenizer. No download: weights are generated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_path, out / "config.json")
    config = AutoConfig.from_pretrained(out)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    for name in os.listdir(TOKENIZER):
        shutil.copy(TOKENIZER / name, out / name)
    return out


def shape_only(config_path: Path, out: Path) -> Path:
    """A model folder of config and tokenizer only, for ``--load-format dummy``."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_path, out / "config.json")
    for name in os.listdir(TOKENIZER):
        shutil.copy(TOKENIZER / name, out / name)
    return out


SERVERS = [("smollm2-135m", "dense", False), ("smollm2-135m", "dense", True), ("smollm2-135m", "diffkv", False),
           ("smollm2-135m", "diffkv", True), ("llama3-8b", "diffkv", False), ("llama3-8b", "diffkv", True)]
DENSE = ["--attention-backend", "triton"]       # SGLang's own pool; FlashInfer and FA3 are not on the GPU machine


@pytest.fixture(scope="module", params=SERVERS, ids=lambda p: f"{p[0]}-{p[1]}-{'graph' if p[2] else 'eager'}")
def server(request, tmp_path_factory):
    model, pool, graph = request.param
    if not (TOKENIZER / "tokenizer.json").exists():
        pytest.fail(f"no tokenizer in {TOKENIZER}: run benchmarks/gpu/prepare.sh and carry .cache/gpu/tokenizer")
    folder = tmp_path_factory.getbasetemp() / model
    if model == "smollm2-135m":
        path = folder if (folder / "model.safetensors").exists() else random_checkpoint(MODELS / f"{model}.json", folder)
        load = []
    else:
        path, load = shape_only(MODELS / f"{model}.json", folder), ["--load-format", "dummy"]
    graph_args = [] if graph else ["--disable-cuda-graph"]
    env = {"DIFFKV_CUDA_GRAPH": "1" if graph else "0"}
    with GPUServer(path, [*(DIFFKV if pool == "diffkv" else DENSE), *load, *graph_args], env) as running:
        running.model, running.pool, running.graph = model, pool, graph
        if pool == "diffkv":
            assert "Cache flushed" in running.post_text("/flush_cache?timeout=30")      # sets the gauges (no forward yet)
            running.start_used_bytes = gauge(running, "used_bytes")         # the padding page's staged blocks
        yield running
        log = running.log_text()
        assert ("Capture target decode CUDA graph end" in log) == graph, "decode graphs captured iff asked for"
        assert not running.unexpected_errors(), running.unexpected_errors()


@pytest.fixture
def diffkv_server(server):
    """The fixture's server where it runs the DiffKV pool (the dense control servers only run the comparison)."""
    if server.pool != "diffkv":
        pytest.skip("the dense control server runs only the graph-vs-eager comparison")
    return server


def test_generate_seals_and_compresses(diffkv_server):
    out = generate(diffkv_server, STORY * 4, max_new_tokens=48)
    assert out["meta_info"]["completion_tokens"] == 48
    generate(diffkv_server, "Hello", max_new_tokens=2)                    # the next forward refreshes the gauges
    assert gauge(diffkv_server, "sealed_pages") > 0 and gauge(diffkv_server, "compression_ratio") > 1.0
    assert "DiffKV pool ready on tp rank 0" in diffkv_server.log_text()


def test_multi_turn_reports_cached_tokens(diffkv_server):
    """Each turn resends the conversation so far: its prefix, compressed in earlier turns, comes from the cache."""
    conversation, cached = STORY * 5 + " What lives on a CPU?", []
    for turn in range(3):
        out = generate(diffkv_server, conversation, max_new_tokens=32)
        cached.append(out["meta_info"]["cached_tokens"])
        conversation += out["text"] + f" Tell me more, part {turn}."
    print(f"{diffkv_server.model}: cached tokens per turn {cached}")
    assert cached[1] > 150 and cached[2] > cached[1]


def test_fork_shares_the_cached_prefix(diffkv_server):
    @sglang.function
    def branches(s):
        s += STORY * 3
        forks = s.fork(3)
        for i, f in enumerate(forks):
            f += f" Branch {i}:" + sglang.gen("out", max_tokens=16, temperature=0)
        s["cached"] = [f.get_meta_info("out")["cached_tokens"] for f in forks]
        s["outs"] = [f["out"] for f in forks]

    state = branches.run(backend=sglang.RuntimeEndpoint(diffkv_server.url))
    print(f"{diffkv_server.model}: fork cached tokens {state['cached']}")
    assert all(state["outs"]) and min(state["cached"]) > 100


def test_memory_pressure_completes_and_flush_frees_every_byte(diffkv_server):
    """10 concurrent requests of ~350-700 prompt + 128 new tokens on 4096 logical tokens, twice."""
    for wave in range(2):
        prompts = [f"{STORY * (2 + i % 3)} wave {wave}, request {i}:" for i in range(10)]
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            outs = list(pool.map(lambda p: generate(diffkv_server, p, max_new_tokens=128), prompts))
        assert [o["meta_info"]["completion_tokens"] for o in outs] == [128] * 10
    assert "Cache flushed" in diffkv_server.post_text("/flush_cache?timeout=30")
    assert gauge(diffkv_server, "sealed_pages") == 0 and gauge(diffkv_server, "staged_pages") == 1        # the padding page
    assert gauge(diffkv_server, "used_bytes") == diffkv_server.start_used_bytes


def _comparison_script(server) -> dict[str, list[dict]]:
    """The three parts of the graph-vs-eager script (module docstring), greedy with top-2 log-probabilities.
    (SGLang 0.5.23's HTTP ``/generate`` takes one sampling-params object per call.)"""
    def ask(prompt, new_tokens):
        sampling = {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
        outs = server.post("/generate", {**prompt, "sampling_params": sampling, "return_logprob": True,
                                         "top_logprobs_num": 2})
        return outs if isinstance(outs, list) else [outs]

    story = lambda i: f"{STORY * (1 + i % 3)} Question {i}:"                            # noqa: E731
    ids = torch.randint(100, 40000, (14, 24), generator=torch.Generator().manual_seed(7)).tolist()
    parts = {"sequential": [ask({"text": story(i)}, 48)[0] for i in range(3)],
             "full": ask({"input_ids": ids[:8]}, 96),              # one prefill batch, then 8 lanes: no padding
             "padded": ask({"text": [story(10 + i) for i in range(6)]}, 96)}          # 6 lanes padded to 8
    return {part: [{"ids": o["output_ids"], "logprobs": [t[0] for t in o["meta_info"]["output_token_logprobs"]],
                    "top2": [[t[0] for t in top] for top in o["meta_info"]["output_top_logprobs"]]} for o in outs]
            for part, outs in parts.items()}


def _divergence(graph: dict, eager: dict) -> dict:
    """Tokens agreeing before the first divergence, the largest log-probability difference before it, and eager's
    top-2 gap where it diverges (None if the runs agree to the end)."""
    agree = next((pos for pos, (g, e) in enumerate(zip(graph["ids"], eager["ids"])) if g != e), len(eager["ids"]))
    diff = max((abs(g - e) for g, e in zip(graph["logprobs"][:agree], eager["logprobs"][:agree])), default=0.0)
    gap = None if agree == len(eager["ids"]) else eager["top2"][agree][0] - eager["top2"][agree][1]
    return {"agree": agree, "of": len(eager["ids"]), "max_logprob_diff": diff, "gap_at_divergence": gap}


def _problems(stats: list[dict], tau: float, exact: bool) -> list[str]:
    """Why a pool's graph run may not differ from its eager run this way (empty: it may)."""
    out = []
    for i, st in enumerate(stats):
        if exact and (st["agree"] < st["of"] or st["max_logprob_diff"] > 0):
            out.append(f"request {i}: not bit-identical ({st}) where the dense control is")
        elif st["max_logprob_diff"] > tau:
            out.append(f"request {i}: log-probability {st['max_logprob_diff']:.4f} off before divergence (tau {tau:.4f})")
        elif st["gap_at_divergence"] is not None and st["gap_at_divergence"] > 2 * tau:
            out.append(f"request {i}: diverged at token {st['agree']} where eager's top-2 gap was "
                       f"{st['gap_at_divergence']:.4f} > 2 tau = {2 * tau:.4f}")
    return out


def test_graph_outputs_match_eager(server):
    key = (server.model, server.pool, server.graph)
    SCRIPTS[key] = _comparison_script(server)
    if not server.graph:
        return
    eager = SCRIPTS.get((server.model, server.pool, False))
    if eager is None:
        pytest.skip("the eager server's run of this pool did not complete")
    stats = {part: [_divergence(g, e) for g, e in zip(runs, eager[part])] for part, runs in SCRIPTS[key].items()}
    print(json.dumps({"model": server.model, "pool": server.pool, "graph_vs_eager": stats}))
    if server.pool == "dense":
        return                                                   # the control: measured, nothing to assert
    control = SCRIPTS.get((server.model, "dense", True)), SCRIPTS.get((server.model, "dense", False))
    problems = []
    for part, part_stats in stats.items():
        if None in control:
            tau, exact = LOGPROB_TOL * AMPLIFICATION, False
        else:
            dense = [_divergence(g, e) for g, e in zip(control[0][part], control[1][part])]
            exact = all(d["agree"] == d["of"] and d["max_logprob_diff"] == 0 for d in dense)
            tau = max(LOGPROB_TOL, 2 * max(d["max_logprob_diff"] for d in dense)) * AMPLIFICATION
        print(f"{server.model} {part}: dense control {'bit-identical' if exact else 'differs'}, tau {tau:.4f}")
        problems += [f"{part} {p}" for p in _problems(part_stats, tau, exact)]
    assert not problems, problems
