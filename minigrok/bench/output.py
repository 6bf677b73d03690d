"""Benchmark rows out: an aligned text table, JSON, CSV and a PNG (matplotlib imported only to draw it)."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

from .timing import INTERPRETER_NOTE, UNSTABLE_HINT

TABLE_FORMATS = {
    "shape": "{}",
    "provider": "{}",
    "mode": "{}",
    "x": "{}",
    "median_ms": "{:.4g}",
    "p20_ms": "{:.4g}",
    "p80_ms": "{:.4g}",
    "tflops": "{:.3g}",
    "gbps": "{:.3g}",
    "peak_mb": "{:.4g}",
    "speedup": "{:.2f}x",
    "max_err": "{:.1e}",
    "stable": "{}",
    "note": "{}",
}
PLOT_METRICS = {"attention": ("tflops",), "linear_cross_entropy": ("median_ms", "peak_mb")}  # others: gbps
TIME_METRICS = ("median_ms", "p20_ms", "p80_ms", "tflops", "gbps")


def table_cell(key: str, value) -> str:
    """A value as the table shows it: blank when absent; `stable` shows only "no", on a time not to trust."""
    if key == "stable":
        value = "no" if value is False else None
    return "" if value is None else TABLE_FORMATS[key].format(value)


def aligned(cells: list[list[str]]) -> list[str]:
    """Rows of cells as lines of left-aligned columns two spaces apart."""
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in cells]


def format_table(rows: list[dict]) -> str:
    """The rows that ran as an aligned text table (columns blank in every row dropped), what to do about unstable
    times, then the skipped providers."""
    ran = [row for row in rows if row["median_ms"] is not None]
    cells = [[table_cell(key, row[key]) for key in TABLE_FORMATS] for row in ran]
    kept = [i for i, key in enumerate(TABLE_FORMATS) if any(line[i] for line in cells)]
    header = [rows[0]["x_name"] if key == "x" else key for key in TABLE_FORMATS]
    lines = aligned([[line[i] for i in kept] for line in [header, *cells]])
    if unstable := sum(row["stable"] is False for row in ran):
        lines.append(f"{unstable} of {len(ran)} times are unstable (stable: no): {UNSTABLE_HINT}")
    skipped = {(row["provider"], row["note"]) for row in rows if row["median_ms"] is None}
    lines += [f"{provider}: {note}" for provider, note in sorted(skipped)]
    return "\n".join(lines)


def write_json(rows: list[dict], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rows, indent=1) + "\n")


def write_csv(rows: list[dict], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plotted_rows(rows: list[dict], metric: str) -> list[dict]:
    """The rows a panel of `metric` draws: those with a value, and for a time or a rate none from the interpreter,
    whose times are no kernel's. (Peak memory counts the storages torch allocates, the same in the interpreter.)"""
    return [
        row
        for row in rows
        if row[metric] is not None and not (metric in TIME_METRICS and row["note"] == INTERPRETER_NOTE)
    ]


def plot_rows(rows: list[dict], path: str | Path) -> None:
    """PNG with one panel per shape x metric (rows) and mode (columns), one line per provider against x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(row["shape"] for row in rows))
    modes = list(dict.fromkeys(row["mode"] for row in rows))
    panels = list(itertools.product(shapes, PLOT_METRICS.get(rows[0]["op"], ("gbps",))))
    figure, axes = plt.subplots(len(panels), len(modes), figsize=(4.5 * len(modes), 3.2 * len(panels)), squeeze=False)
    for (shape, metric), panel_row in zip(panels, axes, strict=True):
        drawn = plotted_rows(rows, metric)
        for mode, ax in zip(modes, panel_row, strict=True):
            for provider in dict.fromkeys(row["provider"] for row in rows):
                points = [
                    (row["x"], row[metric])
                    for row in drawn
                    if (row["shape"], row["mode"], row["provider"]) == (shape, mode, provider)
                ]
                if points:
                    ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set(xlabel=rows[0]["x_name"], ylabel=metric, title=f"{mode}  {shape}")
            ax.title.set_fontsize(8)
            if ax.lines:
                ax.legend(fontsize=7)
    title = f"{rows[0]['op']} ({rows[0]['dtype']}, {rows[0]['device']})"
    if interpreted := sorted({row["provider"] for row in rows if row["note"] == INTERPRETER_NOTE}):
        title += f"\n{', '.join(interpreted)}: ran in the interpreter, left out of time and throughput panels"
    figure.suptitle(title)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
