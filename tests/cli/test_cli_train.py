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
    out = capsys.readouterr().out
    assert "step 12: val loss" in out and "--- sample 1 ---" in out
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
    assert main(["eval", "--checkpoint", str(run / "ckpt-16"), "--data", str(corpus / "part0.py")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 < metrics["val_bpb"] < 8 and metrics["tokens"] > 0
    assert main(["plot", str(run), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_train_errors(tmp_path, corpus, capsys):
    base = ["train", "--config", "tiny", "--data", str(corpus), "--out", str(tmp_path / "run")]
    assert main(base + ["--resume"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert main(base + ["--set", "train.dtype=fp64"]) == 2
    assert "train.dtype='fp64' is unknown" in capsys.readouterr().err
    assert main(base + ["--set", "model.vocab_size=100"]) == 2
    assert "model.vocab_size" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
