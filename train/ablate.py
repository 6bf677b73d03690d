"""Ablations: a grid of variants of one run config, each trained once per seed as a normal run directory under
the ablation's, on the same data and tokenizer and the same budget; then one table row per variant and a figure.

`minigrok ablate` (minigrok/cli/ablate.py) trains the runs; this module plans them, tells finished runs from
interrupted ones, and reads the results back from each run's own log and checkpoint.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigrok.checkpoint import read_json
from minigrok.config import ConfigError, ModelConfig, load_yaml, parse_overrides, parse_yaml
from minigrok.files import atomic_write, write_json
from minigrok.report import ModelReport, model_report

from . import checkpoint
from .config import RUN_SECTIONS, TrainConfig, build_run_configs
from .corpus import canonical_data
from .plot import read_curves
from .run import FIXED_ON_RESUME

SPEC_NAME = "ablation.json"
BUDGETS = {"minutes": "train.max_minutes", "tokens": "train.max_tokens", "steps": "train.max_steps"}
# Fields the ablation sets itself (not --set or --vary), and the option that does.
SET_BY_ABLATION = {"train.seed": "give the seeds with --seeds"} | dict.fromkeys(
    BUDGETS.values(), "give it with --budget"
)
# Fields every run of an ablation shares, with the way to change them instead of --vary.
NOT_VARIED = SET_BY_ABLATION | {
    f"train.{name}": "it fixes the tokenizer or data split that every run shares" for name in FIXED_ON_RESUME
}
# What must stay the same for the runs already in an ablation's directory to compare with new ones.
FIXED_SPEC = {"base_config": "--base config", "set": "--set", "budget": "--budget", "data": "--data"}
FIXED_SPEC |= {"val_data": "--val-data", "tokenizer": "--tokenizer", "varied": "--vary or --variant fields"}
KV_DTYPE = "bf16"  # KV-cache bytes per token are reported for a bf16 cache, the usual one at inference


@dataclass
class Run:
    """One variant at one seed: its directory name under the ablation's and the --set overrides of its training."""

    name: str
    variant: tuple[str, ...]  # the varied values, as given, in the order of the varied keys
    seed: int
    overrides: list[str]  # section.field=value, every one the run is trained with

    def train_overrides(self) -> list[str]:
        """The train.* overrides: all a resumed run takes (its model is the checkpoint's)."""
        return [pair for pair in self.overrides if pair.startswith("train.")]


def full_key(key: str) -> str:
    """section.field of a --set / --vary key (a bare field is a model field, as --set reads it)."""
    return key if "." in key else f"model.{key}"


def _with_section(pair: str) -> str:
    """A --set key=value with the section named (a pair without "=" is left for parse_overrides to refuse)."""
    key, sep, value = pair.partition("=")
    return f"{full_key(key)}={value}" if sep and key else pair


def _check_key(key: str, what: str) -> None:
    """Refuse a varied field that does not exist or that every run of an ablation shares."""
    parse_overrides([f"{key}=null"], RUN_SECTIONS)  # an unknown section or field: its error names the fix
    if key in NOT_VARIED:
        raise ConfigError(f"{what}: {key} is the same for every run of an ablation; {NOT_VARIED[key]}")


def parse_vary(texts: list[str]) -> dict[str, list[str]]:
    """{section.field: [values as given]} of the --vary options, each field checked to exist and to be one a
    variant may change."""
    vary: dict[str, list[str]] = {}
    for text in texts:
        key, sep, values = text.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--vary {text!r} is not field=v1,v2,...: write e.g. --vary model.n_kv_heads=1,2,4")
        key = full_key(key)
        _check_key(key, f"--vary {text!r}")
        if key in vary:
            raise ConfigError(f"--vary {key} is given twice: list all its values in one --vary {key}=v1,v2")
        listed = values.split(",")
        parsed = [parse_yaml(value) for value in listed]
        if "" in listed or any(parsed.count(value) > 1 for value in parsed):
            raise ConfigError(f"--vary {text!r} lists an empty or repeated value: give each value once, e.g. 1,2,4")
        vary[key] = listed
    return vary


