"""`minigrok train` with train.activation_checkpointing and train.log_to, run as a user runs it: checkpointing trains
the very same weights, TensorBoard and wandb (offline) get log.jsonl's numbers, across a resume too."""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from minigrok.cli import main

COMMAND = ["train", "--config", "tiny", "--samples", "0", "--tokenizer", "byte"]
COMMAND += ["--set", "train.dtype=fp32", "--set", "train.peak_flops=1e11"]


def start(out: Path, corpus: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "minigrok.cli", *COMMAND, "--data", str(corpus), "--out", str(out), *extra]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | (env or {})
    )


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return out + err


def log_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def numbers(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def test_activation_checkpointing_trains_the_same_weights(tmp_path, corpus):
    modes = ("none", "full", "selective")
    runs = [start(tmp_path / mode, corpus, "--set", f"train.activation_checkpointing={mode}") for mode in modes]
    for process in runs:
        finish(process)
    weights = {mode: (tmp_path / mode / "ckpt-20" / "model.safetensors").read_bytes() for mode in modes}
    assert weights["full"] == weights["none"] and weights["selective"] == weights["none"]
    for mode in modes:
        state = json.loads((tmp_path / mode / "ckpt-20" / "trainer_state.json").read_text())
        assert state["train_config"]["activation_checkpointing"] == mode


def test_tensorboard_scalars_equal_log_jsonl_across_a_resume(tmp_path, corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    finish(start(run, corpus, "--set", "train.max_steps=12", "--set", "train.log_to=jsonl,tensorboard"))
    shutil.rmtree(run / "ckpt-12")  # resume from step 10: the records of steps 11-12 are dropped, then written again
    finish(start(run, corpus, "--resume", "--set", "train.max_steps=16"))
    records = log_records(run)
    assert [r["step"] for r in records if "loss" in r] == [5, 10, 15]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    names = {name for record in records for name in numbers(record)}
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_bpb"} <= names
    assert set(events.Tags()["scalars"]) == names
    for name in names:
        expected = [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in records if name in numbers(r)]
        assert [(event.step, event.value) for event in events.Scalars(name)] == expected, name


def test_a_plain_run_imports_neither_tracker(tmp_path, corpus):
    argv = [*COMMAND, "--data", str(corpus), "--out", str(tmp_path / "run"), "--set", "train.max_steps=2"]
    code = (
        "import sys; from minigrok.cli import main; main(sys.argv[1:]); "
        "print(sorted(m for m in ('tensorboard', 'wandb') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_bad_values_are_refused_naming_the_field(tmp_path, corpus, capsys):
    base = ["train", "--config", "tiny", "--data", str(corpus), "--out", str(tmp_path / "run")]
    assert main(base + ["--set", "train.activation_checkpointing=partial"]) == 2
    assert "train.activation_checkpointing='partial' is unknown: choose one of ('none', 'full', 'selective')" in (
        capsys.readouterr().err
    )
    assert main(base + ["--set", "train.log_to=jsonl,mlflow"]) == 2
    assert "train.log_to='jsonl,mlflow': 'mlflow' is not a writer" in capsys.readouterr().err
    assert main(base + ["--set", "train.log_to=jsonl,,wandb"]) == 2
    assert "'' is not a writer" in capsys.readouterr().err


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's .wandb file, read as wandb writes it: a 7-byte header (":W&B", magic,
    version), then 32 KiB blocks of records, each a 7-byte header (checksum, length, type: 1 whole, 2-4 first,
    middle, last piece) and its bytes; a block's tail shorter than a header is padding."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    found, offset, pending = [], header, b""
    while offset + header <= len(data):
        if block - offset % block < header:
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + header])
        pending += data[offset + header : offset + header + length]
        offset += header + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            found.append(record)
            pending = b""
    return found


def wandb_history(path: Path) -> tuple[str, dict[int, dict[str, float]]]:
    """(run id, {step: {name: value}}) of an offline run, without wandb's own _step, _runtime and _timestamp."""
    records = wandb_records(path)
    (run_id,) = {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"}
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return run_id, history


def by_step(records: list[dict]) -> dict[int, dict[str, float]]:
    """log.jsonl's numbers merged by step, as wandb merges the calls of one step into one row."""
    merged: dict[int, dict[str, float]] = {}
    for record in records:
        merged.setdefault(record["step"], {}).update(numbers(record))
    return merged


def test_wandb_offline_logs_log_jsonl_numbers_and_a_resume_continues_its_run(tmp_path, corpus):
    pytest.importorskip("wandb", reason="wandb is an optional extra: pip install -e '.[wandb]'")
    run, env = tmp_path / "run", {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "test"}
    finish(start(run, corpus, "--set", "train.max_steps=12", "--set", "train.log_to=jsonl,wandb", env=env))
    shutil.rmtree(run / "ckpt-12")  # resume from step 10
    finish(start(run, corpus, "--resume", "--set", "train.max_steps=16", env=env))
    run_id = json.loads((run / "wandb.json").read_text())["id"]
    stretches = [wandb_history(path) for path in sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))]
    assert [found_id for found_id, _ in stretches] == [run_id, run_id]  # one wandb run, continued
    records = log_records(run)
    segments = [index for index, record in enumerate(records) if "peak_source" in record]
    assert len(segments) == 2 and records[segments[1]]["step"] == 10
    first, second = by_step(records[: segments[1]]), by_step(records[segments[1] :])
    assert {"loss", "lr", "grad_norm", "val_loss", "val_bpb", "peak_flops"} <= set(first[10]) | set(first[0])
    assert stretches[1][1] == second and sorted(second) == [10, 15, 16]
    # the first stretch also logged step 12 (its final eval), which log.jsonl dropped on resuming from step 10
    assert {step: row for step, row in stretches[0][1].items() if step <= 10} == first and 12 in stretches[0][1]
