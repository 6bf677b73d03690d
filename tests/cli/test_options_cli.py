"""The architecture options as a user sets them: train with --set, generate from the run, export-hf's refusal."""

from minigrok import MiniGrok
from minigrok.cli import main

OPTIONS = ["model.qk_norm=true", "model.mlp=relu2", "model.zero_init_proj=true", "model.embed_dim=32"]


def test_train_generate_and_export_with_the_options(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--config", "tiny", "--data", str(corpus), "--tokenizer", "byte", "--out", str(out)]
    settings = [flag for option in OPTIONS for flag in ("--set", option)]
    train = ["--set", "train.max_steps=12", "--set", "train.dtype=fp32", "--samples", "0"]
    assert main(args + settings + train) == 0
    printed = capsys.readouterr().out
    assert "qk_norm, mlp=relu2, zero_init_proj, embed_dim=32" in printed  # the report before training
    model = MiniGrok.from_pretrained(out / "ckpt-12")
    assert model.config.qk_norm and model.config.mlp == "relu2" and model.config.embed_dim == 32
    assert model.blocks[0].attn.o_proj.weight.abs().max() > 0  # trained away from its zero init
    generate = ["generate", "--checkpoint", str(out), "--prompt", "def ", "--max-new-tokens", "6", "--seed", "0"]
    assert main([*generate, "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert main(["export-hf", "--checkpoint", str(out), "--out", str(tmp_path / "hf")]) == 2
    assert "mlp='relu2'" in capsys.readouterr().err
