"""`minigrok train` with curation: a validation file that duplicates a training file, exactly or with a few words
changed, is dropped from validation and reported; a changed curation needs --new-data on resume, then re-encodes."""

import json

import pytest

from minigrok.cli import main

COMMAND = ["train", "--config", "tiny", "--samples", "0", "--tokenizer", "byte", "--set", "train.dtype=fp32"]
COMMAND += ["--set", "train.peak_flops=1e11", "--set", "train.ckpt_every=2"]


def functions(tag: str, index: int) -> str:
    return "".join(f"def {tag}_{index}_{n}(x):\n    return x * {n} + {index}\n\n" for n in range(40))


@pytest.fixture
def planted(tmp_path):
    """A training corpus of four files and a validation corpus of three: a copy of a training file (reindented,
    upper case), the same with three words changed, and a file of its own."""
    pytest.importorskip("datasketch")
    train, val = tmp_path / "train", tmp_path / "val"
    train.mkdir()
    val.mkdir()
    for index in range(4):
        (train / f"part{index}.py").write_text(functions("train", index))
    (val / "copy.py").write_text(functions("train", 0).upper().replace("    ", "\t"))
    near = functions("train", 1).split(" ")
    for position in (30, 120, 210):
        near[position] = "changed"
    (val / "near.py").write_text(" ".join(near))
    (val / "own.py").write_text(functions("val", 9))
    return ["--data", str(train), "--val-data", str(val)]


def test_validation_duplicates_of_training_files_are_dropped_and_reported(planted, tmp_path, capsys):
    out = tmp_path / "run"
    argv = COMMAND + ["--out", str(out), *planted, "--set", "train.max_steps=2", "--set", "train.dedup=near"]
    assert main(argv) == 0
    assert "curation: train kept 4 of 4 documents; val kept 1 of 3 documents (dropped 1 exact duplicate, " \
           "1 near duplicate)" in capsys.readouterr().out  # fmt: skip
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert (meta["splits"]["train"]["n_documents"], meta["splits"]["val"]["n_documents"]) == (4, 1)
    report = json.loads((out / "data" / "curation.json").read_text())
    val = report["splits"]["val"]["corpus"]
    assert val["read"]["documents"] == 3 and val["kept"]["documents"] == 1
    exact, near = val["dropped"]["exact_duplicate"], val["dropped"]["near_duplicate"]
    assert exact["documents"] == near["documents"] == 1
    assert exact["examples"][0]["text"].startswith("DEF TRAIN_0_0(X):\n\tRETURN")
    assert exact["examples"][0]["duplicate_of"]["text"].startswith("def train_0_0(x):\n    return")
    assert near["examples"][0]["duplicate_of"]["text"].startswith("def train_1_0(x):")
    assert val["kept"]["bytes"] == meta["splits"]["val"]["n_bytes"] == len(functions("val", 9))


def test_a_changed_curation_is_refused_on_resume_unless_the_data_is_new(planted, tmp_path, capsys):
    out = tmp_path / "run"
    command = COMMAND + ["--out", str(out)]
    assert main(command + [*planted, "--set", "train.max_steps=2", "--set", "train.dedup=near"]) == 0
    assert main(command + ["--resume", "--set", "train.dedup=exact", "--set", "train.max_steps=4"]) == 2
    assert "train.dedup is fixed by the run's data split" in capsys.readouterr().err
    assert main(command + ["--resume", "--new-data", "--set", "train.dedup=exact", "--set", "train.max_steps=4"]) == 0
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["splits"]["val"]["n_documents"] == 2  # the near copy is back
    assert json.loads((out / "data" / "curation.json").read_text())["settings"]["dedup"] == "exact"
    changes = [json.loads(line).get("changes") for line in (out / "log.jsonl").read_text().splitlines()]
    assert "train.dedup: 'near' -> 'exact'" in [change for group in changes if group for change in group]
