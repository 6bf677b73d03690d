"""The training loop: real learning, bit-exact resume, crash-safe checkpoints, divergence stops, schedules."""

import json
import math
from pathlib import Path

import pytest
import torch

from minigrok import ConfigError, MiniGrok, ModelConfig
from minigrok.train import checkpoint
from minigrok.train.config import TrainConfig
from minigrok.train.data import prepare_data
from minigrok.train.optim import lr_at
from minigrok.train.tokenizer import VocabMismatchError, byte_tokenizer
from minigrok.train.trainer import Trainer, TrainingDiverged

TEXT = (
    "The quick brown fox jumps over the lazy dog. A small model can learn this sentence by heart, "
    "and then predict every next byte of it almost perfectly.\n"
)
MODEL = dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)


@pytest.fixture
def data(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 40)
    return prepare_data(tmp_path / "data", byte_tokenizer(), [str(corpus)], val_fraction=0.1)


def make_trainer(data, run_dir, resume=False, **train_overrides):
    torch.manual_seed(0)
    values = (
        dict(
            batch_size=4,
            seq_len=48,
            max_steps=8,
            lr=3e-3,
            warmup_steps=2,
            eval_every=4,
            eval_tokens=256,
            log_every=2,
            ckpt_every=4,
            keep_last=3,
            peak_flops=1e11,
        )
        | train_overrides
    )
    model = MiniGrok(ModelConfig(**MODEL))
    trainer = Trainer(model, TrainConfig(**values), data, byte_tokenizer(), run_dir, progress=False)
    if resume:
        trainer.load_state_dict(checkpoint.load_checkpoint(checkpoint.latest_checkpoint(Path(run_dir))))
    return trainer


def test_tiny_model_memorises_a_text(data, tmp_path):
    trainer = make_trainer(data, tmp_path / "run", max_steps=400, eval_every=400, ckpt_every=400, lr=1e-2)
    final = trainer.train()
    # Uniform guessing over 320 ids costs ln(320) = 5.8 nats; a memorised sentence costs far less.
    assert final["val_loss"] < 0.5, final
    assert final["val_bpb"] < 0.75


def optimizer_tensors(trainer):
    return {
        f"{index}.{key}": value
        for index, state in trainer.optimizer.state_dict()["state"].items()
        for key, value in state.items()
    }


QAT = {"qat": "int4", "qat_group_size": 32, "qat_start_step": 2}
MUON = {"optimizer": "muon", "muon_lr": 0.01, "muon_momentum_warmup_steps": 6, "grad_accum": 2}


@pytest.mark.parametrize("overrides", [{}, QAT, MUON], ids=["float", "qat", "muon"])
def test_resume_is_bit_exact(data, tmp_path, monkeypatch, overrides):
    straight = make_trainer(data, tmp_path / "straight", **overrides)
    straight.train()

    original_save = Trainer.save_checkpoint

    def save_then_die(self):
        path = original_save(self)
        if self.step == 4:
            raise KeyboardInterrupt("killed")
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(data, tmp_path / "killed", **overrides).train()
    monkeypatch.undo()
    resumed = make_trainer(data, tmp_path / "killed", resume=True, **overrides)
    assert resumed.step == 4
    resumed.train()
    assert resumed.step == straight.step == 8
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    resumed_state = optimizer_tensors(resumed)
    for name, value in optimizer_tensors(straight).items():
        assert torch.equal(resumed_state[name], value), name
    # The log holds each step once, as if the run had never stopped.
    steps = [line for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 4


def test_muon_trains_a_compiled_model_as_an_eager_one(data, tmp_path):
    losses = {}
    for compile in (False, True):
        make_trainer(data, tmp_path / str(compile), compile=compile, max_steps=4, log_every=1, **MUON).train()
        records = map(json.loads, (tmp_path / str(compile) / "log.jsonl").read_text().splitlines())
        losses[compile] = [record["loss"] for record in records if "loss" in record]
    assert losses[True][-1] < losses[True][0] - 0.1
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_qat_switches_on_at_its_start_step(data, tmp_path):
    runs = {}
    for name, overrides in [("float", {}), ("qat", QAT | {"qat_start_step": 3})]:
        make_trainer(data, tmp_path / name, max_steps=4, ckpt_every=2, **overrides).train()
        runs[name] = {step: MiniGrok.from_pretrained(tmp_path / name / f"ckpt-{step}").state_dict() for step in (2, 4)}
    weight = "blocks.0.attn.qkv_proj.weight"  # plain names in the QAT run's checkpoints too
    assert torch.equal(runs["qat"][2][weight], runs["float"][2][weight])  # float training before the start step
    assert not torch.equal(runs["qat"][4][weight], runs["float"][4][weight])


def test_interrupted_checkpoint_write_keeps_the_previous_one(data, tmp_path, monkeypatch):
    trainer = make_trainer(data, tmp_path / "run", max_steps=4)
    trainer.train()
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path / "run")] == ["ckpt-4"]

    def failing_write(path, tensors, metadata=None):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_tensors", failing_write)
    trainer.config.max_steps = 8
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    monkeypatch.undo()
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path / "run")] == ["ckpt-4"]
    restored = MiniGrok.from_pretrained(tmp_path / "run" / "ckpt-4")
    assert restored.config == trainer.model.config
    assert make_trainer(data, tmp_path / "run", resume=True).step == 4  # and the run resumes from it


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch):
    trainer = make_trainer(data, tmp_path / "run", max_steps=10, ckpt_every=2)
    forward = trainer.model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if trainer.step == 5:
            out.loss = out.loss * float("nan")
        return out

    trainer.forward = poisoned
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5.*ckpt-4"):
        trainer.train()
    good = MiniGrok.from_pretrained(tmp_path / "run" / "ckpt-4")
    assert all(torch.isfinite(p).all() for p in good.parameters())


