"""`minigrok train --resume` continues the same run or refuses: corpus, config changes, lock, damaged state."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from minigrok.checkpoint import write_manifest
from minigrok.cli import main
from minigrok.train.run import RunLock
from minigrok.train.tokenizer import byte_tokenizer


def write_corpus(root, tag: str):
    root.mkdir()
    for index in range(4):
        (root / f"part{index}.py").write_text(
            "".join(f"def {tag}_{index}_{n}(x):\n    return x * {n} + {index}\n\n" for n in range(40))
        )
    return root


@pytest.fixture
def run(tmp_path):
    """A finished 4-step run on its own corpus; returns (command, run directory, corpus)."""
    corpus = write_corpus(tmp_path / "corpus", "first")
    out = tmp_path / "run"
    command = ["train", "--config", "tiny", "--out", str(out), "--samples", "0", "--set", "train.ckpt_every=4"]
    assert main(command + ["--data", str(corpus), "--set", "train.max_steps=4"]) == 0
    return command, out, corpus


def segment_records(out):
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "changes" in r]


def test_resume_without_data_continues_on_the_recorded_corpus(run, tmp_path, monkeypatch, capsys):
    command, out, corpus = run
    shard = out / "data" / "train" / "corpus" / "shard-000000.bin"
    tokens, stamp = shard.read_bytes(), shard.stat().st_mtime_ns
    monkeypatch.chdir(tmp_path / "corpus")  # another working directory: the recorded paths are absolute
    assert main(command + ["--resume", "--set", "train.max_steps=8"]) == 0
    assert "step 8: val loss" in capsys.readouterr().out
    assert shard.read_bytes() == tokens  # not re-encoded from the built-in corpus
    assert shard.stat().st_mtime_ns == stamp
    assert json.loads((out / "run.json").read_text())["data"] == [str(corpus)]


def test_resume_refuses_another_corpus_unless_new_data_says_so(run, tmp_path, capsys):
    command, out, corpus = run
    other = write_corpus(tmp_path / "other", "second")
    assert main(command + ["--resume", "--data", str(other), "--set", "train.max_steps=8"]) == 2
    assert "add --new-data to continue on the new one on purpose" in capsys.readouterr().err
    assert main(command + ["--resume", "--data", str(other), "--new-data", "--set", "train.max_steps=8"]) == 0
    assert f"with a change: corpus {corpus} -> {other}" in capsys.readouterr().out
    assert any("corpus" in change for change in segment_records(out)[-1]["changes"])
    assert json.loads((out / "run.json").read_text())["data"] == [str(other)]
    assert main(command + ["--new-data"]) == 2
    assert "--new-data continues a run on another corpus: it needs --resume" in capsys.readouterr().err


def test_resume_refuses_a_changed_or_vanished_corpus(run, capsys):
    command, out, corpus = run
    (corpus / "part1.py").write_text("def changed():\n    pass\n" * 50)
    assert main(command + ["--resume", "--set", "train.max_steps=8"]) == 2
    assert "files of" in (err := capsys.readouterr().err) and "changed since the run recorded them" in err
    for path in corpus.iterdir():
        path.unlink()
    corpus.rmdir()
    assert main(command + ["--resume", "--set", "train.max_steps=8"]) == 2
    assert "is gone" in capsys.readouterr().err


def test_changed_optimizer_settings_apply_for_real_and_are_logged(run, capsys):
    command, out, _ = run
    changes = ["--set", "train.weight_decay=0.5", "--set", "train.beta1=0.8", "--set", "train.max_steps=8"]
    assert main(command + ["--resume", *changes]) == 0
    out_text = capsys.readouterr().out
    assert "resumed at step 4 with a change: train.weight_decay: 0.1 -> 0.5" in out_text
    groups = json.loads((out / "ckpt-8" / "trainer_state.json").read_text())["optimizer_param_groups"]
    assert (groups[0]["weight_decay"], groups[0]["betas"][0]) == (0.5, 0.8)
    assert groups[1]["weight_decay"] == 0.0  # norm gains never decay
    assert {"train.beta1: 0.9 -> 0.8", "train.weight_decay: 0.1 -> 0.5"} <= set(segment_records(out)[-1]["changes"])


def test_fields_that_define_the_data_cannot_change_on_resume(run, capsys):
    command, _, _ = run
    assert main(command + ["--resume", "--set", "train.tokenizer_vocab_size=300"]) == 2
    assert "train.tokenizer_vocab_size is fixed by the run's tokenizer" in capsys.readouterr().err
    assert main(command + ["--resume", "--set", "train.val_fraction=0.3"]) == 2
    assert "train.val_fraction is fixed by the run's data split" in capsys.readouterr().err


def test_a_second_process_is_refused_with_the_holders_pid(run, capsys):
    command, out, _ = run
    with RunLock(out):
        assert main(command + ["--resume", "--set", "train.max_steps=8"]) == 2
        assert f"is in use: process {os.getpid()} is training into it" in capsys.readouterr().err
    assert main(command + ["--resume", "--set", "train.max_steps=8"]) == 0  # released with its holder


def test_out_that_is_a_file_fails_before_any_work(tmp_path, capsys):
    path = tmp_path / "taken"
    path.write_text("not a run")
    assert main(["train", "--config", "tiny", "--out", str(path), "--data", str(tmp_path)]) == 2
    assert f"--out {path} is a file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_wrong_shaped_optimizer_moments_are_refused_not_run(run, capsys):
    command, out, _ = run
    path = out / "ckpt-4" / "optimizer.safetensors"
    tensors = load_file(path)
    name = next(key for key in tensors if key.endswith("exp_avg"))
    tensors[name] = torch.randn(3)  # the fused AdamW kernel would read far past its end
    save_file(tensors, path)
    assert main(command + ["--resume", "--set", "train.max_steps=8"]) == 2  # the manifest no longer matches
    assert f"{path} is missing or not the" in capsys.readouterr().err
    write_manifest(out / "ckpt-4", json.loads((out / "ckpt-4" / "config.json").read_text()))  # crafted whole
    assert main(command + ["--resume", "--set", "train.max_steps=8"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and f"tensor {name} is (3,) torch.float32" in err


def test_a_flipped_bit_in_the_weights_is_caught_on_load(run, capsys):
    command, out, _ = run
    path = out / "ckpt-4" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's data: the file still parses
    path.write_bytes(bytes(data))
    assert main(command + ["--resume", "--set", "train.max_steps=8"]) == 2
    assert f"{path} does not match its sha256" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(out), "--max-new-tokens", "2"]) == 2
    assert "does not match its sha256" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(out), "--max-new-tokens", "2", "--no-verify"]) == 0


def test_a_swapped_tokenizer_is_refused_with_both_fingerprints(run, capsys):
    command, out, _ = run
    byte_tokenizer().save(out / "ckpt-4" / "tokenizer.json")  # the run trained a BPE tokenizer
    assert main(command + ["--resume", "--set", "train.max_steps=8"]) == 2
    assert "tokenizer.json is missing or not the" in capsys.readouterr().err  # the manifest sees it first
    write_manifest(out / "ckpt-4", json.loads((out / "ckpt-4" / "config.json").read_text()))  # swapped with care
    assert main(command + ["--resume", "--set", "train.max_steps=8"]) == 2
    err = capsys.readouterr().err
    assert "the run was trained with tokenizer" in err and byte_tokenizer().fingerprint()[:12] in err


def test_a_torn_last_log_line_is_dropped_and_other_damage_is_named(run, capsys):
    command, out, _ = run
    log = out / "log.jsonl"
    intact = log.read_text()
    log.write_text(intact + '{"step": 5, "loss": 3.1, "lr')  # a write cut short by a kill or a full disk
    assert main(command + ["--resume", "--set", "train.max_steps=8"]) == 0
    assert "dropped a torn last line" in capsys.readouterr().err
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:1] + ["garbage"] + lines[1:]) + "\n")
    assert main(command + ["--resume", "--set", "train.max_steps=12"]) == 2
    assert f"{log}:2 is not a log record" in capsys.readouterr().err


def test_a_half_deleted_or_linked_checkpoint_is_passed_over_and_never_breaks_a_save(run, tmp_path, capsys):
    command, out, _ = run
    assert main(command + ["--resume", "--set", "train.max_steps=8"]) == 0
    (out / "ckpt-8" / "optimizer.safetensors").unlink()  # as a kill halfway through an old-style delete left it
    assert main(command + ["--resume", "--set", "train.max_steps=12"]) == 0
    assert "ckpt-8 is incomplete" in capsys.readouterr().err
    elsewhere = tmp_path / "kept"
    (out / "ckpt-12").rename(elsewhere)
    (out / "ckpt-12").symlink_to(elsewhere)  # a user's link in the checkpoint names
    assert main(command + ["--resume", "--set", "train.max_steps=16", "--set", "train.keep_last=1"]) == 0
    assert (elsewhere / "manifest.json").is_file()  # the link's target is never deleted through it
    assert not list(out.glob(".ckpt-*"))  # nothing left half-renamed or half-deleted


def test_a_full_disk_during_data_preparation_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    import minigrok.train.shards as shards

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    corpus = write_corpus(tmp_path / "corpus", "full")
    monkeypatch.setattr(shards, "atomic_write", full)
    command = ["train", "--config", "tiny", "--out", str(tmp_path / "run"), "--data", str(corpus), "--samples", "0"]
    assert main(command) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("minigrok train: error: [Errno 28] No space left on device") and "\n" not in err


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_last_one(run, monkeypatch, capsys):
    from safetensors import SafetensorError

    import minigrok.checkpoint as checkpoint

    command, out, _ = run

    def full(tensors, path, metadata=None):  # safetensors' own error for ENOSPC, after part of the file is out
        with open(path, "wb") as f:
            f.write(b"\0" * 64)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    assert main(command + ["--resume", "--set", "train.max_steps=8"]) == 1
    (err,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # beside the progress bar
    assert err.startswith("minigrok train: error: saving ") and "No space left on device" in err
    assert "ckpt-4 is the newest checkpoint kept" in err
    assert not list(out.glob(".ckpt-*")) and sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-4"]
    monkeypatch.undo()
    assert main(command + ["--resume", "--set", "train.max_steps=8"]) == 0
    assert (out / "ckpt-8" / "manifest.json").is_file()


def test_a_muon_run_saves_its_momentum_and_refuses_the_other_optimizers_state(run, tmp_path, capsys):
    command, out, corpus = run  # trained with AdamW
    assert main(command + ["--resume", "--set", "train.optimizer=muon", "--set", "train.max_steps=8"]) == 2
    err = capsys.readouterr().err
    assert "the run was trained with train.optimizer=adamw, but this one uses train.optimizer=muon" in err
    assert "--set train.optimizer=adamw" in err
    muon_out = tmp_path / "muon"
    muon = ["train", "--config", "tiny", "--out", str(muon_out), "--samples", "0", "--data", str(corpus)]
    muon += ["--set", "train.optimizer=muon", "--set", "train.ckpt_every=4", "--set", "train.log_every=2"]
    assert main(muon + ["--set", "train.max_steps=4"]) == 0
    assert "optimizer: Muon (lr 0.003, momentum 0.95, match_rms_adamw" in capsys.readouterr().out
    assert segment_records(muon_out)[0]["optimizer"] == "muon"
    steps = [r for r in map(json.loads, (muon_out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert all(r["muon_lr"] > 0 for r in steps) and len(steps) == 2
    path = muon_out / "ckpt-4" / "optimizer.safetensors"
    tensors = load_file(path)
    name = next(key for key in tensors if key.endswith("momentum_buffer"))
    assert any(key.endswith("exp_avg") for key in tensors)  # AdamW's moments beside Muon's buffers
    assert main(muon + ["--resume", "--set", "train.optimizer=adamw", "--set", "train.max_steps=8"]) == 2
    assert "trained with train.optimizer=muon, but this one uses train.optimizer=adamw" in capsys.readouterr().err
    tensors[name] = torch.randn(5)
    save_file(tensors, path)
    write_manifest(muon_out / "ckpt-4", json.loads((muon_out / "ckpt-4" / "config.json").read_text()))
    assert main(muon + ["--resume", "--set", "train.max_steps=8"]) == 2
    assert f"tensor {name} is (5,) torch.float32" in capsys.readouterr().err
