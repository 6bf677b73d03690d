"""`minigrok train` on mixtures and sharded data: an exact resume, per-source counts in the log, a run directory of
the flat token-file layout continued bit for bit, and bad --data entries refused in one line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minigrok.cli import main

COMMAND = ["train", "--config", "tiny", "--samples", "0", "--tokenizer", "byte", "--set", "train.dtype=fp32"]
COMMAND += ["--set", "train.peak_flops=1e11", "--set", "train.ckpt_every=4", "--set", "train.shard_tokens=3000"]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    for name in ("code", "prose"):
        (root / name).mkdir()
        for index in range(3):
            text = "".join(f"{name} {index} line {n}: {'x' * (n % 9)}\n" for n in range(120))
            (root / name / f"part{index}.txt").write_text(text)
    return root


def train(out, *extra: str) -> None:
    argv = [sys.executable, "-m", "minigrok.cli", *COMMAND, "--out", str(out), *extra]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def weights(out) -> bytes:
    return (out / "ckpt-8" / "model.safetensors").read_bytes() + (out / "ckpt-8" / "optimizer.safetensors").read_bytes()


def test_a_mixture_resumes_exactly_and_logs_its_sources(corpora, tmp_path):
    mixture = ["--data", f"code={corpora / 'code'}:3", f"prose={corpora / 'prose'}:1"]
    train(tmp_path / "whole", *mixture, "--set", "train.max_steps=8")
    train(tmp_path / "parts", *mixture, "--set", "train.max_steps=4")
    train(tmp_path / "parts", "--resume", "--set", "train.max_steps=8")  # the recorded mixture
    assert weights(tmp_path / "whole") == weights(tmp_path / "parts")
    meta = json.loads((tmp_path / "whole" / "data" / "meta.json").read_text())
    sources = meta["splits"]["train"]["sources"]
    assert {name: source["weight"] for name, source in sources.items()} == {"code": 3.0, "prose": 1.0}
    assert all(source["shards"] > 1 for source in sources.values())
    logged = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    counts = [record["source_tokens"] for record in logged if "source_tokens" in record]
    batch_size, seq_len, log_every = 4, 64, 5  # configs/tiny.yaml
    assert counts and all(sum(c.values()) == batch_size * seq_len * log_every for c in counts)
    assert all(set(c) == {"code", "prose"} for c in counts)
    record = json.loads((tmp_path / "whole" / "run.json").read_text())
    assert record["data"] == [f"code={corpora / 'code'}:3.0", f"prose={corpora / 'prose'}:1.0"]


def test_a_run_of_flat_token_files_is_continued_bit_for_bit(corpora, tmp_path):
    data = ["--data", str(corpora / "code")]
    train(tmp_path / "whole", *data, "--set", "train.max_steps=8")
    train(tmp_path / "old", *data, "--set", "train.max_steps=4")
    directory = tmp_path / "old" / "data"  # rewritten as the flat layout was: one train.bin, one val.bin
    meta = json.loads((directory / "meta.json").read_text())
    for split in ("train", "val"):
        shards = sorted((directory / split / "corpus").glob("shard-*.bin"))
        np.concatenate([np.fromfile(path, np.uint16) for path in shards]).tofile(directory / f"{split}.bin")
        shutil.rmtree(directory / split)
        meta["splits"][split] = {
            k: meta["splits"][split][k] for k in ("n_tokens", "n_bytes", "n_documents", "corpus_fingerprint")
        }
    meta = {"format": 1, "tokenizer": meta["tokenizer"], "dtype": meta["dtype"], "splits": meta["splits"]}
    (directory / "meta.json").write_text(json.dumps(meta))
    train(tmp_path / "old", "--resume", "--set", "train.max_steps=8")
    assert weights(tmp_path / "whole") == weights(tmp_path / "old")
    assert not (directory / "train.bin").exists() and (directory / "train" / "corpus" / "index.json").is_file()


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["code={code}:0"], "weight 0 must be a positive number"),
        (["code={code}:-2", "prose={prose}:1"], "weight -2 must be a positive number"),
        (["code={code}"], "is not name=path:weight"),
        (["code={code}:1", "{prose}"], "has no name: give every --data entry as name=path:weight"),
        (["code={code}/nowhere:1"], "does not exist: give a file, a directory or a glob"),
        (["code={code}:1", "code={prose}:1"], "the name 'code' is given twice"),
    ],
)
def test_bad_data_entries_are_refused_in_one_line(corpora, tmp_path, capsys, entries, message):
    paths = {"code": corpora / "code", "prose": corpora / "prose"}
    argv = COMMAND + ["--out", str(tmp_path / "run"), "--set", "train.max_steps=1", "--data"]
    assert main(argv + [entry.format(**paths) for entry in entries]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_an_unknown_text_field_is_named_with_the_fields_there_are(tmp_path, capsys):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": f"text {i}"}) + "\n" for i in range(20)))
    argv = COMMAND + [
        "--out",
        str(tmp_path / "run"),
        "--set",
        "train.max_steps=1",
        "--data",
        str(tmp_path / "docs.jsonl"),
    ]
    assert main(argv) == 2
    assert 'has no string "text" field' in capsys.readouterr().err
    assert main(argv + ["--set", "train.text_field=content"]) == 2
    assert 'has no string "content" field' in capsys.readouterr().err


def config_with_data(tmp_path, entries: str) -> str:
    """configs/tiny.yaml with a data: section (YAML text of its list)."""
    path = tmp_path / "mixture.yaml"
    path.write_text((Path(__file__).parents[2] / "configs" / "tiny.yaml").read_text() + f"data:\n{entries}")
    return str(path)


def test_a_config_data_list_trains_the_mixture_that_data_gives(corpora, tmp_path):
    entries = (
        f"  - {{name: code, path: {corpora / 'code'}, weight: 3}}\n  - {{name: prose, path: {corpora / 'prose'}}}\n"
    )
    config = config_with_data(tmp_path, entries)
    train(tmp_path / "yaml", "--config", config, "--set", "train.max_steps=8")
    train(tmp_path / "cli", "--data", f"code={corpora / 'code'}:3", f"prose={corpora / 'prose'}:1",
          "--set", "train.max_steps=8")  # fmt: skip
    counts = {}
    for run in ("yaml", "cli"):
        logged = [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        counts[run] = [(r["step"], r["source_tokens"]) for r in logged if "source_tokens" in r]
    assert counts["yaml"] == counts["cli"] and len(counts["yaml"]) == 1  # steps 1-5: log_every=5, 8 steps
    assert set(counts["yaml"][0][1]) == {"code", "prose"}
    assert weights(tmp_path / "yaml") == weights(tmp_path / "cli")  # the very same batches
    # --data replaces the config's list
    train(tmp_path / "override", "--config", config, "--data", str(corpora / "prose"), "--set", "train.max_steps=1")
    assert json.loads((tmp_path / "override" / "run.json").read_text())["data"] == [str(corpora / "prose")]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ("  - {name: code, path: P, weight: 0}\n", "data[code].weight=0 must be a positive number"),
        ("  - {name: code, path: P, weight: heavy}\n", "data[code].weight='heavy' must be a positive number"),
        ("  - {name: code}\n", "has no path: add it"),
        ("  - {name: 'a b', path: P}\n", "data[].name='a b' must be a word"),
        ("  - {name: code, path: P, weigth: 2}\n", "unknown data field 'weigth': did you mean 'weight'?"),
        ("  - {name: code, path: P}\n  - {name: code, path: P}\n", "names 'code' twice"),
        ("  code: P\n", "must be a list of sources"),
    ],
)
def test_bad_config_data_is_refused_naming_the_field(corpora, tmp_path, capsys, entries, message):
    config = config_with_data(tmp_path, entries.replace("P", str(corpora / "code")))
    assert main(COMMAND + ["--config", config, "--out", str(tmp_path / "run"), "--set", "train.max_steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
