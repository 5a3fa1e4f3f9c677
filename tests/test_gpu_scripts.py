"""The GPU run path's scripts (benchmarks/gpu/), checked on CPU so CI catches what would otherwise surface only
inside a device call: the sgl_kernel stand-in's arithmetic, the wheel slimming, the log summary, the shape configs."""

import importlib.util
import json
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

GPU = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", GPU / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_standin_matches_torch_references_on_cpu(tmp_path):
    """In a subprocess: the stand-in installs an import hook for ``sgl_kernel.*`` that must not reach this session."""
    env = {**os.environ, "PYTHONPATH": str(GPU / "standin")}
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(GPU / "check_standin.py"), "cpu", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checks = json.loads(out.read_text())["checks"]
    assert len(checks) == 34 and all(c["ok"] for c in checks)


def test_slim_wheel_removes_only_the_listed_parts(tmp_path):
    kept = ["sglang/__init__.py", "sglang/srt/mem_cache/rust_tree_core/mem_cache.abi3.so",
            "sglang/srt/rust_extensions/__init__.py"]
    removed = ["sglang/srt/rust_extensions/_server.abi3.so", "sglang/srt/rust_extensions/_grpc.abi3.so",
               "sglang/multimodal_gen/runtime/x.py"]
    record = "sglang-0.5.23.dist-info/RECORD"
    src, dst = tmp_path / "in.whl", tmp_path / "out.whl"
    with zipfile.ZipFile(src, "w") as whl:
        for name in kept + removed:
            whl.writestr(name, name)
        whl.writestr(record, "".join(f"{name},sha256=x,1\n" for name in kept + removed) + f"{record},,\n")
    count, _ = _script("slim_wheel").slim(str(src), str(dst))
    assert count == len(removed)
    with zipfile.ZipFile(dst) as whl:
        assert sorted(whl.namelist()) == sorted(kept + [record])
        listed = [line.split(",")[0] for line in whl.read(record).decode().splitlines()]
    assert listed == kept + [record]


def test_summary_reads_sglang_decode_and_pool_lines():
    log = ("[2026-12-04 18:12:43] Decode batch, #running-req: 48, #token: 140000, token usage: 0.44, cuda graph: True, "
           "gen throughput (token/s): 3000.00, #queue-req: 0\n"
           "[2026-12-04 18:12:44] Decode batch, #running-req: 10, #token: 9000, token usage: 0.05, cuda graph: True, "
           "gen throughput (token/s): 800.00, #queue-req: 0\n"
           "[2026-12-04 18:12:45] DiffKV pool: 7165.0/8574.0 MiB used, 161 staged + 4136 sealed pages\n")
    summary = _script("summarize").from_log(log)
    assert summary == {"max_running": 48, "peak_token_usage": 0.44, "decode_log_tok_s": 3000.0,
                       "mean_decode_step_ms": 16.0,
                       "diffkv_last_pool_line": "DiffKV pool: 7165.0/8574.0 MiB used, 161 staged + 4136 sealed pages"}


@pytest.mark.parametrize("name, layers, heads, kv_heads, head_dim", [
    ("llama3-8b", 32, 32, 8, 128), ("qwen2.5-7b", 28, 28, 4, 128), ("smollm2-135m", 30, 9, 3, 64)])
def test_shape_configs(tmp_path, name, layers, heads, kv_heads, head_dim):
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text((GPU / "models" / f"{name}.json").read_text())
    config = AutoConfig.from_pretrained(tmp_path)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
        layers, heads, kv_heads, head_dim)
    assert config.vocab_size == 49152          # the carried tokenizer's (SmolLM2-135M-Instruct)


def test_serving_plot_and_table_group_rows_by_file_and_workload(tmp_path):
    """Panels never mix files or workloads, failed rows are left out, ratios are to the panel's dense bf16 row."""
    plot_serving = _script("plot_serving")
    rng = random.Random()
    dense, diffkv = rng.uniform(500, 3000), rng.uniform(500, 3000)

    def row(config, workload, tok_s, ok=True):
        return {"config": config, "workload": workload, "cuda_graph": True, "output_tok_s": tok_s, "ok": ok,
                "mem_fraction_static": 0.3}

    a, b = tmp_path / "serving-a.json", tmp_path / "serving-b.json"
    a.write_text(json.dumps({"versions": {"gpu": "G1"}, "rows": [
        row("dense-bf16", "short-chat", dense), row("diffkv-default", "short-chat", diffkv),
        row("diffkv-k4v2", "short-chat", None, ok=False), row("diffkv-default", "long-gen", diffkv)]}))
    b.write_text(json.dumps({"versions": {"gpu": "G2"}, "rows": [row("dense-bf16", "short-chat", 2 * dense)]}))
    groups = plot_serving.panels([a, b])
    assert [(title.split(":")[0], [r["config"] for r in rows]) for title, rows in groups] == [
        ("serving-a.json", ["dense-bf16", "diffkv-default"]), ("serving-a.json", ["diffkv-default"]),
        ("serving-b.json", ["dense-bf16"])]
    table = plot_serving.markdown([a, b])
    assert f"| {diffkv / dense:.2f}x |" in table and table.count("| 1.00x |") == 2
    png = tmp_path / "serving.png"
    plot_serving.plot([a, b], png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
