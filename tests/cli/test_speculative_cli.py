"""`minigrok generate --draft` and `bench generate --checkpoint --draft` on two tiny runs trained on one corpus."""

import json

import pytest

from minigrok.cli import main


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """A 2-layer target and a 1-layer, narrower draft, each trained briefly (byte tokenizer, fp32)."""
    root = tmp_path_factory.mktemp("speculative")
    common = ["--data", str(corpus), "--tokenizer", "byte", "--set", "train.max_steps=40", "--set", "train.dtype=fp32"]
    assert main(["train", "--config", "tiny", *common, "--out", str(root / "target"), "--samples", "0"]) == 0
    narrow = ["model.n_layers=1", "model.dim=32", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=64"]
    draft = [flag for value in narrow for flag in ("--set", value)]
    assert main(["train", "--config", "tiny", *common, *draft, "--out", str(root / "draft"), "--samples", "0"]) == 0
    return root / "target", root / "draft"


def test_generate_with_a_draft_prints_the_targets_greedy_text(runs, capsys):
    target, draft = runs
    argv = ["generate", "--checkpoint", str(target), "--prompt", "def function_2", "--temperature", "0"]
    argv += ["--max-new-tokens", "30", "--dtype", "fp32"]
    assert main(argv) == 0
    alone = capsys.readouterr().out
    assert main([*argv, "--draft", str(draft), "--num-draft-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert out == alone and out.startswith("def function_2")
    assert "drafted tokens accepted (acceptance_rate" in err


def test_bench_generate_reports_the_speculative_figures(runs, corpus, tmp_path, capsys):
    target, draft = runs
    path = tmp_path / "generate.json"
    argv = ["bench", "generate", "--checkpoint", str(target), "--draft", str(draft), "--num-draft-tokens", "3"]
    argv += ["--data", str(corpus / "part1.py")]  # the prompts: windows of this text
    argv += ["--batch-sizes", "1,2", "--prompt-len", "5", "--new-tokens", "12", "--repeats", "1", "--threads", "1"]
    assert main([*argv, "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["speculative_tokens_match_target"] is True and result["num_draft_tokens"] == 3
    assert result["prompts"] == "windows of text"
    for row in result["batches"]:
        assert row["speculative_tokens_match_target"] is True
        assert 0 <= row["acceptance_rate"] <= 1
        for key in ("speculative_generate_s", "speculative_tokens_per_s", "speedup_vs_target", "generate_s"):
            assert row[key] > 0, (key, row)
    assert "acceptance_rate" in capsys.readouterr().out


def test_bench_generate_takes_a_quantised_target_and_fails_on_differing_tokens(
    runs, corpus, tmp_path, capsys, monkeypatch
):
    target, draft = runs
    quantised = tmp_path / "int8"
    assert main(["quantize", "--checkpoint", str(target), "--bits", "8", "--out", str(quantised)]) == 0
    argv = ["bench", "generate", "--checkpoint", str(quantised), "--draft", str(draft), "--batch-sizes", "1"]
    argv += ["--data", str(corpus / "part2.py")]
    argv += ["--prompt-len", "4", "--new-tokens", "6", "--repeats", "1", "--json", str(tmp_path / "q.json")]
    assert main(argv) == 0
    assert json.loads((tmp_path / "q.json").read_text())["speculative_tokens_match_target"] is True
    from minigrok import speculative

    rule = speculative.accept_draft

    def shifted(*args, **kwargs):  # the token after the accepted ones, off by one: no longer the target's
        accepted, token = rule(*args, **kwargs)
        return accepted, (token + 1) % 256

    monkeypatch.setattr(speculative, "accept_draft", shifted)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    assert "speculative greedy tokens differ from the target's alone" in capsys.readouterr().err


def test_speculative_flags_are_checked(runs, corpus, tmp_path, capsys):
    target, draft = runs
    other = tmp_path / "bpe"  # a draft with a tokenizer of its own
    argv = [
        "train",
        "--config",
        "tiny",
        "--data",
        str(corpus),
        "--set",
        "train.max_steps=2",
        "--set",
        "train.dtype=fp32",
    ]
    assert main([*argv, "--out", str(other), "--samples", "0"]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(target), "--draft", str(other), "--max-new-tokens", "3"]) == 2
    assert "has another tokenizer than the target" in capsys.readouterr().err
    assert main(["bench", "generate", "--config", "tiny", "--draft", str(draft)]) == 2
    assert "--draft needs --checkpoint" in capsys.readouterr().err
    assert main(["bench", "generate", "--config", "tiny", "--data", str(draft)]) == 2
    assert "--data needs --checkpoint" in capsys.readouterr().err
    argv = ["bench", "generate", "--checkpoint", str(target), "--set", "dim=32", "--data", str(draft)]
    assert main(argv) == 2
    assert "a --checkpoint keeps its own config: drop --set" in capsys.readouterr().err
    argv = ["generate", "--checkpoint", str(target), "--draft", str(draft), "--max-new-tokens", "3", "--dtype", "fp32"]
    assert main([*argv, "--num-draft-tokens", "0"]) == 2
    assert "num_draft_tokens=0 must be an integer >= 1" in capsys.readouterr().err
