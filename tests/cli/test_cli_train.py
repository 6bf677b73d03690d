"""`minigrok train / generate / eval / plot` end to end on the tiny preset in a temporary directory."""

import json

import pytest

from minigrok.cli import main
from minigrok.train.tokenizer import Tokenizer


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for index in range(6):
        (root / f"part{index}.py").write_text(
            "".join(f"def function_{index}_{n}(x):\n    return x * {n} + {index}\n\n" for n in range(60))
        )
    return root


@pytest.mark.parametrize("tokenizer", ["bpe", "byte"])
def test_train_generate_eval_plot(tmp_path, corpus, capsys, tokenizer):
    run = tmp_path / "run"
    args = ["train", "--config", "tiny", "--data", str(corpus), "--tokenizer", tokenizer, "--out", str(run)]
    assert main(args + ["--set", "train.max_steps=12", "--samples", "1", "--sample-tokens", "8"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "step 12: val loss" in out and "--- sample 1 ---" in out
    # auto measured the dtype for real: said on the console, logged with its figures, recorded with the run
    assert "dtype: " in out and ", auto (measured in" in out and "matmul peak (" in out
    first = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    # On a loaded machine the time-capped probe may time only one candidate; the chosen one is always timed.
    measured = set(first["dtype_gflops"])
    assert (
        first["dtype_source"] == "auto" and first["dtype"] in measured <= {"fp32", "bf16"} and first["peak_flops"] > 0
    )
    state = json.loads((run / "ckpt-12" / "trainer_state.json").read_text())
    assert state["dtype"] == first["dtype"] in ("fp32", "bf16")
    assert "dtype: " in captured.err  # the samples' own (inference) choice
    config = json.loads((run / "ckpt-12" / "config.json").read_text())
    vocab = Tokenizer.load(run / "tokenizer.json").vocab_size
    assert config["vocab_size"] % 64 == 0 and vocab <= config["vocab_size"] < vocab + 64  # follows the tokenizer
    assert main(args) == 2  # the run exists: refuse to overwrite it without --resume
    assert "pass --resume" in capsys.readouterr().err
    assert main(args + ["--resume", "--set", "model.dim=64"]) == 2
    assert "--resume keeps the checkpoint's model" in capsys.readouterr().err
    assert main(args + ["--resume", "--set", "train.max_steps=16", "--samples", "0"]) == 0
    assert "step 16: val loss" in capsys.readouterr().out

    assert (
        main(["generate", "--checkpoint", str(run), "--prompt", "def ", "--max-new-tokens", "10", "--seed", "0"]) == 0
    )
    assert capsys.readouterr().out.startswith("def ")
    evaluate = ["eval", "--checkpoint", str(run / "ckpt-16"), "--data", str(corpus / "part0.py")]
    assert main(evaluate) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 < metrics["val_bpb"] < 8 and metrics["tokens"] > 0 and metrics["dtype"] in ("fp32", "bf16")
    assert 0 < metrics["val_tokens"] < metrics["tokens"]  # the split's tokens, and those scored (windows that fit)
    assert main(evaluate + ["--max-tokens", "64", "--seq-len", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["val_tokens"] == 64  # two windows of 32 predicted tokens
    by_dtype = {}
    for dtype in ("fp32", "bf16"):
        assert main(evaluate + ["--dtype", dtype]) == 0
        captured = capsys.readouterr()
        by_dtype[dtype] = json.loads(captured.out)
        assert by_dtype[dtype]["dtype"] == dtype and f"dtype: {dtype}, explicit" in captured.err
    assert by_dtype["bf16"]["val_bpb"] == pytest.approx(by_dtype["fp32"]["val_bpb"], rel=0.02)
    assert by_dtype["fp32"]["val_bpb"] != by_dtype["bf16"]["val_bpb"]  # bf16 really ran in bf16
    assert main(["plot", str(run), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_train_errors(tmp_path, corpus, capsys):
    base = ["train", "--config", "tiny", "--data", str(corpus), "--out", str(tmp_path / "run")]
    assert main(base + ["--resume"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert main(base + ["--set", "train.dtype=fp64"]) == 2
    assert "train.dtype='fp64' is unknown" in capsys.readouterr().err
    assert main(base + ["--set", "train.dtype=fp16", "--set", "train.device=cpu"]) == 2
    assert "train.dtype=fp16 is not supported on cpu (fp16 needs loss scaling" in capsys.readouterr().err
    assert main(base + ["--set", "model.vocab_size=100"]) == 2
    assert "model.vocab_size" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err


def test_auto_dtype_is_recorded_and_kept_on_resume(tmp_path, corpus, capsys, measured):
    run = tmp_path / "run"
    args = ["train", "--config", "tiny", "--data", str(corpus), "--out", str(run), "--samples", "0"]
    measured.rates = {"fp32": 40e9, "bf16": 120e9}
    assert main(args + ["--set", "train.max_steps=4"]) == 0
    assert "dtype: bf16, auto (measured in 0.01 s: fp32 40.0 GFLOP/s, bf16 120.0 GFLOP/s)" in capsys.readouterr().out
    assert json.loads((run / "ckpt-4" / "trainer_state.json").read_text())["dtype"] == "bf16"

    measured.rates = {"fp32": 40e9, "bf16": 1e9}  # another machine, where bf16 is slow
    assert main(args + ["--resume", "--set", "train.max_steps=8"]) == 0
    out = capsys.readouterr().out
    assert "dtype: bf16, resumed" in out and "this machine measures fp32 fastest; the run keeps its bf16" in out
    assert json.loads((run / "ckpt-8" / "trainer_state.json").read_text())["dtype"] == "bf16"
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["dtype_source"]) for r in records if "dtype_source" in r] == [(0, "auto"), (4, "resumed")]

    assert main(args + ["--resume", "--set", "train.max_steps=12", "--set", "train.dtype=fp32"]) == 0
    assert "continues in fp32 as asked, so not bit for bit" in capsys.readouterr().out
    assert json.loads((run / "ckpt-12" / "trainer_state.json").read_text())["dtype"] == "fp32"


def test_explicit_bf16_that_is_slow_here_is_honoured_with_a_warning(tmp_path, corpus, capsys, measured):
    measured.rates = {"fp32": 46.5e9, "bf16": 1e9}
    args = ["train", "--config", "tiny", "--data", str(corpus), "--out", str(tmp_path / "run"), "--samples", "0"]
    assert main(args + ["--set", "train.max_steps=2", "--set", "train.dtype=bf16"]) == 0
    out = capsys.readouterr().out
    assert "dtype: bf16, explicit" in out and "warning: bf16 measured 46.5x slower than fp32" in out


@pytest.mark.parametrize("tokenizer", ["bpe", "byte"])
def test_export_hf_takes_a_run_directory_and_its_tokenizer_loads_in_transformers(tmp_path, corpus, tokenizer, capsys):
    transformers = pytest.importorskip("transformers", reason="checked against transformers (dev extra)")
    run, out = tmp_path / "run", tmp_path / "hf"
    args = ["train", "--config", "tiny", "--data", str(corpus), "--tokenizer", tokenizer, "--out", str(run)]
    assert main(args + ["--set", "train.max_steps=2", "--samples", "0"]) == 0
    assert main(["export-hf", "--checkpoint", str(run), "--out", str(out)]) == 0
    assert "and its tokenizer" in capsys.readouterr().out
    ours = Tokenizer.load(run / "tokenizer.json")
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    text = "def naïve(x):\n    return x ** 2  # ✓ 日本\n"
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
    assert theirs.decode(ours.encode(text)) == text
    assert theirs.eos_token_id == ours.eos_id
    assert transformers.LlamaForCausalLM.from_pretrained(out).config.vocab_size % 64 == 0


def test_eval_of_a_one_byte_file_and_an_undecodable_prompt(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    args = ["train", "--config", "tiny", "--data", str(corpus), "--tokenizer", "byte", "--out", str(run)]
    assert main(args + ["--set", "train.max_steps=2", "--samples", "0"]) == 0
    (tmp_path / "one.txt").write_text("x")
    assert main(["eval", "--checkpoint", str(run), "--data", str(tmp_path / "one.txt")]) == 2
    assert "holds 1 token(s): eval needs at least 2" in capsys.readouterr().err
    prompt = b"caf\xe9 ".decode("utf-8", errors="surrogateescape")  # a Latin-1 byte, as argv carries it
    assert main(["generate", "--checkpoint", str(run), "--prompt", prompt, "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("caf\ufffd ")


def test_a_fresh_start_drops_the_log_of_a_start_that_never_checkpointed(tmp_path, corpus):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps({"step": 7, "loss": 9.5}) + "\n")  # died before its first checkpoint
    args = ["train", "--config", "tiny", "--data", str(corpus), "--tokenizer", "byte", "--out", str(run)]
    assert main(args + ["--samples", "0", "--set", "train.max_steps=2", "--set", "train.log_every=1"]) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
