"""`minigrok ablate` as a user runs it: a grid of 2 variants x 2 seeds of tiny runs in a subprocess, its table, CSV
and figure read against each run's own log and weights; a rerun that skips finished runs, resumes an interrupted
one and retrains a deleted one to the same figures; bad grids refused before anything trains."""

import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import pytest

from minigrok.cli import main
from minigrok.model import MiniGrok

GRID = ["--base", "tiny", "--vary", "model.n_kv_heads=1,2", "--seeds", "1,2", "--budget", "steps=8", "--threads", "1"]
SMALL = ["train.seq_len=32", "train.batch_size=4", "train.ckpt_every=4", "train.eval_every=4", "train.log_every=2"]
SMALL += ["train.dtype=fp32", "train.peak_flops=1e11"]  # nothing measured at start: each run starts sooner
RUNS = ["n_kv_heads=1,seed=1", "n_kv_heads=1,seed=2", "n_kv_heads=2,seed=1", "n_kv_heads=2,seed=2"]


def command(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "minigrok.cli",
        "ablate",
        *args,
        *(part for pair in SMALL for part in ("--set", pair)),
    ]


def ablate(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command(*args), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def final_bpb(run_dir) -> float:
    return [record for record in records(run_dir) if "val_bpb" in record][-1]["val_bpb"]


def check_results(out) -> None:
    """results.csv holds one row per variant, each figure the runs' own: final val bpb, logged tokens/s, parameters
    counted on the trained weights, KV bytes of a bf16 cache by hand."""
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["model.n_kv_heads"] for row in rows] == ["1", "2"]
    for row, names in zip(rows, (RUNS[:2], RUNS[2:]), strict=True):
        assert row["runs"] == " ".join(names)
        bpb = [final_bpb(out / name) for name in names]
        assert float(row["val_bpb_mean"]) == pytest.approx(statistics.fmean(bpb), rel=1e-12)
        assert (float(row["val_bpb_min"]), float(row["val_bpb_max"])) == (min(bpb), max(bpb))
        rates = [statistics.fmean(r["tokens_per_s"] for r in records(out / name) if "loss" in r) for name in names]
        assert float(row["tokens_per_s"]) == pytest.approx(statistics.fmean(rates), rel=1e-9)
        model = MiniGrok.from_pretrained(out / names[0] / "ckpt-8")
        parameters = sum(p.numel() for p in model.parameters())
        assert int(row["params_unique"]) == int(row["params_total"]) == int(row["params_active"]) == parameters
        config = model.config
        assert int(row["kv_bytes_per_token_bf16"]) == 2 * config.n_layers * config.n_kv_heads * config.head_dim * 2
        assert float(row["wall_time_s"]) > 0
    table = (out / "results.md").read_text()
    for row in rows:
        mean, low, high = (float(row[f"val_bpb_{key}"]) for key in ("mean", "min", "max"))
        assert f"| {row['model.n_kv_heads']} | " in table and f"{mean:.4f} ({low:.4f}–{high:.4f})" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ablation_table_then_a_rerun_skips_resumes_and_reproduces(corpus, tmp_path):
    out = tmp_path / "ablation"
    first = ablate(*GRID, "--data", str(corpus), "--out", str(out))
    assert [line.split(": ")[1] for line in first.stdout.splitlines() if line.startswith("[")] == ["training"] * 4
    check_results(out)
    shared = (out / "tokenizer.json").read_bytes()
    assert all((out / name / "tokenizer.json").read_bytes() == shared for name in RUNS)  # one tokenizer for all
    before = {name: final_bpb(out / name) for name in RUNS}
    assert before["n_kv_heads=1,seed=1"] != before["n_kv_heads=1,seed=2"]  # the seed matters

    interrupted, deleted = out / RUNS[2], out / RUNS[1]
    shutil.rmtree(interrupted / "ckpt-8")  # killed between its checkpoints: the log goes on past ckpt-4
    shutil.rmtree(deleted)
    kept = {name: (out / name / "log.jsonl").stat().st_mtime_ns for name in (RUNS[0], RUNS[3])}
    second = ablate(*GRID, "--data", str(corpus), "--out", str(out))
    states = [line.split(": ")[1] for line in second.stdout.splitlines() if line.startswith("[")]
    assert states == ["finished, skipped", "training", "resuming", "finished, skipped"]
    assert {name: (out / name / "log.jsonl").stat().st_mtime_ns for name in kept} == kept  # not retrained
    assert {name: final_bpb(out / name) for name in RUNS} == before  # resumed and retrained runs to the bit
    assert [r["step"] for r in records(interrupted) if "val_bpb" in r] == [4, 8]
    check_results(out)