def test_a_target_outside_the_vocabulary_is_named_not_taken_for_divergence(data, tmp_path, monkeypatch):
    import importlib

    cross_entropy = importlib.import_module("minigrok.functional.cross_entropy")  # the module, not the function
    # As on CUDA, where the loss checks no values (that would wait on the device): a bad target gives a NaN row.
    monkeypatch.setattr(cross_entropy, "reading_back_is_free", lambda t: False)
    trainer = make_trainer(data, tmp_path / "run", max_steps=4)
    batch = trainer.sampler.batch

    def corrupt(step, micro_step=0, rows=slice(None)):  # a damaged token file: a bad id only in a last target
        inputs, targets = batch(step, micro_step, rows)
        targets[:, -1] = MODEL["vocab_size"] + 3
        return inputs, targets

    monkeypatch.setattr(trainer.sampler, "batch", corrupt)
    with pytest.raises(TrainingDiverged, match=r"step 0 reads token id 323, outside the model's vocabulary of 320"):
        trainer.train()


def test_pruning_keeps_the_best_checkpoint(data, tmp_path):
    trainer = make_trainer(data, tmp_path / "run", max_steps=12, keep_last=1, ckpt_every=2, eval_every=2)
    trainer.train()
    names = [p.name for p in checkpoint.checkpoint_dirs(tmp_path / "run")]
    assert names[-1] == "ckpt-12" and f"ckpt-{trainer.best_step}" in names and len(names) <= 2


def test_vocab_and_length_checks_at_train_start(data, tmp_path):
    small = MiniGrok(ModelConfig(**(MODEL | {"vocab_size": 200})))
    with pytest.raises(VocabMismatchError, match="259"):
        Trainer(small, TrainConfig(max_steps=1), data, byte_tokenizer(), tmp_path / "run")
    with pytest.raises(ValueError, match="train.seq_len=128 exceeds model.max_seq_len=64"):
        Trainer(MiniGrok(ModelConfig(**MODEL)), TrainConfig(max_steps=1, seq_len=128), data, byte_tokenizer(), tmp_path)


def test_learning_rate_schedules():
    cosine = TrainConfig(max_steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cosine, 0, 0.0) == pytest.approx(0.1)
    assert lr_at(cosine, 9, 0.0) == pytest.approx(1.0)
    assert lr_at(cosine, 60, 0.0) == pytest.approx(0.55)  # half way through the decay
    assert lr_at(cosine, 110, 1.0) == pytest.approx(0.1)
    wsd = TrainConfig(max_steps=100, lr=1.0, warmup_steps=0, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_at(wsd, 50, 0.5) == 1.0 and lr_at(wsd, 90, 0.9) == pytest.approx(0.5)
    by_time = TrainConfig(max_minutes=1.0, lr=1.0, warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(by_time, 1000, 0.5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({}, "no budget"),
        ({"max_steps": 10, "dtype": "fp8"}, "train.dtype='fp8' is unknown"),
        ({"max_steps": 10, "batch_size": 0}, "train.batch_size=0 must be an integer >= 1"),
        ({"max_steps": 10, "schedule": "linear"}, "train.schedule='linear'"),
        ({"max_steps": 10, "lr": -1}, "train.lr=-1 must be a positive number"),
        ({"max_steps": 10, "device": "tpu"}, "train.device='tpu'"),
        ({"max_steps": 10, "optimizer": "sgd"}, r"train.optimizer='sgd' is unknown: choose one of \('adamw', 'muon'\)"),
        ({"max_steps": 10, "muon_lr": 0}, "train.muon_lr=0 must be a positive number"),
        ({"max_steps": 10, "muon_momentum": 1.0}, r"train.muon_momentum=1.0 must lie in \[0, 1\)"),
        ({"max_steps": 10, "muon_momentum_start": -0.1}, r"train.muon_momentum_start=-0.1 must lie in \[0, 1\)"),
        ({"max_steps": 10, "muon_momentum_warmup_steps": -1}, "train.muon_momentum_warmup_steps=-1 must be an integer"),
        ({"max_steps": 10, "muon_weight_decay": -1}, "train.muon_weight_decay=-1 must be >= 0"),
        ({"max_steps": 10, "muon_adjust_lr": "moonshot"}, "train.muon_adjust_lr='moonshot' is unknown"),
        (
            {"max_steps": 10, "optimizer": "muon", "parallel": "fsdp"},
            "train.optimizer=muon does not go with train.parallel=fsdp",
        ),
    ],
)
def test_train_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**overrides)
