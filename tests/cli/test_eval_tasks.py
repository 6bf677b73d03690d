"""`minigrok eval --tasks` as a user runs it: task files in, a table out and the metrics in --json."""

import json
import math

import pytest
import torch
from test_tasks import reference_loglikelihood, tiny_model

from minigrok.cli import main
from minigrok.train.tokenizer import byte_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny model saved with the byte tokenizer, as save_pretrained writes it."""
    directory = tmp_path_factory.mktemp("tasks") / "model"
    tiny_model().save_pretrained(directory)
    byte_tokenizer().save(directory / "tokenizer.json")
    return directory


def write_jsonl(path, rows) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def run_eval(checkpoint, tasks, out, *flags) -> dict:
    argv = ["eval", "--checkpoint", str(checkpoint), "--tasks", *tasks, "--json", str(out), "--dtype", "fp32"]
    assert main([*argv, *flags]) == 0
    return json.loads(out.read_text())


def greedy_text(model, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation by full forwards (no cache), cut at eos, decoded as bytes."""
    ids, tokenizer = list(prompt.encode()), byte_tokenizer()
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_id:
                break
            new.append(token)
    return tokenizer.decode(new)


def test_multiple_choice_metrics_match_float64_log_likelihoods(checkpoint, tmp_path, capsys):
    rows = [
        {"context": "def f(x):\n    return", "choices": [" x", " x + 1", " None"], "gold": 1},
        {"context": "import ", "choices": ["os", "sys", "json", "re"], "gold": 0},
        {"context": "a = [1, 2, 3]\nprint(len(a))\n", "choices": ["# 3", "# 4"], "gold": 0},
        {"context": "", "choices": ["class A:", "x = 1"], "gold": 1},
        {"context": "for i in range(10):", "choices": ["\n    pass", " print(i)"], "gold": 1},
    ]
    task = write_jsonl(tmp_path / "mc_demo.jsonl", rows)
    report = run_eval(checkpoint, [task], tmp_path / "out.json", "--batch-size", "3")
    model = tiny_model()
    acc, acc_norm = [], []
    for row in rows:
        lls = [reference_loglikelihood(model, row["context"], choice) for choice in row["choices"]]
        normed = [ll / len(choice.encode()) for ll, choice in zip(lls, row["choices"], strict=True)]
        acc.append(lls.index(max(lls)) == row["gold"])
        acc_norm.append(normed.index(max(normed)) == row["gold"])
    result = report["tasks"]["mc_demo"]
    p, p_norm, n = sum(acc) / 5, sum(acc_norm) / 5, 5
    assert result == pytest.approx(
        {
            "acc": p,
            "acc_norm": p_norm,
            "acc_stderr": math.sqrt(p * (1 - p) / (n - 1)),
            "acc_norm_stderr": math.sqrt(p_norm * (1 - p_norm) / (n - 1)),
            "n": n,
        }
    )
    assert report["checkpoint"] == str(checkpoint) and report["wall_seconds"] > 0
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert "mc_demo" in capsys.readouterr().out


def test_generation_exact_match_with_stops_and_limit(checkpoint, tmp_path):
    model = tiny_model()
    rows = []
    for prompt in ["abc", "def f(x):\n    return x"]:  # prompts whose greedy continuation is visible text
        text = greedy_text(model, prompt, 12)
        stop = text[3:5]
        assert text[:5].strip() and len(stop) == 2
        rows += [
            {"prompt": prompt, "reference": greedy_text(model, prompt, 5).split("\n")[0], "max_new_tokens": 5},
            {"prompt": prompt, "reference": text[: text.find(stop)], "stop": stop, "max_new_tokens": 12},
            {"prompt": prompt, "reference": "not what it says", "max_new_tokens": 12},
        ]
    task = write_jsonl(tmp_path / "gen.jsonl", rows)
    result = run_eval(checkpoint, [task], tmp_path / "out.json", "--batch-size", "4")["tasks"]["gen"]
    assert result == pytest.approx({"exact_match": 4 / 6, "exact_match_stderr": math.sqrt(4 / 6 * 2 / 6 / 5), "n": 6})
    limited = run_eval(checkpoint, [task], tmp_path / "out.json", "--limit", "2")["tasks"]["gen"]
    assert limited == pytest.approx({"exact_match": 1.0, "exact_match_stderr": 0.0, "n": 2})


