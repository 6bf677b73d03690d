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


def test_bench_train_times_muon_beside_adamw():
    args = ["--config", "tiny", "--batch-size", "2", "--seq-len", "32", "--steps", "1", "--dtype", "fp32"]
    result = bench_cli("train", *args, "--compare", "muon")
    assert result["muon_tokens_per_s"] > 0 and result["muon_peak_mb"] > 0
    assert result["muon_step_vs_ours"] == result["muon_step_s_median"] / result["step_s_median"]


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


def test_tracker_holds_every_activation_autograd_saves_and_checkpointing_frees_them():
    from minigrok import MiniGrok, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=384, dim=48, n_layers=5, n_heads=4, n_kv_heads=2, ffn_dim=112, max_seq_len=64)
    model = MiniGrok(config)
    ids = torch.randint(0, config.vocab_size, (3, 41))
    made_before = {id(t.untyped_storage()) for t in (ids, *model.parameters())}  # the tracker counts what is new
    live_after_forward = {}
    for mode in ("none", "full"):
        model.activation_checkpointing = mode
        saved: dict[int, int] = {}  # storages autograd keeps for backward, made in the forward

        def pack(tensor, saved=saved):
            storage = tensor.untyped_storage()
            if id(storage) not in made_before:
                saved[id(storage)] = storage.nbytes()
            return tensor

        with LiveTensorBytes() as tracker:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
            live_after_forward[mode] = tracker.live
            assert tracker.live >= sum(saved.values()) > 0, mode  # every saved activation is counted as live
            loss.backward()
        model.zero_grad(set_to_none=True)
        del loss
    assert live_after_forward["full"] < live_after_forward["none"] / 2  # full keeps each block's input alone


def bench_cli(*args: str) -> dict:
    """`python -m minigrok.cli bench ... --json` in a subprocess (so --threads stays its own); the JSON written."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "minigrok.cli", "bench", *args, "--json", str(out)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return json.loads(out.read_text())


def test_bench_train_nproc_runs_ddp_processes_beside_one_process_on_their_threads():
    args = ["--config", "tiny", "--batch-size", "4", "--seq-len", "32", "--steps", "2", "--dtype", "fp32"]
    result = bench_cli("train", *args, "--nproc", "2", "--threads", "2")
    assert (result["nproc"], result["threads"], result["threads_per_process"]) == (2, 2, 1)
    for key in ("ddp_tokens_per_s", "threads_tokens_per_s", "ratio_ddp_vs_threads", "ddp_mfu", "threads_mfu"):
        assert result[key] > 0, key


def test_bench_train_measures_checkpointing_side_by_side():
    args = ["--config", "tiny", "--set", "n_layers=6", "--batch-size", "4", "--seq-len", "64", "--steps", "1"]
    result = bench_cli("train", *args, "--dtype", "fp32", "--compare", "checkpointing-full", "checkpointing-selective")
    assert result["activation_checkpointing"] == "none"
    for mode in ("full", "selective"):
        assert result[f"checkpointing_{mode}_tokens_per_s"] > 0 and result[f"checkpointing_{mode}_peak_mb"] > 0
        assert 0 < result[f"checkpointing_{mode}_peak_vs_ours"] < 1, mode  # memory, not time: it must shrink
    assert result["checkpointing_full_peak_vs_ours"] < result["checkpointing_selective_peak_vs_ours"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--nproc", "2", "--threads", "3"], "set --threads to a multiple of 2"),
        (["--nproc", "2", "--threads", "2", "--batch-size", "3"], "--batch-size 3 is the global batch"),
        (["--nproc", "2", "--compare", "hf"], "drop --compare"),
        (["--activation-checkpointing", "full", "--compare", "checkpointing-full"], "what ours already runs"),
    ],
)
def test_bench_train_refuses_contradictions_with_the_fix(argv, message, capsys):
    assert main(["bench", "train", "--config", "tiny", "--dtype", "fp32", "--steps", "1", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_data_times_encoding_and_the_sampler(tmp_path):
    for index in range(3):
        (tmp_path / f"part{index}.py").write_text(
            "".join(f"def f_{index}_{n}(x):\n    return x - {n}\n\n" for n in range(80))
        )
    sizes = "3000,50000"
    argv = ["data", "--data", str(tmp_path), "--tokenizer", "byte", "--sizes", sizes, "--shard-tokens", "4096"]
    result = bench_cli(*argv, "--batch-size", "4", "--seq-len", "64", "--batches", "5")
    assert [row["workers"] for row in result["encoding"]] == [1, 2]
    for row in result["encoding"]:
        assert row["mb_per_s"] > 0 and row["tokens_per_s"] > 0 and row["n_tokens"] > 0
    assert [(row["n_tokens"], row["shards"]) for row in result["sampler"]] == [(3000, 1), (50000, 13)]
    assert all(row["us_per_batch"] > 0 and row["tokens_per_s"] > 0 for row in result["sampler"])
