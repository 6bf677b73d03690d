"""The `minigrok` command line, run in-process and as the installed console script."""

import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch

from minigrok import MiniGrok, ModelConfig
from minigrok.cli import main
from minigrok.train.config import RUN_SECTIONS


def test_info_reports_a_preset_with_overrides(capsys):
    assert main(["info", "--config", "tiny", "--set", "model.share=all", "--set", "n_layers=4", "--context", "64"]) == 0
    out = capsys.readouterr().out
    assert "share: all" in out and "n_layers: 4" in out
    assert "forward FLOPs / token @ 64" in out and "unique parameters" in out
    for scheme in ("fp32", "bf16", "int8", "int8 + embedding", "int4 g64", "int4 g64 + embedding"):
        assert re.search(
            rf"weights {re.escape(scheme)} +[\d.]+ MiB on disk, [\d.]+ MiB resident, [\d,]+ KV B/token", out
        )


@pytest.mark.parametrize(
    "argv,message",
    [
        (["info", "--config", "huge"], "unknown preset 'huge'"),
        (["info", "--config", "tiny", "--set", "model.dimm=3"], "did you mean 'dim'"),
        (["info", "--config", "tiny", "--set", "optim.lr=3"], "unknown section 'optim'"),
        (["info", "--config", "tiny", "--set", "dim"], "not key=value"),
        (["info", "--config", "tiny", "--set", "n_kv_heads=3"], "n_kv_heads=3 does not divide n_heads=4"),
    ],
)
def test_bad_arguments_exit_2_with_the_fix(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,sections", [(["info"], ["model"]), (["bench", "train"], ["model"]), (["train"], ["model", "train"])]
)
def test_help_config_lists_every_field_with_its_default_and_meaning(capsys, argv, sections):
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--help-config"])
    assert exit.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    fields = [f"{section}.{field.name}" for section in sections for field in dataclasses.fields(RUN_SECTIONS[section])]
    assert [line.split()[0] for line in lines] == fields
    assert all(len(line.split(maxsplit=2)) == 3 for line in lines)  # name, default and a meaning on each line
    assert re.search(r"^model\.n_kv_heads +null +key/value heads", "\n".join(lines), re.MULTILINE)
    if "train" in sections:
        assert re.search(r"^train\.lr +0\.003 +peak learning rate$", "\n".join(lines), re.MULTILINE)


def test_a_benchmark_device_is_cpu_or_cuda(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["bench", "train", "--device", "mps"])
    assert exit.value.code == 2 and "'mps' is not a device: use cpu, cuda or cuda:N" in capsys.readouterr().err


