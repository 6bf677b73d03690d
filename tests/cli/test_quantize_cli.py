"""`minigrok quantize`, then `generate` and `eval` on the quantised checkpoint, as a user runs them."""

import json

import pytest
import torch

from minigrok import MiniGrok
from minigrok.cli import main
from minigrok.quantize import QuantizedLinear, load_quantized
from minigrok.train import qat


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """A tiny model trained briefly on the corpus (byte tokenizer, fp32: no dtype measurement)."""
    out = tmp_path_factory.mktemp("quantize") / "run"
    args = ["train", "--config", "tiny", "--data", str(corpus), "--tokenizer", "byte", "--out", str(out)]
    assert main(args + ["--set", "train.max_steps=30", "--set", "train.dtype=fp32", "--samples", "0"]) == 0
    return out


def evaluate(checkpoint, corpus, capsys, dtype="fp32") -> dict:
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(corpus / "part0.py"), "--dtype", dtype]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "flags,name,bpb_margin,limit",
    [
        (["--bits", "8"], "int8", 0.01, 0.60),
        (["--bits", "8", "--include-embedding"], "int8-emb", 0.01, 0.30),
        (["--bits", "4"], "int4-g64", 0.05, 0.50),
        (["--bits", "4", "--group-size", "32", "--include-embedding"], "int4-g32-emb", 0.05, 0.18),
    ],
)
def test_quantize_then_generate_and_eval(run, corpus, capsys, flags, name, bpb_margin, limit):
    float_metrics = evaluate(run, corpus, capsys)
    assert main(["quantize", "--checkpoint", str(run), *flags]) == 0
    out = capsys.readouterr().out
    qdir = run / f"ckpt-30-{name}"
    assert out.startswith(f"wrote {name} to {qdir}: model.safetensors")
    assert sorted(p.name for p in qdir.iterdir()) == [
        "config.json",
        "manifest.json",
        "model.safetensors",
        "quantization.json",
        "tokenizer.json",
    ]
    fp32_bytes = 4 * sum(t.numel() for t in MiniGrok.from_pretrained(run / "ckpt-30").state_dict().values())
    ratio = (qdir / "model.safetensors").stat().st_size / fp32_bytes
    assert ratio <= limit and f"{ratio:.3f} of the fp32 weights" in out
    model = load_quantized(qdir)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 8 + ("emb" in name)
    # the run directory's newest checkpoint is still the float one
    assert main(["generate", "--checkpoint", str(run), "--max-new-tokens", "2", "--dtype", "fp32"]) == 0
    capsys.readouterr()

    args = ["generate", "--checkpoint", str(qdir), "--prompt", "def ", "--max-new-tokens", "12", "--seed", "0"]
    assert main(args + ["--dtype", "fp32"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    metrics = evaluate(qdir, corpus, capsys)
    assert metrics["tokens"] == float_metrics["tokens"]
    assert (
        float_metrics["val_bpb"] * (1 - bpb_margin) < metrics["val_bpb"] < float_metrics["val_bpb"] * (1 + bpb_margin)
    )
    assert metrics["val_bpb"] != float_metrics["val_bpb"]  # the quantised weights really ran
    bf16 = evaluate(qdir, corpus, capsys, "bf16")
    assert abs(bf16["val_bpb"] - metrics["val_bpb"]) < 0.02 * metrics["val_bpb"]


def test_quantize_errors_exit_2_with_the_fix(run, corpus, capsys, tmp_path):
    assert main(["quantize", "--checkpoint", str(run), "--bits", "8", "--group-size", "64"]) == 2
    assert "group_size=64 applies to 4 bits only" in capsys.readouterr().err
    assert main(["quantize", "--checkpoint", str(run), "--bits", "8", "--out", str(run / "ckpt-30")]) == 2
    assert "is the checkpoint being quantised" in capsys.readouterr().err
    qdir = tmp_path / "q"
    assert main(["quantize", "--checkpoint", str(run), "--bits", "4", "--out", str(qdir)]) == 0
    assert main(["quantize", "--checkpoint", str(qdir), "--bits", "8", "--out", str(tmp_path / "qq")]) == 2
    assert "already quantised" in capsys.readouterr().err
    assert main(["export-hf", "--checkpoint", str(qdir), "--out", str(tmp_path / "hf")]) == 2
    assert "is quantised: the Llama layout takes float weights" in capsys.readouterr().err
    record = json.loads((qdir / "quantization.json").read_text())
    (qdir / "quantization.json").write_text(json.dumps(record | {"bits": 2}))
    assert main(["eval", "--checkpoint", str(qdir), "--data", str(corpus / "part0.py"), "--dtype", "fp32"]) == 2
    assert "does not match its sha256" not in (err := capsys.readouterr().err) and "bits=2 is not supported" in err
    (qdir / "quantization.json").write_text(json.dumps(record))
    weights = qdir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7] + b"\x00" * 7)
    assert main(["generate", "--checkpoint", str(qdir), "--max-new-tokens", "2", "--dtype", "fp32"]) == 2
    assert "does not match its sha256" in capsys.readouterr().err


def test_qat_run_exports_the_weights_it_trained_with(corpus, tmp_path, capsys):
    out = tmp_path / "qat"
    args = ["train", "--config", "tiny", "--data", str(corpus), "--tokenizer", "byte", "--out", str(out)]
    settings = ["train.max_steps=8", "train.ckpt_every=8", "train.dtype=fp32", "train.qat=int4"]
    settings += ["train.qat_group_size=32", "train.qat_start_step=5", "train.qat_include_embedding=true"]
    assert main(args + ["--samples", "0"] + [f"--set={setting}" for setting in settings]) == 0
    capsys.readouterr()
    assert main(["quantize", "--checkpoint", str(out)]) == 0  # bits, group and embedding from the run's QAT
    assert "was trained with train.qat=int4" in (printed := capsys.readouterr().out)
    assert f"wrote int4-g32-emb to {out / 'ckpt-8-int4-g32-emb'}" in printed
    quantized = load_quantized(out / "ckpt-8-int4-g32-emb")
    trained = MiniGrok.from_pretrained(out / "ckpt-8").state_dict()  # plain names, float32 master weights
    assert len(quantized.quantization.tensors) == 9
    for name in quantized.quantization.tensors:
        layer = quantized.get_submodule(name.removesuffix(".weight"))
        assert torch.equal(layer.weight, qat.FakeQuantize.apply(trained[name], 4, 32)), name
        assert not torch.equal(layer.weight, trained[name])
    # Other settings than the run trained for: done, with a warning.
    assert main(["quantize", "--checkpoint", str(out), "--bits", "4", "--no-include-embedding"]) == 0
    assert (
        "warning: quantising with {'bits': 4, 'group_size': 32, 'include_embedding': False}" in capsys.readouterr().err
    )
    # A float run needs --bits.
    plain = tmp_path / "plain"
    assert (
        main(
            [
                "train",
                "--config",
                "tiny",
                "--data",
                str(corpus),
                "--tokenizer",
                "byte",
                "--out",
                str(plain),
                "--samples",
                "0",
                "--set",
                "train.max_steps=2",
                "--set",
                "train.dtype=fp32",
            ]
        )
        == 0
    )
    assert main(["quantize", "--checkpoint", str(plain)]) == 2
    assert "was not trained with QAT (train.qat): give --bits 8 or --bits 4" in capsys.readouterr().err
