"""`minigrok train` under torchrun on CPU (gloo, 2 processes of 1 thread): DDP and FSDP2 train what one process
trains at the global batch, resume exactly, write one log and one set of checkpoints, and stop when a rank dies:
the survivor in one line, whether torchrun SIGTERMs it or a collective times out, and a torchrun restart resumes.

Parity bound: 2 processes x batch b against 1 process x batch 2b (and FSDP against DDP) differ only in the order
fp32 sums are taken (a mean of two half-batch means, gradients added across processes). Over these 6 steps the
measured differences are ~5e-7 (loss) and ~1e-7 (weights); the tests allow 1e-5, far below the ~1e-1 a wrong
batch, a missed gradient sync or a doubled learning rate would move either.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minigrok.train import checkpoint

TOLERANCE = 1e-5
ENV = os.environ | {"OMP_NUM_THREADS": "1"}
# A shared-layer model (4 depths over 2 blocks, each block run at two depths) with the head tied to the embedding.
MODEL = ["--set", "model.n_layers=4", "--set", "model.share=cycle", "--set", "model.n_unique_layers=2"]
STEPS = ["--set", "train.max_steps=6", "--set", "train.ckpt_every=3", "--set", "train.log_every=1"]
COMMON = ["--config", "tiny", "--tokenizer", "byte", "--samples", "0", "--set", "train.dtype=fp32", *MODEL, *STEPS]
COMMON += ["--set", "train.seq_len=32", "--set", "train.eval_tokens=512", "--set", "train.dist_timeout_s=60"]


def minigrok(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m minigrok.cli ...` in one process of one thread."""
    command = [sys.executable, "-m", "minigrok.cli", *args]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout)


def torchrun_command(*args: str, max_restarts: int = 0) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return [*launcher, f"--max-restarts={max_restarts}", "-m", "minigrok.cli", *args]


