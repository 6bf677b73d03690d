"""Which benchmark times are trusted, how the table, JSON and CSV say so, and what the plot leaves out: all on
injected clocks and samples, never on the wall clock."""

import csv
import itertools
import json

import pytest
import torch

from minigrok.bench import bench_kernels, kernels
from minigrok.bench.kernels import flag_modes_out_of_line
from minigrok.bench.output import format_table, plotted_rows
from minigrok.bench.timing import UNSTABLE_HINT, Timing, clock_resolution, sample_seconds
from minigrok.cli import main

US = 1e-6


@pytest.mark.parametrize(
    "samples_s,resolution_s,note",
    [
        ([100 * US, 102 * US, 98 * US, 101 * US, 99 * US], 50e-9, ""),
        ([340 * US, 360 * US, 64e-3, 64e-3, 350 * US, 64e-3], 50e-9, "unstable: p80 is 182.9x p20"),  # lost ticks
        ([40 * US] * 5, 4e-3, "unstable: 0.04 ms is under 20 steps of a 4 ms clock"),  # a 4 ms clock
        ([0.0] * 5, 4e-3, "unstable: 0 ms is under 20 steps of a 4 ms clock"),  # the clock never moved
        ([0.0, 0.0, 4e-3, 4e-3, 4e-3], 4e-3, "unstable: p80 is 4 ms, p20 is 0"),
    ],
)
def test_wide_spreads_and_times_of_a_few_clock_steps_are_unstable(samples_s, resolution_s, note):
    timing = Timing.of(samples_s, resolution_s)
    assert (timing.note, timing.stable) == (note, note == "")


def test_the_clock_step_and_the_samples_come_from_the_clock_given():
    ticks = itertools.count(0, 4e-3)  # a clock that moves only in 4 ms steps
    assert clock_resolution(lambda: next(ticks)) == pytest.approx(4e-3)

    class FakeClock:
        now = 0.0

    durations = iter([1e-3, 5e-3, 2e-3])

    def call():
        FakeClock.now += next(durations)

    assert sample_seconds(call, 3, torch.device("cpu"), lambda: FakeClock.now) == pytest.approx([1e-3, 5e-3, 2e-3])


def test_a_mode_out_of_line_with_the_others_is_unstable_however_tight_its_spread():
    def row(provider, mode, median_ms):
        return {"provider": provider, "shape": "s", "x": 1, "mode": mode, "median_ms": median_ms, "stable": True}

    rows = [
        *(row("causal", mode, ms) for mode, ms in [("fwd", 0.03), ("bwd", 0.06), ("fwd+bwd", 12.0)]),
        *(row("fine", mode, ms) for mode, ms in [("fwd", 0.03), ("bwd", 0.06), ("fwd+bwd", 0.2)]),
        *(row("no-bwd", mode, ms) for mode, ms in [("fwd", 24.0), ("fwd+bwd", 0.09)]),
        row("alone", "fwd", 50.0),
    ]
    flag_modes_out_of_line(rows)
    unstable = {(r["provider"], r["mode"]): r["note"] for r in rows if not r["stable"]}
    assert unstable == {
        ("causal", "fwd+bwd"): "unstable: 133x what its other modes allow",
        ("no-bwd", "fwd"): "unstable: 267x what its other modes allow",
    }


@pytest.fixture
def injected_times(monkeypatch):
    """Every timed provider gets the samples set in `injected_times.samples_s`, timed by a 50 ns clock."""

    class Injected:
        samples_s = [100 * US] * 5

    monkeypatch.setattr(kernels, "measure_timing", lambda call, device, repeats: Timing.of(Injected.samples_s, 50e-9))
    return Injected


def test_unstable_times_are_marked_in_table_json_and_csv_with_the_remedy_once(injected_times, tmp_path, capsys):
    injected_times.samples_s = [100 * US, 100 * US, 4.1e-3, 4.1e-3, 100 * US]
    argv = ["bench", "kernels", "rms_norm", "--quick", "--providers", "torch", "--repeats", "5", "--mode", "fwd"]
    assert main([*argv, "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv")]) == 0
    table = capsys.readouterr().out
    header, *lines = table.splitlines()
    assert header.split()[-2:] == ["stable", "note"]
    assert [line.split()[-6:] for line in lines[:2]] == [["no", "unstable:", "p80", "is", "41.0x", "p20"]] * 2
    assert table.count(UNSTABLE_HINT) == 1 and "--threads 1 --repeats" in UNSTABLE_HINT
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [(r["stable"], r["note"]) for r in rows] == [(False, "unstable: p80 is 41.0x p20")] * 2
    with open(tmp_path / "r.csv", newline="") as file:
        assert [r["stable"] for r in csv.DictReader(file)] == ["False", "False"]


def test_stable_times_add_no_column_and_no_remedy(injected_times):
    rows = bench_kernels("swiglu", quick=True, mode="fwd", providers=["torch"], repeats=5)
    assert all(row["stable"] is True and row["note"] == "" for row in rows)
    table = format_table(rows)
    assert "stable" not in table and UNSTABLE_HINT not in table


def test_interpreter_rows_stay_out_of_time_panels_but_show_their_memory(injected_times):
    rows = bench_kernels("linear_cross_entropy", quick=True, mode="fwd", sizes=[64], repeats=1)
    assert {row["provider"] for row in rows} == {"naive", "triton", "torch-chunked"}
    for metric in ("median_ms", "p20_ms", "p80_ms", "tflops"):
        assert {row["provider"] for row in plotted_rows(rows, metric)} == {"naive", "torch-chunked"}, metric
    assert {row["provider"] for row in plotted_rows(rows, "peak_mb")} == {"naive", "triton", "torch-chunked"}
    assert plotted_rows(rows, "gbps") == []  # this op has no byte count: nothing to draw


def test_bench_train_names_the_unstable_step_times_with_the_remedy(monkeypatch, capsys):
    import minigrok.bench

    figures = {"step_s_median": 0.1, "step_stable": True, "naive_loss_step_stable": False}
    monkeypatch.setattr(minigrok.bench, "bench_train", lambda *args, **kwargs: figures)
    assert main(["bench", "train", "--config", "tiny", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "step times of naive_loss are unstable: rerun with --threads 1 and more --steps" in out
    figures["naive_loss_step_stable"] = True
    assert main(["bench", "train", "--config", "tiny", "--steps", "3"]) == 0
    assert "unstable" not in capsys.readouterr().out