def test_ctrl_c_stops_the_running_run_at_a_checkpoint_and_says_how_to_continue(corpus, tmp_path):
    out = tmp_path / "ablation"
    grid = ["--base", "tiny", "--vary", "model.n_kv_heads=1,2", "--budget", "steps=100000", "--threads", "1"]
    process = subprocess.Popen(
        command(*grid, "--data", str(corpus), "--out", str(out)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    log, deadline = out / "n_kv_heads=1,seed=0" / "log.jsonl", time.monotonic() + 120
    while not (log.is_file() and '"loss"' in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends: to the ablation and the run it trains
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "ablation stopped" in err and "rerun the same minigrok ablate command to continue" in err
    from minigrok.train.ablate import run_state

    assert run_state(log.parent) == "interrupted"  # a checkpoint of the step it stopped at, to resume from
    assert (out / "tokenizer.json").is_file() and not (out / "results.md").exists()


@pytest.mark.parametrize(
    ("vary", "message"),
    [
        ("model.n_kv_head=1,2", "did you mean 'n_kv_heads'?"),
        ("model.n_kv_heads=1,3", "--vary model.n_kv_heads=3: n_kv_heads=3 does not divide n_heads=4: choose"),
        ("model.share=none,bogus", "--vary model.share=bogus: share='bogus' is unknown: choose one of"),
        ("model.n_kv_heads", "is not field=v1,v2,...: write e.g. --vary model.n_kv_heads=1,2,4"),
        ("model.n_kv_heads=2,2", "lists an empty or repeated value"),
        ("train.seed=1,2", "give the seeds with --seeds"),
        ("train.max_steps=4,8", "give it with --budget"),
    ],
)
def test_a_bad_grid_is_refused_before_anything_trains(tmp_path, capsys, vary, message):
    out = tmp_path / "ablation"
    assert main(["ablate", "--base", "tiny", "--vary", vary, "--budget", "steps=4", "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_changed_budget_is_refused_in_an_existing_ablation_more_seeds_are_not(tmp_path, capsys):
    from minigrok.train.ablate import check_spec, grid, spec

    out, variants = tmp_path / "ablation", grid({"model.n_kv_heads": ["1", "2"]})
    check_spec(out, spec("tiny", [], variants, "steps=4", [0], None, None, "bpe"))
    check_spec(out, spec("tiny", [], variants, "steps=4", [0, 1], None, None, "bpe"))
    command = ["ablate", "--base", "tiny", "--vary", "model.n_kv_heads=1,2", "--out", str(out), "--budget", "steps=6"]
    assert main(command) == 2
    assert "whose --budget is 'steps=4', but this one's is 'steps=6'" in capsys.readouterr().err
    assert [path.name for path in out.iterdir()] == ["ablation.json"]  # nothing trained


def test_listed_variants_train_the_base_and_each_variant_as_given(corpus, tmp_path):
    out = tmp_path / "ablation"
    variants = ["--variant", "model.n_kv_heads=1", "--variant", "n_kv_heads=1,train.lr=0.01"]
    ablate(
        "--base",
        "tiny",
        *variants,
        "--budget",
        "steps=4",
        "--seeds",
        "3",
        "--threads",
        "1",
        "--data",
        str(corpus),
        "--out",
        str(out),
    )
    names = ["base,seed=3", "n_kv_heads=1,seed=3", "n_kv_heads=1,lr=0.01,seed=3"]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(row["model.n_kv_heads"], row["train.lr"], row["runs"]) for row in rows] == [
        ("—", "—", names[0]),
        ("1", "—", names[1]),
        ("1", "0.01", names[2]),
    ]
    trained = [json.loads((out / name / "ckpt-4" / "trainer_state.json").read_text()) for name in names]
    base_kv_heads = MiniGrok.from_pretrained(out / names[0] / "ckpt-4").config.n_kv_heads
    assert base_kv_heads != 1  # the base row really is the base config, not the first variant's
    assert [MiniGrok.from_pretrained(out / name / "ckpt-4").config.n_kv_heads for name in names[1:]] == [1, 1]
    assert trained[2]["train_config"]["lr"] == 0.01 != trained[1]["train_config"]["lr"]
    for row, name in zip(rows, names, strict=True):
        assert float(row["val_bpb_mean"]) == final_bpb(out / name)
    table = (out / "results.md").read_text()
    assert "| — | — | " in table and "| +0.00 % |" in table and "—: the base config's value" in table
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        (["model.n_kv_heads"], "is not field=value[,field=value...]: write e.g. --variant model.qk_norm=true"),
        (["n_kv_heads=1,n_kv_heads=2"], "sets model.n_kv_heads twice"),
        (["n_kv_heads=1", "model.n_kv_heads=1"], "is given twice"),
        (["train.seed=4"], "give the seeds with --seeds"),
        (["model.n_kv_head=1"], "did you mean 'n_kv_heads'?"),
        (["n_kv_heads=3"], "--variant model.n_kv_heads=3: n_kv_heads=3 does not divide n_heads=4"),
    ],
)
def test_a_bad_variant_is_refused_before_anything_trains(tmp_path, capsys, variants, message):
    out = tmp_path / "ablation"
    command = ["ablate", "--base", "tiny", *(part for v in variants for part in ("--variant", v)), "--out", str(out)]
    assert main(command) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_grid_and_listed_variants_are_not_mixed(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["ablate", "--vary", "model.n_kv_heads=1,2", "--variant", "model.n_kv_heads=1"])
    assert raised.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
