"""`minigrok bench kernels` on CPU (Triton in the interpreter) and the CPU peak-memory tracker it reports with."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as torch_F

import minigrok.functional as F
from minigrok.bench import INTERPRETER_NOTE, KERNEL_SPECS, LiveTensorBytes
from minigrok.cli import main

MIB = 1 << 20
COLUMNS = [
    "op", "provider", "mode", "x_name", "x", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "tflops", "gbps",
    "peak_mb", "speedup", "max_err", "stable", "note", "device", "threads", "torch", "triton", "timestamp",
]  # fmt: skip
NOT_ON_CPU = {"sdpa-efficient", "sdpa-cudnn"}


def test_tracker_counts_the_peak_of_live_bytes_exactly():
    x = torch.randn(MIB // 4)  # 1 MiB made before the block: its views and in-place updates add nothing
    with LiveTensorBytes() as tracker:
        a = torch.empty(MIB, dtype=torch.uint8)
        del a
        kept = torch.empty(3 * MIB, dtype=torch.uint8)
        x.view(-1, 2).add_(1)
    assert (tracker.peak, tracker.live) == (3 * MIB, 3 * MIB)
    with LiveTensorBytes() as tracker:
        out = F.swiglu(x, x, backend="torch")  # silu(x) is a 1 MiB temporary, live beside the 1 MiB output
    assert (tracker.peak, tracker.live) == (2 * MIB, MIB)
    del kept, out


def test_tracker_follows_the_backward_pass():
    x = torch.randn(MIB // 4, requires_grad=True)
    with LiveTensorBytes() as tracker:
        y = x.exp()  # kept for backward
        (grad,) = torch.autograd.grad(y.sum(), x)  # grad = dy * y: a second MiB, plus two 4-byte scalars
    assert tracker.peak == 2 * MIB + 8
    del y, grad
    assert tracker.live == 0  # every storage it counted has been freed


@pytest.mark.parametrize("op", list(KERNEL_SPECS))
def test_quick_sweep_writes_one_row_per_provider_mode_and_size(op, tmp_path, capsys):
    assert (
        main(["bench", "kernels", op, "--quick", "--device", "cpu", "--repeats", "2", "--out-dir", str(tmp_path)]) == 0
    )
    assert INTERPRETER_NOTE in capsys.readouterr().out
    spec = KERNEL_SPECS[op](torch.device("cpu"), torch.float32, quick=True)
    expected = {(p, m, c.shape, c.x) for c in spec.cases for p in spec.providers for m in spec.modes}
    rows = json.loads((tmp_path / f"{op}.json").read_text())
    assert {(r["provider"], r["mode"], r["shape"], r["x"]) for r in rows} == expected and len(rows) == len(expected)
    with open(tmp_path / f"{op}.csv", newline="") as file:
        table = list(csv.DictReader(file))
    assert list(table[0]) == COLUMNS and len(table) == len(rows) and all(list(r) == COLUMNS for r in rows)
    for row in rows:
        if row["provider"] in NOT_ON_CPU:
            assert row["median_ms"] is None and row["note"].startswith("skipped: ")
            continue
        assert row["median_ms"] > 0 and row["peak_mb"] > 0 and row["max_err"] < 1e-4, row
        if row["provider"] in spec.triton:
            assert row["note"] == INTERPRETER_NOTE and row["stable"] is None
        else:  # real clocks on a shared machine: either verdict may come, but it comes with its reason
            assert row["stable"] is (row["note"] == "") and (row["stable"] or row["note"].startswith("unstable: "))
        assert (row["speedup"] is None) == (row["provider"] in spec.triton)
    assert (tmp_path / f"{op}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explicit_paths_mode_and_providers(tmp_path):
    argv = ["bench", "kernels", "rms_norm", "--quick", "--mode", "fwd", "--providers", "torch", "--repeats", "2"]
    assert main([*argv, "--json", str(tmp_path / "r.json"), "--sizes", "32,96"]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [(r["provider"], r["mode"], r["x"]) for r in rows] == [("torch", "fwd", 32), ("torch", "fwd", 96)]
    assert not (tmp_path / "r.csv").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["rope", "--gqa", "2"], "rope has no option --gqa"),
        (["linear_cross_entropy", "--mode", "bwd"], "modes ('fwd', 'fwd+bwd'), not 'bwd'"),
        (["swiglu", "--providers", "liger"], "no provider ['liger']"),
        (["attention", "--gqa", "3"], "--gqa [3]"),
    ],
)
def test_bad_options_exit_2_with_the_fix(argv, message, capsys):
    assert main(["bench", "kernels", *argv, "--quick", "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_chunked_linear_cross_entropy_peak_is_under_a_quarter_of_naive(capsys):
    tokens, hidden, vocab = 8192, 256, 32768
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=generator, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=generator) * hidden**-0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    providers = {
        "torch-chunked": lambda: F.linear_cross_entropy(h, w, targets, backend="torch"),
        "naive": lambda: torch_F.cross_entropy((h @ w.T).float(), targets),
    }
    peaks = {}
    for name, loss in providers.items():
        with LiveTensorBytes() as tracker:
            torch.autograd.grad(loss(), (h, w))
        peaks[name] = tracker.peak
    with capsys.disabled():
        print(f"\nLCE peak, {tokens} tokens x vocab {vocab} x hidden {hidden} fp32: "
              + ", ".join(f"{name} {peak / MIB:.1f} MiB" for name, peak in peaks.items()))  # fmt: skip
    assert peaks["naive"] >= tokens * vocab * 4  # the fp32 logits alone
    assert peaks["torch-chunked"] <= peaks["naive"] / 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CLI picks the interpreter only when no GPU is present")
def test_cli_turns_the_interpreter_on_by_itself():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    argv = ["bench", "kernels", "swiglu", "--quick", "--mode", "fwd", "--sizes", "64", "--repeats", "1"]
    done = subprocess.run([sys.executable, "-m", "minigrok.cli", *argv], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert INTERPRETER_NOTE in done.stdout and "skipped" not in done.stdout
