"""The evaluation report: results.csv, a Markdown table like the paper's, and an accuracy plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from geo.atomic import atomic_output

METRICS = ("accuracy", "kappa", "f1", "miou")


@dataclass(frozen=True)
class ReportFiles:
    csv: Path
    markdown: Path
    plot: Path
    table: str
    """The Markdown accuracy table, as printed by the CLI and published as a Prefect artifact."""


COSTS = {"train_seconds_per_iteration": "train s/iteration", "adapt_seconds": "adapt s/episode"}
"""Cost columns of the accuracy table (the adapt time at the most shots), when results have them."""


def summary_table(results: pd.DataFrame, metric: str = "accuracy") -> str:
    """Methods as rows, shot counts as columns, `mean ± half-interval` cells, like the paper; the
    accuracy table ends with the cost columns."""
    shots = sorted(results["shots"].unique())
    costs = [column for column in COSTS if column in results.columns] if metric == "accuracy" else []
    header = (
        "| method | "
        + " | ".join([f"{s} shot" if s == 0 else str(s) for s in shots] + [COSTS[c] for c in costs])
        + " |"
    )
    lines = [header, "|---|" + "---|" * (len(shots) + len(costs))]
    for method, rows in results.groupby("method", sort=False):
        by_shots = rows.set_index("shots")
        cells = []
        for s in shots:
            if s not in by_shots.index or pd.isna(by_shots.at[s, metric]):
                cells.append("—")
                continue
            mean = by_shots.at[s, metric]
            half = (by_shots.at[s, f"{metric}_high"] - by_shots.at[s, f"{metric}_low"]) / 2
            # one episode has no interval: the mean alone
            cells.append(f"{mean:.3f}" if pd.isna(half) else f"{mean:.3f} ± {half:.3f}")
        for column in costs:
            value = rows.sort_values("shots")[column].iloc[-1]
            cells.append("—" if pd.isna(value) else f"{value:.3g}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(results: pd.DataFrame, out_dir: Path, *, title: str, notes: str = "") -> ReportFiles:
    """Write the three report files atomically; `results` has one row per (method, shots)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, markdown_path, plot_path = (
        out_dir / "results.csv",
        out_dir / "report.md",
        out_dir / "accuracy_vs_shots.png",
    )
    with atomic_output(csv_path) as tmp:
        results.to_csv(tmp, index=False, float_format="%.6f")
    table = summary_table(results)
    sections = [f"# {title}", "", "Accuracy (mean ± half-width of the 95% interval over episodes):", "", table]
    for metric in METRICS[1:]:
        if results[metric].notna().any():
            sections += ["", f"{metric}:", "", summary_table(results, metric)]
    if notes:
        sections += ["", notes]
    with atomic_output(markdown_path) as tmp:
        tmp.write_text("\n".join(sections) + "\n")
    _plot(results, plot_path, title)
    return ReportFiles(csv=csv_path, markdown=markdown_path, plot=plot_path, table=table)


def _plot(results: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    for method, rows in results.groupby("method", sort=False):
        rows = rows.sort_values("shots")
        axes.plot(rows["shots"], rows["accuracy"], marker="o", label=method)
        axes.fill_between(rows["shots"], rows["accuracy_low"], rows["accuracy_high"], alpha=0.2)
    axes.set_xlabel("labelled examples per class (shots)")
    axes.set_ylabel("accuracy")
    axes.set_title(title)
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
