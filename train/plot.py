"""Training curves of one or more runs from their log.jsonl: loss against steps, tokens and wall time."""

from __future__ import annotations

from pathlib import Path

from .trainer import read_log

AXES = (("step", "step"), ("tokens", "tokens seen"), ("time", "wall time (s)"))


def read_curves(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: give run directories written by `minigrok train`")
    records = [record for _, record in read_log(path)]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def plot_runs(run_dirs: list[str], out: str | Path | None = None) -> Path:
    """Write a PNG: train loss (solid) and val loss (dashed) on top, val bits per byte below, for each x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out) if out else Path(run_dirs[0]) / "curves.png"
    figure, axes = plt.subplots(2, len(AXES), figsize=(5 * len(AXES), 7), squeeze=False)
    for index, run_dir in enumerate(run_dirs):
        train, val = read_curves(run_dir)
        color, name = f"C{index}", Path(run_dir).name
        for column, (key, label) in enumerate(AXES):
            axes[0][column].plot(
                [r[key] for r in train], [r["loss"] for r in train], color=color, label=f"{name} train"
            )
            axes[0][column].plot(
                [r[key] for r in val],
                [r["val_loss"] for r in val],
                "--o",
                color=color,
                markersize=3,
                label=f"{name} val",
            )
            axes[1][column].plot(
                [r[key] for r in val], [r["val_bpb"] for r in val], "-o", color=color, markersize=3, label=name
            )
            axes[1][column].set_xlabel(label)
    axes[0][0].set_ylabel("loss (nats / token)")
    axes[1][0].set_ylabel("val bits / byte")
    for row in axes:
        for ax in row:
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    axes[1][0].legend(fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