def test_code_pass_at_1_runs_the_tests_on_the_completion(checkpoint, tmp_path):
    # the completion stays on a comment line (cut at any line end), so only the tests decide
    stop = ["\n", "\r", "\x00"]
    rows = [
        {"prompt": "def double(x):\n    return 2 * x  #", "tests": "assert double(3) == 6", "stop": stop},
        {"prompt": "def double(x):\n    return 3 * x  #", "tests": "assert double(3) == 6", "stop": stop},
    ]
    task = write_jsonl(tmp_path / "code.jsonl", rows)
    result = run_eval(checkpoint, [task, "builtin"], tmp_path / "out.json", "--limit", "2", "--max-new-tokens", "8")
    assert result["tasks"]["code"] == pytest.approx({"pass@1": 0.5, "pass@1_stderr": 0.5, "n": 2})
    assert result["tasks"]["builtin"]["n"] == 2 and 0 <= result["tasks"]["builtin"]["acc"] <= 1


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"context": "a", "choices": ["b", "c"], "gold": 2}', "bad.jsonl:2: 'gold' is 2, not the index of a choice"),
        ('{"context": "a", "choices": ["b", "c"]}', "bad.jsonl:2 has no 'gold' field"),
        ('{"context": "a", "choices": "bc", "gold": 0}', "bad.jsonl:2: 'choices' must be a list"),
        ('{"context": "a", "choices": ["b", "c"], "gold": 0', "bad.jsonl:2 is not valid JSON"),
        ('{"prompt": "a", "reference": "b"}', "bad.jsonl:2 is a generation row in a multiple_choice task"),
        ('["a", "b"]', "bad.jsonl:2 is a JSON list, not an object"),
    ],
)
def test_bad_rows_are_refused_naming_file_line_and_field(checkpoint, tmp_path, capsys, line, message):
    good = {"context": "a", "choices": ["b", "c"], "gold": 0}
    task = write_jsonl(tmp_path / "bad.jsonl", [good, line])
    assert main(["eval", "--checkpoint", str(checkpoint), "--tasks", task]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_task_file_is_named(checkpoint, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(checkpoint), "--tasks", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl does not exist" in capsys.readouterr().err


def test_tasks_scored_while_training_are_logged_plotted_and_equal_eval_of_the_checkpoint(corpus, tmp_path, capsys):
    rows = [
        {
            "context": f"def function_{i}_{n}(x):\n    return x *",
            "choices": [f" {n} - {i}", f" {n + 1} - {i}"],
            "gold": 0,
        }
        for i, n in ((0, 3), (1, 7), (2, 11), (3, 5), (1, 40))
    ]
    task = write_jsonl(tmp_path / "returns.jsonl", rows)
    out = tmp_path / "run"
    flags = ["--set", "train.max_steps=8", "--set", "train.eval_every=4", "--set", "train.ckpt_every=4"]
    flags += ["--set", "train.dtype=fp32", "--set", f"train.eval_tasks={task}", "--set", "train.eval_tasks_every=4"]
    argv = ["train", "--config", "tiny", "--data", str(corpus), "--tokenizer", "byte", "--out", str(out)]
    assert main([*argv, *flags, "--samples", "0"]) == 0
    assert "step 8: returns acc " in capsys.readouterr().out
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    scored = [record for record in logged if "tasks" in record]
    assert [record["step"] for record in scored] == [4, 8]
    report = run_eval(out / "ckpt-8", [task], tmp_path / "eval.json")
    assert scored[-1]["tasks"]["returns"] == pytest.approx(report["tasks"]["returns"], rel=1e-6)
    assert main(["plot", str(out), "--out", str(tmp_path / "curves.png")]) == 0
    from PIL import Image

    with_tasks = Image.open(tmp_path / "curves.png").size[1]
    without = tmp_path / "plain"
    assert (
        main([*argv[:-1], str(without), "--set", "train.max_steps=4", "--set", "train.dtype=fp32", "--samples", "0"])
        == 0
    )
    assert main(["plot", str(without), "--out", str(tmp_path / "plain.png")]) == 0
    assert with_tasks > Image.open(tmp_path / "plain.png").size[1]  # the row of task scores


def test_a_bad_task_file_stops_training_before_it_starts(corpus, tmp_path, capsys):
    task = write_jsonl(tmp_path / "bad.jsonl", [{"context": "a", "choices": ["b", "c"], "gold": 5}])
    out = tmp_path / "run"
    argv = ["train", "--config", "tiny", "--data", str(corpus), "--tokenizer", "byte", "--out", str(out)]
    assert main([*argv, "--set", "train.max_steps=4", "--set", f"train.eval_tasks={task}"]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert not list(out.glob("ckpt-*"))
    assert main([*argv, "--set", "train.max_steps=4", "--set", "train.eval_tasks_every=2"]) == 2
    assert "train.eval_tasks_every=2 but train.eval_tasks is empty" in capsys.readouterr().err
