"""save_pretrained / from_pretrained: round trips, and clear errors for every kind of damaged checkpoint."""

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minigrok import MiniGrok, ModelConfig
from minigrok.checkpoint import CheckpointError, ConfigChangedWarning
from minigrok.files import atomic_write
from minigrok.model import parameter_shapes

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
    assert loaded.config == model.config and loaded.layer_blocks == model.layer_blocks
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
    with pytest.raises(CheckpointError, match="not the .* bytes it was saved with|does not match its sha256"):
        MiniGrok.from_pretrained(tmp_path)  # the manifest sees the damage first
    (tmp_path / "manifest.json").unlink()  # a directory saved before manifests: the parser sees the damage
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        MiniGrok.from_pretrained(tmp_path)


def test_corrupt_config_and_shape_mismatch(tmp_path):
    MiniGrok(ModelConfig(**CONFIG)).save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    good = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(good | {"dim": 64, "ffn_dim": 96}))
    with (
        pytest.raises(CheckpointError, match="has shape .* but the config implies"),
        pytest.warns(ConfigChangedWarning),
    ):
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
    ids = torch.randint(0, 97, (1, 8))
    assert torch.equal(MiniGrok.from_pretrained(tmp_path)(ids).logits, first(ids).logits)


def test_atomic_write_replaces_whole_files(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write(target, lambda tmp: open(tmp, "w").write("one"))
    atomic_write(target, lambda tmp: open(tmp, "w").write("two"))
    assert target.read_text() == "two" and len(list(target.parent.iterdir())) == 1


@pytest.mark.parametrize("share,tied", [("none", True), ("immediate", False), ("all", True), ("cycle", False)])
def test_parameter_shapes_are_the_state_dict_by_arithmetic(share, tied):
    config = ModelConfig(
        **(CONFIG | {"n_layers": 6}),
        share=share,
        n_unique_layers=3 if share in ("immediate", "cycle") else None,
        tie_embeddings=tied,
    )
    state = MiniGrok(config).state_dict()
    assert parameter_shapes(config) == {name: tuple(t.shape) for name, t in state.items()}


@pytest.mark.parametrize(
    "content,message",
    [("[1, 2]", "holds a JSON list, not an object"), ("null", "holds a JSON NoneType"), ('{"dim": 48}', "missing")],
)
def test_config_json_of_the_wrong_kind_is_a_clear_error(tmp_path, content, message):
    MiniGrok(ModelConfig(**CONFIG)).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=message):
        MiniGrok.from_pretrained(tmp_path)


def test_a_crafted_huge_config_fails_before_anything_is_built(tmp_path):
    MiniGrok(ModelConfig(**CONFIG)).save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config_path.write_text(
        json.dumps(json.loads(config_path.read_text()) | {"n_layers": 20000, "n_unique_layers": 20000})
    )
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="does not match its config: missing"), pytest.warns(ConfigChangedWarning):
        MiniGrok.from_pretrained(tmp_path)
    assert time.perf_counter() - start < 5  # checked from the header: 20000 blocks were never built


def test_a_shape_neutral_config_edit_loads_with_a_warning_naming_it(tmp_path):
    model = MiniGrok(ModelConfig(**CONFIG))
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"rope_theta": 500000.0}))
    with pytest.warns(ConfigChangedWarning, match=r"rope_theta \(10000.0 -> 500000.0\)"):
        assert MiniGrok.from_pretrained(tmp_path).config.rope_theta == 500000.0


def test_a_checkpoint_saved_before_newer_config_fields_loads_without_a_warning(tmp_path):
    """config.json and the manifest of an older checkpoint both lack the fields added since (window, MoE, conv
    layers, qk_norm, mlp, zero_init_proj, embed_dim): both take the defaults, so nothing changed and nothing is said."""
    import warnings

    model = MiniGrok(ModelConfig(**CONFIG))
    model.save_pretrained(tmp_path)
    newer = ("window", "window_pattern", "n_experts", "experts_per_token", "moe_layers", "moe_ffn_dim", "layer_pattern")
    newer += ("logit_softcap",)
    newer += ("qk_norm", "mlp", "zero_init_proj", "embed_dim")
    manifest, config_path = tmp_path / "manifest.json", tmp_path / "config.json"
    for path, key in ((manifest, "config"), (config_path, None)):
        data = json.loads(path.read_text())
        fields = data[key] if key else data
        for name in newer:
            del fields[name]
        path.write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigChangedWarning)
        loaded = MiniGrok.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.head_weight, model.head_weight)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64])
def test_weights_of_an_unexpected_dtype_are_a_clear_error(tmp_path, dtype):
    model = MiniGrok(ModelConfig(**CONFIG))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["norm.weight"] = tensors["norm.weight"].to(dtype)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="tensor 'norm.weight' is (I32|F64) among .*convert the file"):
        MiniGrok.from_pretrained(tmp_path)


def test_atomic_writes_get_the_umask_permissions_like_open(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
        (tmp_path / "b.txt").write_text("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]  # no temporary file left