def torchrun(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m minigrok.cli ...`, each process on one thread."""
    return subprocess.run(torchrun_command(*args), env=ENV, capture_output=True, text=True, timeout=timeout)


def check(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run) if "loss" in r}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """The same 6 steps three ways: 1 process at batch 4, DDP and FSDP at 2 processes x batch 2."""
    root = tmp_path_factory.mktemp("runs")
    data = ["--data", str(corpus)]
    check(minigrok("train", *COMMON, *data, "--out", str(root / "single"), "--set", "train.batch_size=4"))
    check(torchrun("train", *COMMON, *data, "--out", str(root / "ddp"), "--set", "train.batch_size=2"))  # auto: ddp
    out = ["--out", str(root / "fsdp"), "--set", "train.batch_size=2", "--set", "train.parallel=fsdp"]
    check(torchrun("train", *COMMON, *data, *out))
    return root


def test_ddp_trains_what_one_process_trains_at_the_global_batch(runs):
    single, ddp = runs / "single", runs / "ddp"
    assert sorted(losses(ddp)) == list(range(1, 7))
    assert max(abs(losses(ddp)[step] - losses(single)[step]) for step in range(1, 7)) < TOLERANCE
    weights = [load_file(run / "ckpt-6" / "model.safetensors") for run in (single, ddp)]
    assert max_difference(*weights) < TOLERANCE
    # one log, written once (not once per process), and one set of checkpoints
    steps = [r["step"] for r in records(ddp)]
    assert steps == sorted(steps) and len([r for r in records(ddp) if "loss" in r]) == 6
    assert sorted(p.name for p in ddp.iterdir() if "ckpt" in p.name) == ["ckpt-3", "ckpt-6"]
    segment = records(ddp)[0]
    assert (segment["world_size"], segment["parallel"], segment["global_batch"]) == (2, "ddp", 4)
    assert records(ddp)[-1]["tokens"] == records(single)[-1]["tokens"] == 6 * 4 * 32  # global tokens


def test_fsdp_matches_ddp_with_shared_blocks_and_tied_embeddings(runs):
    ddp, fsdp = runs / "ddp", runs / "fsdp"
    assert max(abs(losses(fsdp)[step] - losses(ddp)[step]) for step in range(1, 7)) < TOLERANCE
    assert sorted(p.name for p in (fsdp / "ckpt-6" / "shards").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors",
        "shard-00002-model-00001-of-00001.safetensors",
    ]
    refused = minigrok("generate", "--checkpoint", str(fsdp), "--prompt", "def ", "--max-new-tokens", "4")
    assert refused.returncode == 2 and "minigrok consolidate" in refused.stderr
    assert "wrote" in check(minigrok("consolidate", str(fsdp)))
    weights = load_file(fsdp / "ckpt-6" / "model.safetensors")
    assert "lm_head.weight" not in weights and "blocks.1.attn.o_proj.weight" in weights  # tied; 2 unique blocks
    assert max_difference(weights, load_file(ddp / "ckpt-6" / "model.safetensors")) < TOLERANCE
    assert check(minigrok("generate", "--checkpoint", str(fsdp), "--prompt", "def ", "--max-new-tokens", "4"))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_resume_with_the_same_world_size_is_bit_exact(runs, tmp_path, parallel):
    resumed = tmp_path / parallel
    shutil.copytree(runs / parallel, resumed)
    shutil.rmtree(resumed / "ckpt-6")  # as if killed after the checkpoint of step 3
    check(torchrun("train", "--config", "tiny", "--samples", "0", "--out", str(resumed), "--resume"))
    assert losses(resumed) == losses(runs / parallel)
    names = ["model.safetensors", "optimizer.safetensors"] if parallel == "ddp" else ["shards/*"]
    originals = [path for name in names for path in sorted((runs / parallel / "ckpt-6").glob(name))]
    assert len(originals) == 2
    for original in originals:  # every weight and optimizer moment (each process's shard under fsdp)
        expected, found = load_file(original), load_file(resumed / original.relative_to(runs / parallel))
        assert sorted(found) == sorted(expected) and all(torch.equal(found[k], expected[k]) for k in expected)


def test_resume_of_ddp_in_another_world_size_continues_and_says_so(runs, tmp_path):
    resumed = tmp_path / "alone"
    shutil.copytree(runs / "ddp", resumed)
    shutil.rmtree(resumed / "ckpt-6")
    out = check(minigrok("train", "--config", "tiny", "--out", str(resumed), "--resume", "--samples", "0",
                         "--set", "train.batch_size=4"))  # fmt: skip
    assert "world size 2 -> 1" in out and "(not bit for bit)" in out
    # the same global batch reads the same rows, so the run stays within the parity bound
    assert max(abs(losses(resumed)[step] - losses(runs / "ddp")[step]) for step in range(4, 7)) < TOLERANCE


def test_ddp_with_muon_steps_what_one_process_steps(corpus, tmp_path):
    """Muon orthogonalises the all-reduced gradient, the same matrix in every process, in five bf16 iterations that
    spread any one rounding the fp32 sums' order flips: a flip moves a weight by up to ~7% of a step, and the runs
    drift apart after a few steps. So the bound is on the first step (measured: 2e-8; a missed gradient sync, each
    process orthogonalising its own half-batch, moves them by 8e-3 and the next loss by 0.04)."""
    muon = [*COMMON, "--data", str(corpus), "--set", "train.optimizer=muon", "--set", "train.muon_lr=0.01"]
    muon += ["--set", "train.warmup_steps=0", "--set", "train.max_steps=2", "--set", "train.ckpt_every=1"]
    check(minigrok("train", *muon, "--out", str(tmp_path / "single"), "--set", "train.batch_size=4"))
    check(torchrun("train", *muon, "--out", str(tmp_path / "ddp"), "--set", "train.batch_size=2"))
    single, ddp = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert sorted(ddp) == [1, 2] and max(abs(ddp[step] - single[step]) for step in ddp) < TOLERANCE
    weights = [load_file(tmp_path / run / "ckpt-1" / "model.safetensors") for run in ("single", "ddp")]
    assert max_difference(*weights) < 5e-4
    assert records(tmp_path / "ddp")[0]["optimizer"] == "muon"


def test_parallel_is_checked_against_the_launch(corpus, tmp_path):
    result = minigrok(
        "train", *COMMON, "--data", str(corpus), "--out", str(tmp_path / "a"), "--set", "train.parallel=ddp"
    )
    assert result.returncode == 2 and "train.parallel=ddp needs several processes" in result.stderr
    result = minigrok("train", *COMMON, "--out", str(tmp_path / "b"), "--set", "train.parallel=tp")
    assert result.returncode == 2 and "train.parallel='tp' is unknown" in result.stderr


# -- a rank that dies ------------------------------------------------------------------------------------------------

ENDLESS = ["--set", "train.max_steps=100000", "--set", "train.ckpt_every=5", "--set", "train.eval_every=100000"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker(launcher: subprocess.Popen, local_rank: int) -> int:
    """The pid of torchrun's worker of `local_rank`."""
    for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        if f"LOCAL_RANK={local_rank}" in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0"):
            return int(pid)
    raise AssertionError(f"torchrun has no worker of local rank {local_rank}")


def wait_for(path: Path, *processes: subprocess.Popen) -> None:
    """Until `path` exists (a checkpoint renamed into place), while every process still runs."""
    deadline = time.monotonic() + 120
    while not path.exists():
        assert all(p.poll() is None for p in processes) and time.monotonic() < deadline, f"no {path}"
        time.sleep(0.1)


def error_lines(stderr: str) -> list[str]:
    """stderr's lines but tqdm's progress bars."""
    lines = stderr.replace("\r", "\n").splitlines()
    return [line for line in lines if line.strip() and "step/s" not in line and "%|" not in line]


def check_rank_lost(stderr: str, rank: int, timeout_s: int) -> None:
    """The survivor said, in one line and no traceback, that another process died and how to continue."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in error_lines(stderr) if "error" in line.lower()]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"minigrok train: error: rank {rank} of 2: another process of this run died")
    assert f"train.dist_timeout_s={timeout_s}" in errors[0] and "--resume" in errors[0]


def check_last_checkpoint(run: Path, at_least: int) -> None:
    last = checkpoint.latest_checkpoint(run)
    assert int(last.name[5:]) >= at_least
    assert checkpoint.load_checkpoint(last)["step"] == int(last.name[5:])  # every file against its sha256


def test_a_rank_killed_under_torchrun_stops_the_other_in_one_line_and_a_restart_resumes(corpus, tmp_path):
    """torchrun (static rendezvous: its store outlives the group) SIGTERMs the survivor of a rank killed mid-run; the
    survivor says so in one line, and the group torchrun --max-restarts=1 starts again with the same command
    resumes from the newest checkpoint and ends where the budget says."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}"]
    launcher += ["--max-restarts=1", "--log-dir", str(logs), "--redirects=3"]
    command = [*launcher, "-m", "minigrok.cli", "train", *COMMON, *ENDLESS, "--set", "train.max_steps=40"]
    command += ["--data", str(corpus), "--out", str(run)]
    torchrun = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(run / "ckpt-10", torchrun)
    os.kill(worker(torchrun, 1), signal.SIGKILL)
    _, err = torchrun.communicate(timeout=180)
    assert torchrun.returncode == 0, err[-3000:]
    (survivor,) = logs.glob("*/attempt_0/0/stderr.log")
    check_rank_lost(survivor.read_text(), rank=0, timeout_s=60)
    (restarted,) = logs.glob("*/attempt_1/0/stdout.log")
    resumed = [line for line in restarted.read_text().splitlines() if line.startswith("restart 1 by torchrun")]
    assert len(resumed) == 1 and int(resumed[0].rsplit("ckpt-", 1)[1]) >= 10, resumed
    assert sorted(losses(run)) == list(range(1, 41))  # the lines past the checkpoint dropped, then written again
    check_last_checkpoint(run, at_least=40)


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_rank_lost_without_torchrun_stops_the_other_within_the_timeout(corpus, tmp_path, how):
    """Processes started by hand (no launcher to SIGTERM the survivor): rank 0, which holds the store, is killed, or
    rank 1 stops answering (SIGSTOP), and the other stops at once or once a collective waited train.dist_timeout_s."""
    run, timeout_s = tmp_path / "run", 5
    argv = [sys.executable, "-m", "minigrok.cli", "train", *COMMON, *ENDLESS, "--data", str(corpus), "--out", str(run)]
    argv += ["--set", f"train.dist_timeout_s={timeout_s}"]
    env = ENV | {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [
        subprocess.Popen(argv, env=env | {"RANK": r, "LOCAL_RANK": r}, stderr=subprocess.PIPE, text=True)
        for r in ("0", "1")
    ]
    victim, survivor = (0, 1) if how == "killed" else (1, 0)
    try:
        wait_for(run / "ckpt-10", *ranks)
        ranks[victim].send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        _, stderr = ranks[survivor].communicate(timeout=timeout_s + 60)
    finally:
        for process in ranks:
            process.kill()
            process.communicate()
    assert ranks[survivor].returncode == 1
    check_rank_lost(stderr, rank=survivor, timeout_s=timeout_s)
    if how == "hung":
        assert f"Timed out waiting {timeout_s * 1000}ms" in stderr
    check_last_checkpoint(run, at_least=10)
