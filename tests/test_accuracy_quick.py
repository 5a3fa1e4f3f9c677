"""CI smoke test of the accuracy harness (``benchmarks/accuracy.py``) on the real SmolLM2 through the real server.

A tiny budget: the dense pool and the DiffKV defaults, one 1k-token query-aware needle, one perplexity sample and
one teacher-forced sample each, in float32 (``--dtype float32``: bf16 matrix products run about 5x slower on a
CPU without bf16 instructions, and the harness, not the model's precision, is under test here). Checks the
structure of the JSON and the markdown, that the second turn of the perplexity task found its prefix in the radix
cache, that the DiffKV cells report a measured physical compression ratio above 1, and that the teacher-forced
cell is compared with the dense row's stored view of the same continuation.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from diffkv_devtools import REPO

pytestmark = [pytest.mark.server, pytest.mark.slow]

CONFIGS = ("dense", "diffkv")
TASKS = ("needle_1k_aware", "ppl", "teacher_forced")


def run_stopping_servers(cmd: list[str], timeout: float, cwd) -> subprocess.CompletedProcess:
    """``subprocess.run`` whose time-out sends SIGTERM first: ``accuracy.py`` then leaves its ``with SGLangServer``
    blocks and stops its server (started in its own session, which a SIGKILL of the harness would orphan)."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                stdout, stderr = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
            pytest.fail(f"accuracy.py --quick ran past {timeout:.0f} s:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_quick_mode_writes_results_markdown_and_plot(tmp_path):
    command = [sys.executable, str(REPO / "benchmarks" / "accuracy.py"), "--quick", "--out", str(tmp_path),
               "--configs", ",".join(CONFIGS), "--tasks", ",".join(TASKS), "--samples", "1", "--dtype", "float32"]
    done = run_stopping_servers(command, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "server up" in done.stdout                                    # progress output

    results = json.loads((tmp_path / "accuracy.json").read_text())
    cells = results["cells"]
    assert set(cells) == {f"smollm2-135m-instruct/{c}/{t}" for c in CONFIGS for t in TASKS}
    for cell in cells.values():
        assert cell["n"] == 1 and len(cell["samples"]) == 1 and cell["spec"]["dtype"] == "float32"
        for field in ("score", "compression_ratio", "sealed_compression_ratio", "tier_shares", "flags", "spec"):
            assert field in cell, field
    for task in TASKS:
        diffkv = cells[f"smollm2-135m-instruct/diffkv/{task}"]
        assert diffkv["sealed_compression_ratio"] > 1 and diffkv["compression_ratio"] > 1, diffkv
        assert set(diffkv["tier_shares"]) == {"k8v4", "k4v2", "pruned"}
        assert abs(sum(diffkv["tier_shares"].values()) - 1) < 1e-3
        assert cells[f"smollm2-135m-instruct/dense/{task}"]["compression_ratio"] == 1.0
    for config in CONFIGS:
        ppl = cells[f"smollm2-135m-instruct/{config}/ppl"]
        assert ppl["samples"][0]["cached_tokens"] >= ppl["spec"]["length"]   # scored against the cached prefix
        assert 1 < ppl["score"] < 1000

    dense_tf, diffkv_tf = (cells[f"smollm2-135m-instruct/{c}/teacher_forced"]["samples"][0] for c in CONFIGS)
    assert len(dense_tf["target"]) == len(dense_tf["top"]) == len(dense_tf["continuation"]) > 0
    assert diffkv_tf["continuation"] == dense_tf["continuation"] and "target" not in diffkv_tf
    assert diffkv_tf["vs_dense"]["positions"] == len(dense_tf["continuation"])
    assert diffkv_tf["cached_tokens"] > 0 and 0 <= diffkv_tf["score"] <= 100

    md = (tmp_path / "accuracy.md").read_text()
    assert "| config | needle_1k_aware (n) | ppl (n) | teacher_forced (n) |" in md
    assert "| diffkv |" in md and "![physical compression ratio vs score](accuracy.png)" in md
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resumable: a second run keeps the finished cells and starts no server
    again = run_stopping_servers(command, timeout=300, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "starting the server" not in again.stdout
    assert json.loads((tmp_path / "accuracy.json").read_text())["cells"] == cells
