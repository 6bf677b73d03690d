"""save_pretrained / from_pretrained: round trips, and clear errors for every kind of damaged checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_file

from minigrok import MiniGrok, ModelConfig
from minigrok.checkpoint import CheckpointError, atomic_write

CONFIG = dict(vocab_size=97, dim=48, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=80, max_seq_len=32)


@pytest.mark.parametrize("share,tied", [("none", True), ("cycle", True), ("all", False)])
def test_round_trip_keeps_logits_ties_and_sharing(tmp_path, share, tied):
    torch.manual_seed(0)
    model = MiniGrok(ModelConfig(**CONFIG, share=share, tie_embeddings=tied))
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert len(stored) == len(model.state_dict())  # each tied/shared tensor stored once
    assert sum(t.numel() for t in stored.values()) == model.report().unique_params
    loaded = MiniGrok.from_pretrained(tmp_path)
    assert loaded.config == model.config and loaded.schedule == model.schedule
    ids = torch.randint(0, 97, (2, 12))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    if tied:
        assert loaded.lm_head is None
    loaded(ids, targets=ids).loss.backward()  # loaded parameters are real, trainable leaves


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        MiniGrok.from_pretrained(tmp_path)
    MiniGrok(ModelConfig(**CONFIG)).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        MiniGrok.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_truncated_or_corrupt_weights(tmp_path, damage):
    MiniGrok(ModelConfig(**CONFIG)).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07" * 64 + data[64:], "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        MiniGrok.from_pretrained(tmp_path)


def test_corrupt_config_and_shape_mismatch(tmp_path):
    MiniGrok(ModelConfig(**CONFIG)).save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    good = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(good | {"dim": 64, "ffn_dim": 96}))
    with pytest.raises(CheckpointError, match="has shape .* but the config implies"):
        MiniGrok.from_pretrained(tmp_path)
    config_path.write_text(json.dumps(good | {"n_kv_heads": 3}))
    with pytest.raises(CheckpointError, match="n_kv_heads=3 does not divide"):
        MiniGrok.from_pretrained(tmp_path)
    config_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        MiniGrok.from_pretrained(tmp_path)


def test_crash_mid_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    torch.manual_seed(1)
    first = MiniGrok(ModelConfig(**CONFIG))
    first.save_pretrained(tmp_path)
    second = MiniGrok(ModelConfig(**CONFIG))

    def crash_after_half(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr("minigrok.checkpoint.save_file", crash_after_half)
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp left behind
    ids = torch.randint(0, 97, (1, 8))
    assert torch.equal(MiniGrok.from_pretrained(tmp_path)(ids).logits, first(ids).logits)


def test_atomic_write_replaces_whole_files(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write(target, lambda tmp: open(tmp, "w").write("one"))
    atomic_write(target, lambda tmp: open(tmp, "w").write("two"))
    assert target.read_text() == "two" and len(list(target.parent.iterdir())) == 1
