"""The same `minigrok train` command gives the same run, in fresh processes, killed and resumed or not."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# dtype pinned: `auto` measures the machine, and two fresh processes may time a near tie differently. The byte
# tokenizer and a given peak keep each process short; the BPE tokenizer's determinism is tested with the tokenizer.
COMMAND = ["train", "--config", "tiny", "--samples", "0", "--tokenizer", "byte"]
COMMAND += ["--set", "train.dtype=fp32", "--set", "train.peak_flops=1e11"]
TIMING_KEYS = {"time", "tokens_per_s", "mfu", "peak_flops", "peak_source"}  # wall-clock figures differ between runs


BUDGET = ["--set", "train.max_steps=200", "--set", "train.ckpt_every=20", "--set", "train.eval_every=50"]


def train(out: Path, corpus: Path, *extra: str, wait: bool = True) -> subprocess.Popen:
    argv = [sys.executable, "-m", "minigrok.cli", *COMMAND, "--data", str(corpus), "--out", str(out), *extra]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    return process


def checkpoint_bytes(ckpt: Path) -> dict[str, bytes]:
    return {
        name: (ckpt / name).read_bytes() for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
    }


def training_log(run: Path) -> list[dict]:
    """The steps and evaluations of a run's log, without wall-clock figures and the per-segment machine record."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records if "dtype_source" not in r]


def test_the_same_command_twice_gives_byte_identical_checkpoints(tmp_path, corpus):
    for name in ("first", "second"):
        train(tmp_path / name, corpus, "--set", "train.max_steps=8")
    first, second = (checkpoint_bytes(tmp_path / name / "ckpt-8") for name in ("first", "second"))
    assert first == second
    assert training_log(tmp_path / "first") == training_log(tmp_path / "second")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus) -> Path:
    """The uninterrupted run of BUDGET that interrupted ones must end as."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(out, corpus, *BUDGET)
    return out


def test_a_run_killed_and_resumed_ends_as_the_uninterrupted_one(tmp_path, corpus, straight):
    killed = train(tmp_path / "killed", corpus, *BUDGET, wait=False)
    second_checkpoint = tmp_path / "killed" / "ckpt-40" / "trainer_state.json"
    deadline = time.monotonic() + 240
    while not second_checkpoint.is_file() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(killed.pid, signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed: give it more steps"
    train(tmp_path / "killed", corpus, *BUDGET, "--resume")
    assert checkpoint_bytes(tmp_path / "killed" / "ckpt-200") == checkpoint_bytes(straight / "ckpt-200")
    assert training_log(tmp_path / "killed") == training_log(straight)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_with_a_checkpoint_and_the_run_resumes_exactly(tmp_path, corpus, straight, signum, code):
    stopped = train(tmp_path / "stopped", corpus, *BUDGET, wait=False)
    log = tmp_path / "stopped" / "log.jsonl"
    deadline = time.monotonic() + 240
    while not (log.is_file() and '"loss"' in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.005)
    stopped.send_signal(signum)
    _, err = stopped.communicate(timeout=120)
    assert stopped.returncode == code, err
    step = int(err.split(" at step ")[1].split(",")[0])
    assert 0 < step < 200 and (tmp_path / "stopped" / f"ckpt-{step}" / "trainer_state.json").is_file()
    assert f"continue with: minigrok train --out {tmp_path / 'stopped'} --resume" in err and "Traceback" not in err
    if signum == signal.SIGINT:  # resuming is the same for either signal: checked once
        train(tmp_path / "stopped", corpus, *BUDGET, "--resume")
        assert checkpoint_bytes(tmp_path / "stopped" / "ckpt-200") == checkpoint_bytes(straight / "ckpt-200")
        assert training_log(tmp_path / "stopped") == training_log(straight)


def test_a_second_signal_stops_at_once_without_a_checkpoint(tmp_path, corpus, monkeypatch, capsys):
    from minigrok.cli import main
    from minigrok.train.trainer import Trainer

    def interrupted_twice(self):  # Ctrl-C pressed twice within one step
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("the second SIGINT did not stop the step")

    monkeypatch.setattr(Trainer, "train_step", interrupted_twice)
    out = tmp_path / "run"
    assert main([*COMMAND, "--data", str(corpus), "--out", str(out), *BUDGET]) == 130
    assert "minigrok train: stopped at once" in capsys.readouterr().err
    assert not list(out.glob("ckpt-*")) and not list(out.glob(".ckpt-*"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back
