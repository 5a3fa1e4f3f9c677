"""The serving results as a table and a plot: output tokens/s per pool, one panel per (results file, workload).

    python benchmarks/gpu/plot_serving.py benchmarks/results/serving-h200.json benchmarks/results/serving-h100.json \
        --png docs/serving.png --markdown docs/serving-table.md

Reads the ``rows`` of files written by ``summarize.py`` (``benchmarks/gpu/run.sh bench``). Only rows measured in the
same file share a panel: different files are different machines or memory settings, never compared. Bars are
labelled with output tokens/s and, above each panel's first dense bf16 row, the ratio to it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = ("config", "cuda_graph", "output_tok_s", "requests", "max_running", "token_capacity", "mean_decode_step_ms")


def panels(files: list[Path]) -> list[tuple[str, list[dict]]]:
    """``(title, ok rows)`` per (file, workload), in file order; a row that failed is left out of the plot."""
    out = []
    for path in files:
        result = json.loads(path.read_text())
        gpu = result.get("versions", {}).get("gpu", "?")
        workloads = dict.fromkeys(row["workload"] for row in result["rows"])
        for workload in workloads:
            rows = [row for row in result["rows"] if row["workload"] == workload and row.get("ok", True)
                    and row.get("output_tok_s")]
            if rows:
                mem = rows[0].get("mem_fraction_static")
                out.append((f"{path.name}: {workload} ({gpu}, mem_fraction_static {mem})", rows))
    return out


def markdown(files: list[Path]) -> str:
    """One markdown table per panel, with each row's ratio to the panel's dense bf16 row (if any)."""
    text = []
    for title, rows in panels(files):
        base = next((r["output_tok_s"] for r in rows if r["config"] == "dense-bf16"), None)
        text += [f"**{title}**", "", "| " + " | ".join((*COLUMNS, "vs dense bf16")) + " |",
                 "|" + "---|" * (len(COLUMNS) + 1)]
        for row in rows:
            ratio = f"{row['output_tok_s'] / base:.2f}x" if base else "-"
            text.append("| " + " | ".join(str(row.get(c, "-")) for c in COLUMNS) + f" | {ratio} |")
        text.append("")
    return "\n".join(text)


def plot(files: list[Path], png: Path) -> None:
    """Bar charts of output tokens/s, one panel per (file, workload)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = panels(files)
    if not groups:
        raise ValueError(f"no successful rows in {[str(f) for f in files]}")
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4), squeeze=False)
    for ax, (title, rows) in zip(axes[0], groups):
        labels = [f"{r['config']}\n{'graphs' if r.get('cuda_graph') else 'eager'}" for r in rows]
        values = [r["output_tok_s"] for r in rows]
        bars = ax.bar(range(len(rows)), values, color=["#888" if r["config"].startswith("dense") else "#2a7"
                                                         for r in rows])
        base = next((r["output_tok_s"] for r in rows if r["config"] == "dense-bf16"), None)
        for bar, value in zip(bars, values):
            note = f"{value:.0f}" + (f"\n{value / base:.2f}x" if base else "")
            ax.annotate(note, (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_ylabel("output tokens/s")
        ax.set_ylim(0, max(values) * 1.25)
        ax.set_title(title, fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--png", type=Path, required=True)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    plot(args.files, args.png)
    if args.markdown:
        args.markdown.write_text(markdown(args.files))
    print(markdown(args.files))


if __name__ == "__main__":
    main()