def grid(vary: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the --vary values, each as {section.field: value}."""
    return [dict(zip(vary, values, strict=True)) for values in itertools.product(*vary.values())]


def parse_variants(texts: list[str]) -> list[dict[str, str]]:
    """The base config itself, then each --variant field=value,field=value... as one variant: each option alone
    and any combination of them, without the whole grid."""
    variants: list[dict[str, str]] = [{}]
    for text in texts:
        pairs: dict[str, str] = {}
        for pair in text.split(","):
            key, sep, value = pair.partition("=")
            if not sep or not key or not value:
                raise ConfigError(
                    f"--variant {text!r} is not field=value[,field=value...]: write e.g. "
                    "--variant model.qk_norm=true,train.optimizer=muon"
                )
            key = full_key(key)
            _check_key(key, f"--variant {text!r}")
            if key in pairs:
                raise ConfigError(f"--variant {text!r} sets {key} twice: give it once")
            pairs[key] = value
        if pairs in variants:
            raise ConfigError(f"--variant {text!r} is given twice: give each variant once")
        variants.append(pairs)
    return variants


def columns(variants: list[dict[str, str]]) -> list[str]:
    """The varied fields, in the order they are first given: one table column each."""
    return list(dict.fromkeys(key for pairs in variants for key in pairs))


def budget_overrides(budget: str | None) -> list[str]:
    """--budget minutes=X, tokens=N or steps=N as train.* overrides: that budget, and no other (None: the base's)."""
    if budget is None:
        return []
    kind, sep, value = budget.partition("=")
    if not sep or kind not in BUDGETS or not value:
        raise ConfigError(f"--budget {budget!r} is not minutes=X, tokens=N or steps=N: write e.g. --budget minutes=5")
    return [f"{key}={value if name == kind else 'null'}" for name, key in BUDGETS.items()]


def _check(what: str, base: str, overrides: list[str]) -> None:
    """Build the run config `overrides` make of `base`, naming `what` in front of any error."""
    try:
        model_values, *_ = build_run_configs(base, overrides)
        ModelConfig.from_dict(model_values)
    except ConfigError as error:
        raise ConfigError(f"{what}: {error}") from None


BASE_VALUE = "—"  # a variant's cell for a field it leaves at the base config's value


def _name_part(key: str, value: str) -> str:
    return f"{key.rpartition('.')[2]}={re.sub(r'[^A-Za-z0-9._+-]', '_', value)}"


def plan(
    base: str,
    fixed: list[str],
    variants: list[dict[str, str]],
    budget: str | None,
    seeds: list[int],
    option: str = "--vary",
) -> list[Run]:
    """Every variant (from `grid` or `parse_variants`, given by `option`) at every seed, each config built and
    checked before anything trains. `fixed` are the --set overrides every run shares."""
    if len(set(seeds)) < len(seeds):
        raise ConfigError(f"--seeds {','.join(map(str, seeds))} repeats a seed: give each once, e.g. --seeds 1,2")
    varied = columns(variants)
    fixed = [_with_section(pair) for pair in fixed]
    for pair in fixed:
        key = pair.partition("=")[0]
        if key in varied or key in SET_BY_ABLATION:
            fix = f"drop it or the variants' {key}" if key in varied else SET_BY_ABLATION[key]
            raise ConfigError(f"--set {pair}: the ablation sets {key} itself; {fix}")
    shared = fixed + budget_overrides(budget)
    _check(f"--base {base} with --set/--budget", base, shared)
    runs = []
    for variant in variants:
        pairs = [f"{key}={value}" for key, value in variant.items()]
        if variant:
            _check(f"{option} {', '.join(pairs)}", base, shared + pairs)
        cells = tuple(variant.get(key, BASE_VALUE) for key in varied)
        for seed in seeds:
            name = ",".join([*map(_name_part, variant, variant.values())] or ["base"]) + f",seed={seed}"
            runs.append(Run(name, cells, seed, shared + pairs + [f"train.seed={seed}"]))
    names = [run.name for run in runs]
    if len(set(names)) < len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise ConfigError(f"two variants share the directory name {twice!r}: give values that differ in it")
    for run in runs:  # the seeds themselves
        _check(f"--seeds {run.seed}", base, run.overrides)
    return runs


def spec(
    base: str,
    fixed: list[str],
    variants: list[dict[str, str]],
    budget: str | None,
    seeds: list[int],
    data: list[str] | None,
    val_data: list[str] | None,
    tokenizer: str,
) -> dict[str, Any]:
    """ablation.json: what the ablation's runs are trained with (FIXED_SPEC must not change between invocations)."""
    return {
        "base": base,
        "base_config": load_yaml(base),
        "set": parse_overrides(fixed, RUN_SECTIONS),
        "budget": budget,
        "data": canonical_data(data),
        "val_data": [os.path.abspath(path) for path in val_data] if val_data else None,
        "tokenizer": tokenizer,
        "varied": columns(variants),
        "variants": variants,
        "seeds": seeds,
    }


def check_spec(out: Path, new: dict[str, Any]) -> None:
    """Record the ablation's spec in `out`, refusing one that would mix its runs with those already there: another
    base config, --set, --budget, corpus, tokenizer or varied fields (more values or seeds are fine)."""
    path = out / SPEC_NAME
    if path.is_file():
        old = read_json(path)
        for key, option in FIXED_SPEC.items():
            if old.get(key) != new[key]:
                raise ConfigError(
                    f"{out} holds an ablation whose {option} is {old.get(key)!r}, but this one's is {new[key]!r}: "
                    "their runs would not compare; rerun with the same options, or choose another --out"
                )
    write_json(path, new)


def run_state(run_dir: Path) -> str:
    """new (no checkpoint yet: start it), finished (its newest checkpoint spent the budget and the log holds that
    step's evaluation) or interrupted (resume it)."""
    found = checkpoint.checkpoint_dirs(run_dir) if run_dir.is_dir() else []
    if not found:
        return "new"
    state = checkpoint.load_trainer_state(found[-1])
    spent = TrainConfig.from_dict(state["train_config"]).budget_spent(state["step"], state["elapsed"])
    _, val = read_curves(run_dir)
    return "finished" if spent and val and val[-1]["step"] == state["step"] else "interrupted"


def active_params(report: ModelReport) -> int:
    """Parameters each token passes through: the report's active_params where it has one (a mixture of experts),
    else all the unique ones."""
    return getattr(report, "active_params", report.unique_params)


def run_result(run_dir: Path) -> dict[str, Any]:
    """A finished run's figures: its final evaluation, mean logged training tokens/s, and the report of its model
    (the checkpoint's config, vocabulary included) at its training context."""
    train, val = read_curves(run_dir)
    state = checkpoint.load_trainer_state(checkpoint.checkpoint_dirs(run_dir)[-1])
    report = model_report(ModelConfig.from_dict(state["model_config"]), context=state["train_config"]["seq_len"])
    final = val[-1]
    rates = [record["tokens_per_s"] for record in train] or [final["tokens"] / final["time"]]
    return {
        "params_total": report.total_params,
        "params_unique": report.unique_params,
        "params_active": active_params(report),
        "train_flops_per_token": report.train_flops_per_token,
        "kv_bytes_per_token": report.kv_cache_bytes_per_token[KV_DTYPE],
        "tokens_per_s": statistics.fmean(rates),
        "val_bpb": final["val_bpb"],
        "wall_time_s": final["time"],
    }


def summarize(runs: list[Run], out: Path, varied: list[str]) -> list[dict[str, Any]]:
    """One row per variant: its varied values, sizes and costs, and val bpb mean, min and max over its seeds."""
    rows = []
    for variant, group in itertools.groupby(runs, key=lambda run: run.variant):
        group = list(group)
        results = [run_result(out / run.name) for run in group]
        bpb = [result["val_bpb"] for result in results]
        first = results[0]
        rows.append(
            dict(zip(varied, variant, strict=True))
            | {key: first[key] for key in ("params_total", "params_unique", "params_active", "train_flops_per_token")}
            | {
                "tokens_per_s": statistics.fmean(result["tokens_per_s"] for result in results),
                "val_bpb_mean": statistics.fmean(bpb),
                "val_bpb_min": min(bpb),
                "val_bpb_max": max(bpb),
                f"kv_bytes_per_token_{KV_DTYPE}": first["kv_bytes_per_token"],
                "wall_time_s": statistics.fmean(result["wall_time_s"] for result in results),
                "runs": " ".join(run.name for run in group),
            }
        )
    return rows


def markdown_table(rows: list[dict[str, Any]], varied: list[str], caption: str) -> str:
    """The rows as a Markdown table under `caption`; val bpb as mean (min–max over the seeds)."""
    header = [*varied, "params total", "params unique", "params active", "train FLOPs/token", "tokens/s"]
    header += ["val bpb mean (min–max)", "vs first row", f"KV bytes/token ({KV_DTYPE})", "wall time (s)", "runs"]
    lines = [caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row[key]) for key in varied]
        cells += [f"{row[key]:,}" for key in ("params_total", "params_unique", "params_active")]
        cells += [f"{row['train_flops_per_token']:,}", f"{row['tokens_per_s']:,.0f}"]
        cells += [f"{row['val_bpb_mean']:.4f} ({row['val_bpb_min']:.4f}–{row['val_bpb_max']:.4f})"]
        cells += [f"{100 * (row['val_bpb_mean'] / rows[0]['val_bpb_mean'] - 1):+.2f} %"]
        cells += [f"{row[f'kv_bytes_per_token_{KV_DTYPE}']:,}", f"{row['wall_time_s']:.1f}", row["runs"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict[str, Any]], out: Path, varied: list[str], caption: str) -> list[Path]:
    """results.md, results.csv, results.png and curves.png in `out`, each written atomically; returns their paths."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    paths = [out / "results.md", out / "results.csv", out / "results.png", out / "curves.png"]
    atomic_write(paths[0], lambda tmp: Path(tmp).write_text(markdown_table(rows, varied, caption)))
    atomic_write(paths[1], lambda tmp: Path(tmp).write_text(text.getvalue()))
    atomic_write(paths[2], lambda tmp: plot_results(rows, varied, tmp))
    atomic_write(paths[3], lambda tmp: plot_curves(rows, varied, out, tmp))
    return paths


def variant_label(row: dict[str, Any], varied: list[str]) -> str:
    """A variant's name in a figure: the fields it sets, or "base"."""
    pairs = [f"{field.rpartition('.')[2]}={row[field]}" for field in varied if row[field] != BASE_VALUE]
    return ", ".join(pairs) or "base"


PANELS = (("params_unique", "unique parameters"), ("train_flops_per_token", "train FLOPs / token"))
PANELS += (("wall_time_s", "wall time (s)"),)


def plot_results(rows: list[dict[str, Any]], varied: list[str], path: str) -> None:
    """A PNG of val bpb (mean, bars from min to max over the seeds) against parameters, FLOPs/token and wall time,
    each point labelled with its variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4), squeeze=False)
    mean = [row["val_bpb_mean"] for row in rows]
    spread = [
        [m - row["val_bpb_min"] for m, row in zip(mean, rows, strict=True)],
        [row["val_bpb_max"] - m for m, row in zip(mean, rows, strict=True)],
    ]
    for ax, (key, axis_label) in zip(axes[0], PANELS, strict=True):
        x = [row[key] for row in rows]
        ax.errorbar(x, mean, yerr=spread, fmt="o", capsize=4)
        for x_value, y_value, row in zip(x, mean, rows, strict=True):
            ax.annotate(
                variant_label(row, varied), (x_value, y_value), textcoords="offset points", xytext=(5, 5), fontsize=8
            )
        ax.set_xlabel(axis_label)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("val bits / byte (min–max over seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=110, format="png")
    plt.close(figure)


def plot_curves(rows: list[dict[str, Any]], varied: list[str], out: Path, path: str) -> None:
    """A PNG of val bpb against wall time while training: one colour per variant, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(7, 4.5))
    for index, row in enumerate(rows):
        for number, name in enumerate(row["runs"].split()):
            val = read_curves(out / name)[1]
            ax.plot(
                [record["time"] for record in val],
                [record["val_bpb"] for record in val],
                "-o",
                color=f"C{index % 10}",
                markersize=2,
                linewidth=1,
                label=variant_label(row, varied) if number == 0 else None,
            )
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("val bits / byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110, format="png")
    plt.close(figure)
