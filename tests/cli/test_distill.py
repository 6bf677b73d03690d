"""`minigrok train --teacher`: a tiny teacher trained first, then smaller students distilled from it, as a user runs them."""

import json
import math
import os
import subprocess
import sys

import pytest

from minigrok.cli import main

FP32 = ["--set", "train.dtype=fp32", "--samples", "0"]


def train(corpus, out, *extra: str) -> int:
    return main(["train", "--config", "tiny", "--data", str(corpus), "--out", str(out), *FP32, *extra])


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, corpus):
    """Two tiny teachers of one tokenizer (different seeds, so different weights)."""
    root = tmp_path_factory.mktemp("teachers")
    assert train(corpus, root / "a", "--set", "train.max_steps=6") == 0
    tokenizer = str(root / "a" / "tokenizer.json")
    assert (
        train(corpus, root / "b", "--tokenizer", tokenizer, "--set", "train.max_steps=2", "--set", "train.seed=1") == 0
    )
    return root / "a", root / "b"


def student(corpus, out, teacher, *extra: str) -> int:
    """A smaller student (half the width, one layer) on the teacher's tokenizer, 4 steps logged every 2."""
    shape = ["--set", "model.dim=32", "--set", "model.n_layers=1", "--set", "model.ffn_dim=64"]
    steps = ["--set", "train.max_steps=4", "--set", "train.log_every=2", "--set", "train.ckpt_every=2"]
    args = ["--tokenizer", str(teacher / "tokenizer.json"), *shape, *steps, *extra]
    return train(corpus, out, *args)


