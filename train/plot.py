"""Training curves of one or more runs from their log.jsonl: loss against steps, tokens and wall time, and the
downstream task scores of train.eval_tasks where the runs logged them."""

from __future__ import annotations

from pathlib import Path

from minigrok.tasks import scores

from .trainer import read_log

AXES = (("step", "step"), ("tokens", "tokens seen"), ("time", "wall time (s)"))
TASK_STYLES = ("-s", "--^", ":v", "-.D")  # one per task metric; the colour is the run's


def read_curves(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: give run directories written by `minigrok train`")
    records = [record for _, record in read_log(path)]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def task_curves(run_dir: str | Path) -> dict[str, list[tuple[dict, float]]]:
    """{"task metric": [(record, value), ...]} of the task evaluations a run logged (train.eval_tasks)."""
    curves: dict[str, list[tuple[dict, float]]] = {}
    for _, record in read_log(Path(run_dir) / "log.jsonl"):
        for name, result in record.get("tasks", {}).items():
            for metric in scores(result):
                curves.setdefault(f"{name} {metric}", []).append((record, result[metric]))
    return curves


def plot_runs(run_dirs: list[str], out: str | Path | None = None) -> Path:
    """Write a PNG: train loss (solid) and val loss (dashed) on top, val bits per byte below, then the task scores
    if any run logged them, for each x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out) if out else Path(run_dirs[0]) / "curves.png"
    tasks = {run_dir: task_curves(run_dir) for run_dir in run_dirs}
    rows = 3 if any(tasks.values()) else 2
    figure, axes = plt.subplots(rows, len(AXES), figsize=(5 * len(AXES), 3.5 * rows), squeeze=False)
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
            for number, (series, points) in enumerate(tasks[run_dir].items()):
                axes[2][column].plot(
                    [r[key] for r, _ in points],
                    [v for _, v in points],
                    TASK_STYLES[number % len(TASK_STYLES)],
                    color=color,
                    markersize=3,
                    label=f"{name} {series}",
                )
                axes[2][column].set_xlabel(label)
    axes[0][0].set_ylabel("loss (nats / token)")
    axes[1][0].set_ylabel("val bits / byte")
    if rows == 3:
        axes[2][0].set_ylabel("task score")
        axes[2][0].legend(fontsize=8)
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