def test_hf_round_trip_through_the_cli(tmp_path, capsys):
    pytest.importorskip("transformers", reason="the HF round trip is checked against transformers (dev extra)")
    torch.manual_seed(0)
    model = MiniGrok(ModelConfig.from_yaml("tiny"))
    model.save_pretrained(tmp_path / "ours")
    assert main(["export-hf", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    ids = torch.randint(0, 512, (1, 9))
    torch.testing.assert_close(MiniGrok.from_pretrained(tmp_path / "back")(ids).logits, model(ids).logits)


def test_console_script_and_light_import():
    code = (
        "import sys, minigrok; print(sorted(m for m in ('triton', 'transformers', 'matplotlib') if m in sys.modules))"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )
    run = subprocess.run(
        [sys.executable, "-m", "minigrok.cli", "info", "--config", "tiny"], capture_output=True, text=True
    )
    assert run.returncode == 0 and "unique parameters" in run.stdout


def test_bench_train_writes_every_figure(tmp_path, capsys):
    pytest.importorskip("transformers", reason="--compare hf times transformers' LlamaForCausalLM (dev extra)")
    path = tmp_path / "bench.json"
    argv = ["bench", "train", "--config", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16"]
    assert main(argv + ["--dtype", "bf16", "--compare", "hf", "naive-loss", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    figures = ("tokens_per_s", "mfu", "peak_mb", "hf_tokens_per_s", "ratio_vs_hf", "hf_fp32_tokens_per_s")
    for key in figures + ("ratio_vs_hf_fp32", "naive_loss_tokens_per_s", "naive_loss_peak_mb", "ratio_vs_naive_loss"):
        assert result[key] > 0, key
    assert result["ratio_vs_hf"] == pytest.approx(result["tokens_per_s"] / result["hf_tokens_per_s"])
    assert (result["dtype"], result["dtype_source"]) == ("bf16", "explicit")
    assert "ratio_vs_hf" in capsys.readouterr().out


def test_bench_train_auto_reports_the_choice_and_every_candidate(tmp_path, capsys):
    from minigrok.machine import choose_dtype

    path = tmp_path / "bench.json"
    argv = ["bench", "train", "--config", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16"]
    assert main(argv + ["--json", str(path)]) == 0  # --dtype auto is the default
    result = json.loads(path.read_text())
    assert result["dtype_source"] == "auto" and set(result["dtype_gflops"]) == {"fp32", "bf16"}
    assert result["dtype"] == choose_dtype({name: rate * 1e9 for name, rate in result["dtype_gflops"].items()})
    assert result["tokens_per_s"] > 0 and "dtype_gflops" in capsys.readouterr().out


def test_info_answers_from_arithmetic_whatever_the_size(capsys):
    assert main(["info", "--config", "tiny", "--set", "n_layers=1000000"]) == 0
    assert "total parameters" in capsys.readouterr().out


def test_bench_kernels_sweeps_attention_over_seq_lens(tmp_path):
    argv = ["bench", "kernels", "attention", "--quick", "--device", "cpu", "--mode", "fwd", "--providers", "ours-torch"]
    assert (
        main([*argv, "--causal", "on", "--repeats", "1", "--seq-lens", "24,40", "--json", str(tmp_path / "r.json")])
        == 0
    )
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [(row["x_name"], row["x"]) for row in rows] == [("seq_len", 24), ("seq_len", 40)]


@pytest.mark.parametrize(
    "op,flag,message",
    [
        (
            "attention",
            "--sizes",
            "--sizes does not apply to attention, which sweeps sequence lengths: give them with --seq-lens",
        ),
        (
            "rms_norm",
            "--seq-lens",
            "--seq-lens does not apply to rms_norm, which sweeps hidden sizes: give them with --sizes",
        ),
        (
            "linear_cross_entropy",
            "--seq-lens",
            "linear_cross_entropy, which sweeps vocab sizes: give them with --sizes",
        ),
    ],
)
def test_bench_kernels_refuses_the_other_ops_size_flag(capsys, op, flag, message):
    assert main(["bench", "kernels", op, flag, "64", "--quick", "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err


def test_bench_generate_matches_transformers_tokens_and_writes_every_figure(tmp_path, capsys):
    pytest.importorskip("transformers")
    path = tmp_path / "generate.json"
    argv = ["bench", "generate", "--config", "tiny", "--batch-sizes", "1,3", "--prompt-len", "9", "--new-tokens", "5"]
    assert main([*argv, "--repeats", "1", "--compare", "hf", "--threads", "1", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["greedy_tokens_match_hf"] is True and [row["batch_size"] for row in result["batches"]] == [1, 3]
    for row in result["batches"]:
        assert row["greedy_tokens_match_hf"] is True
        for prefix in ("", "hf_"):
            for key in ("prefill_s", "ttft_s", "generate_s", "decode_tokens_per_s", "peak_mb"):
                assert row[prefix + key] > 0, (prefix + key, row)
            assert isinstance(row[prefix + "stable"], bool)
        assert row["decode_ratio_vs_hf"] > 0 and row["prefill_ratio_vs_hf"] > 0
    assert "decode_tokens_per_s" in capsys.readouterr().out