def log_lines(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_distilled_student_logs_kl_and_ce_and_records_its_teacher(tmp_path, corpus, teachers):
    teacher, _ = teachers
    run = tmp_path / "student"
    opts = ["--set", "train.distill_alpha=0.7", "--set", "train.distill_temperature=2.0"]
    assert student(corpus, run, teacher, "--teacher", str(teacher), *opts) == 0
    steps = [record for record in log_lines(run) if "loss" in record]
    assert [record["step"] for record in steps] == [2, 4]
    for record in steps:
        assert record["distill_kl"] > 0 and record["ce"] > 0
        expected = 0.7 * 2.0**2 * record["distill_kl"] + 0.3 * record["ce"]
        assert math.isclose(record["loss"], expected, rel_tol=1e-5)
    assert any("val_bpb" in record for record in log_lines(run))  # the student's own evaluation
    recorded = json.loads((run / "run.json").read_text())["teacher"]
    assert recorded["path"] == str(teacher.resolve()) and len(recorded["sha256"]) == 64


def test_alpha_zero_trains_bit_for_bit_as_without_a_teacher(tmp_path, corpus, teachers):
    teacher, _ = teachers
    plain, distilled = tmp_path / "plain", tmp_path / "distilled"
    assert student(corpus, plain, teacher) == 0
    assert student(corpus, distilled, teacher, "--teacher", str(teacher), "--set", "train.distill_alpha=0") == 0
    plain_losses = [r["loss"] for r in log_lines(plain) if "loss" in r]
    distilled_records = [r for r in log_lines(distilled) if "loss" in r]
    assert plain_losses == [r["loss"] for r in distilled_records] == [r["ce"] for r in distilled_records]
    assert (plain / "ckpt-4" / "model.safetensors").read_bytes() == (
        distilled / "ckpt-4" / "model.safetensors"
    ).read_bytes()


def test_vocab_mismatch_is_refused(tmp_path, corpus, teachers, capsys):
    teacher, _ = teachers
    run = tmp_path / "bytes"
    args = ["--tokenizer", "byte", "--set", "model.dim=32", "--set", "train.max_steps=2", "--teacher", str(teacher)]
    assert train(corpus, run, *args) == 2
    err = capsys.readouterr().err
    teacher_vocab = json.loads((teacher / "ckpt-6" / "config.json").read_text())["vocab_size"]
    assert teacher_vocab != 320 and f"has vocab_size={teacher_vocab} but the student has vocab_size=320" in err
    assert "--tokenizer TEACHER/tokenizer.json" in err


def test_resume_needs_the_same_teacher(tmp_path, corpus, teachers, capsys):
    teacher, other = teachers
    run, plain = tmp_path / "student", tmp_path / "plain"
    assert student(corpus, run, teacher, "--teacher", str(teacher)) == 0
    assert student(corpus, plain, teacher) == 0

    def resume(out, *extra: str) -> int:
        return train(corpus, out, "--resume", "--set", "train.max_steps=6", *extra)

    assert resume(run, "--teacher", str(other)) == 2
    assert f"but --teacher {other.resolve()} holds weights" in capsys.readouterr().err
    assert resume(run) == 2
    assert f"pass --teacher {teacher.resolve()}" in capsys.readouterr().err
    assert resume(plain, "--teacher", str(teacher)) == 2
    assert "trained without a teacher" in capsys.readouterr().err
    assert resume(run, "--teacher", str(teacher)) == 0
    assert [r["step"] for r in log_lines(run) if "distill_kl" in r] == [2, 4, 6]


@pytest.mark.parametrize(
    "setting, message",
    [
        ("train.distill_kind=up", "train.distill_kind='up' is unknown"),
        ("train.distill_alpha=1.5", "train.distill_alpha=1.5 must lie in [0, 1]"),
        ("train.distill_temperature=0", "train.distill_temperature=0 must be a positive number"),
        ("train.distill_teacher_dtype=fp16", "train.distill_teacher_dtype='fp16' must be fp32, bf16 or int8"),
    ],
)
def test_bad_distillation_settings_are_refused(tmp_path, corpus, teachers, capsys, setting, message):
    teacher, _ = teachers
    assert student(corpus, tmp_path / "x", teacher, "--teacher", str(teacher), "--set", setting) == 2
    assert message in capsys.readouterr().err


def test_a_bf16_or_int8_teacher_gives_nearly_the_fp32_teachers_kl(tmp_path, corpus, teachers):
    teacher, _ = teachers
    kl = {}
    for dtype in ("fp32", "bf16", "int8"):
        run = tmp_path / dtype
        assert (
            student(corpus, run, teacher, "--teacher", str(teacher), "--set", f"train.distill_teacher_dtype={dtype}")
            == 0
        )
        kl[dtype] = [r["distill_kl"] for r in log_lines(run) if "distill_kl" in r]
    for dtype in ("bf16", "int8"):
        assert kl[dtype] != kl["fp32"] and kl[dtype] == pytest.approx(kl["fp32"], rel=0.05), dtype


def swapped_tokenizer(teacher, path):
    """The teacher's tokenizer.json with two ordinary tokens' ids swapped: as many ids, other text behind two."""
    content = json.loads((teacher / "tokenizer.json").read_text())
    vocab = content["model"]["vocab"]
    first, second = (token for token, i in vocab.items() if i in (100, 101))
    vocab[first], vocab[second] = vocab[second], vocab[first]
    path.write_text(json.dumps(content))
    return path


@pytest.mark.parametrize("kind", ["minigrok", "hf"])
def test_a_teacher_of_another_tokenizer_is_refused_naming_both_files(tmp_path, corpus, teachers, capsys, kind):
    teacher, _ = teachers
    source = teacher
    if kind == "hf":
        source = tmp_path / "hf"
        assert main(["export-hf", "--checkpoint", str(teacher), "--out", str(source)]) == 0
    other = swapped_tokenizer(teacher, tmp_path / "other.json")
    run = tmp_path / "student"
    shape = ["--set", "model.dim=32", "--set", "train.max_steps=2", "--teacher", str(source)]
    assert train(corpus, run, "--tokenizer", str(other), *shape) == 2
    err = capsys.readouterr().err
    teacher_file = (source if kind == "hf" else teacher / "ckpt-6") / "tokenizer.json"
    assert f"--teacher's {teacher_file.resolve()} and the student's {run / 'tokenizer.json'}" in err
    assert f"vocabularies or merges differ): distil on the teacher's, --tokenizer {teacher_file.resolve()}" in err


def test_a_hugging_face_teacher_without_a_tokenizer_is_taken_with_a_warning(tmp_path, corpus, teachers, capsys):
    teacher, _ = teachers
    hf = tmp_path / "hf"
    assert main(["export-hf", "--checkpoint", str(teacher), "--out", str(hf)]) == 0
    (hf / "tokenizer.json").unlink()
    assert student(corpus, tmp_path / "student", teacher, "--teacher", str(hf)) == 0
    assert f"warning: --teacher {hf} has no tokenizer.json, so nothing checks" in capsys.readouterr().err


def test_a_hugging_face_teacher_distils_as_its_minigrok_checkpoint(tmp_path, corpus, teachers):
    teacher, _ = teachers
    hf = tmp_path / "hf"
    assert main(["export-hf", "--checkpoint", str(teacher), "--out", str(hf)]) == 0
    runs = {}
    for name, source in (("minigrok", teacher), ("hf", hf)):
        runs[name] = tmp_path / name
        assert student(corpus, runs[name], teacher, "--teacher", str(source)) == 0
    kl = {name: [r["distill_kl"] for r in log_lines(run) if "distill_kl" in r] for name, run in runs.items()}
    assert kl["hf"] == pytest.approx(kl["minigrok"], rel=1e-5) and min(kl["hf"]) > 0
    assert json.loads((runs["hf"] / "run.json").read_text())["teacher"]["path"] == str(hf.resolve())


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m minigrok.cli ...` on CPU, each process on one thread."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, "minigrok.cli", *args], env=env, capture_output=True, text=True, timeout=300)


def test_ddp_distils_what_one_process_distils_and_fsdp_is_refused(tmp_path, corpus, teachers):
    """Each process holds its own teacher; only the student's gradients are synced, so 2 x batch 2 = 1 x batch 4."""
    teacher, _ = teachers
    shape = ["--set", "model.dim=32", "--set", "model.n_layers=1", "--tokenizer", str(teacher / "tokenizer.json")]
    common = ["train", "--config", "tiny", "--data", str(corpus), *FP32, *shape, "--teacher", str(teacher)]
    common += ["--set", "train.max_steps=3", "--set", "train.log_every=1", "--set", "train.seq_len=32"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main([*common, "--out", str(single), "--set", "train.batch_size=4"]) == 0
    result = torchrun(*common, "--out", str(ddp), "--set", "train.batch_size=2")
    assert result.returncode == 0, result.stderr[-3000:]
    for key in ("loss", "distill_kl", "ce"):
        one, two = ([r[key] for r in log_lines(run) if key in r] for run in (single, ddp))
        assert len(one) == 3 and two == pytest.approx(one, rel=1e-5), key
    fsdp = torchrun(
        *common, "--out", str(tmp_path / "fsdp"), "--set", "train.batch_size=2", "--set", "train.parallel=fsdp"
    )
    assert fsdp.returncode != 0 and "--teacher does not go with train.parallel=fsdp" in fsdp.stderr
