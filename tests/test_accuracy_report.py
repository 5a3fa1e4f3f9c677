"""The accuracy report's summary table (``benchmarks/accuracy.py``), on synthetic cells: no server, no model.

Checks what the hand-written observations rely on: needles counted per length and mode, perplexity over the
first windows only (so 3-window and 2-window cells compare) with its change against dense, teacher-forced top-1
agreement pooled over samples with the position-weighted KL against dense and ours-dense, multi-turn recalls
with the fact's log-probability, rows ordered by the mean sealed ratio, and ``-`` for what was not run.
"""

from __future__ import annotations

import importlib.util
import math
import random
import sys

from diffkv_devtools import REPO

_SPEC = importlib.util.spec_from_file_location("accuracy", REPO / "benchmarks" / "accuracy.py")
accuracy = sys.modules["accuracy"] = importlib.util.module_from_spec(_SPEC)   # the benchmark script, from its file
_SPEC.loader.exec_module(accuracy)

MODEL = "tiny"


def cell(config: str, task: str, scores: list[float], ratio: float, **extra) -> dict:
    samples = [{"score": s} for s in scores]
    for sample, more in zip(samples, extra.pop("sample_fields", [])):
        sample.update(more)
    return {"model": MODEL, "config": config, "family": f"family-{config}", "task": task, "n": len(samples),
            "score": sum(scores) / len(scores), "sealed_compression_ratio": ratio, "samples": samples, **extra}


def ppl_cell(config: str, ratio: float, windows: list[tuple[float, int]]) -> dict:
    fields = [{"nll": nll, "scored_tokens": tokens} for nll, tokens in windows]
    return cell(config, "ppl", [math.exp(nll) for nll, _ in windows], ratio, sample_fields=fields)


def tf_cell(config: str, ratio: float, comparisons: dict[str, list[tuple[int, int, int, float]]]) -> dict:
    """A teacher-forced cell whose samples were compared with ``{reference: [(positions, decided, flips, kl)]}``."""
    n = max((len(v) for v in comparisons.values()), default=1)
    fields = [{f"vs_{ref}": {"positions": p, "decided": d, "top1_disagreements": f, "mean_kl": kl}
               for ref, found in comparisons.items() for p, d, f, kl in [found[i]]} for i in range(n)]
    return cell(config, "teacher_forced", [0.0] * n, ratio, sample_fields=fields)


def cells_by_key(*cells: dict) -> dict:
    return {accuracy.cell_key(c["model"], c["config"], c["task"]): c for c in cells}


def rows(lines: list[str]) -> dict[str, list[str]]:
    out = {}
    for line in lines[2:]:
        fields = [f.strip() for f in line.strip("|").split("|")]
        out[fields[0]] = fields
    return out


def test_summary_counts_needles_windows_and_recalls():
    rng = random.Random()
    dense_windows = [(rng.uniform(2.0, 4.0), rng.randint(100, 255)) for _ in range(2)]
    # a 3-window cell from an earlier run: its third window must not count
    k8v4_windows = [(rng.uniform(2.0, 4.0), rng.randint(100, 255)) for _ in range(2)] + [(50.0, 255)]
    found_aware, found_agnostic = rng.randint(0, 6), rng.randint(0, 6)
    lp = -rng.uniform(0.0, 5.0)
    vs_dense = [(rng.randint(20, 128), rng.randint(10, 20), rng.randint(0, 9), rng.uniform(0, 0.1)) for _ in range(2)]
    vs_ours = [(p, rng.randint(10, 20), rng.randint(0, 9), rng.uniform(0, 0.1)) for p, *_ in vs_dense]
    cells = cells_by_key(
        cell("dense", "needle_1k_aware", [100.0] * 6, 1.0),
        cell("dense", "needle_1k_agnostic", [100.0] * 6, 1.0),
        ppl_cell("dense", 1.0, dense_windows),
        cell("k8v4", "needle_1k_aware", [100.0] * found_aware + [0.0] * (6 - found_aware), 2.5),
        cell("k8v4", "needle_1k_agnostic", [100.0] * found_agnostic + [0.0] * (6 - found_agnostic), 2.3),
        ppl_cell("k8v4", 2.4, k8v4_windows),
        cell("k8v4", "multiturn", [100.0, 0.0, 100.0, 100.0], 1.9, fact_logprob=lp),
        tf_cell("dense", 1.0, {}),
        tf_cell("k8v4", 2.2, {"dense": vs_dense, "ours-dense": vs_ours}),
        cell("k2v2", "needle_2k_aware", [0.0, 100.0, 0.0], 5.9),           # ranks last by ratio
    )
    lines = accuracy.summary_table(cells)
    header = [f.strip() for f in lines[0].strip("|").split("|")]
    assert header == ["config", "family", "sealed ratio", "needle 1k a · g", "needle 2k a · g",
                      f"ppl (windows 1-{accuracy.PPL_WINDOWS})",
                      "teacher-forced top-1 % (KL) dense · ours-dense", "multi-turn (lp)"]   # no QA cell, no column
    table = rows(lines)
    assert list(table) == ["dense", "k8v4", "k2v2"]

    def perplexity(windows):
        return math.exp(sum(n * t for n, t in windows) / sum(t for _, t in windows))

    dense, k8v4 = perplexity(dense_windows), perplexity(k8v4_windows[:2])
    def teacher_forced(found):                   # pooled: disagreements over all decided positions; KL per position
        top1 = 100 * (1 - sum(f for _, _, f, _ in found) / sum(d for _, d, _, _ in found))
        return f"{top1:.1f} ({sum(p * kl for p, _, _, kl in found) / sum(p for p, *_ in found):.4f})"

    assert table["dense"] == ["dense", "family-dense", "1.00x", "6/6 · 6/6", "-", f"{dense:.2f}", "reference", "-"]
    assert table["k8v4"] == [
        "k8v4", "family-k8v4", "2.30-2.50x", f"{found_aware}/6 · {found_agnostic}/6", "-",
        f"{k8v4:.2f} ({100 * (k8v4 / dense - 1):+.1f}%)", f"{teacher_forced(vs_dense)} · {teacher_forced(vs_ours)}",
        f"3/4 ({lp:.2f})"]      # the multi-turn and teacher-forced ratios are not in the range
    assert table["k2v2"] == ["k2v2", "family-k2v2", "5.90x", "-", "1/3 · -", "-", "-", "-"]
