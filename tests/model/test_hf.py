"""Interop with transformers' own LlamaForCausalLM (Ministral, Qwen3): export, import and logits parity in fp32."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from minigrok import MiniGrok, ModelConfig
from minigrok.checkpoint import CheckpointError
from minigrok.hf import export_hf, import_hf

transformers = pytest.importorskip("transformers", reason="HF parity needs the dev extra (pip install -e '.[dev]')")


# The small Hugging Face model the import tests build: 3 layers of width 64, 4 query heads.
SMALL_HF = dict(
    vocab_size=89,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=128,
)


def hf_logits(directory, ids):
    hf = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize(
    "overrides",
    [
        dict(n_heads=4, n_kv_heads=2),  # GQA
        dict(n_heads=4, n_kv_heads=1, tie_embeddings=False, rope_theta=500.0),  # MQA, untied head
        dict(n_heads=6, n_kv_heads=3, head_dim=10),  # head_dim not dim / n_heads
        dict(n_heads=4, n_kv_heads=2, share="immediate"),  # shared blocks unrolled
        dict(n_heads=4, n_kv_heads=2, zero_init_proj=True),  # an init-only option: exports as any Llama
    ],
)
def test_export_matches_transformers_logits(tmp_path, overrides):
    torch.manual_seed(0)
    config = ModelConfig(**(dict(vocab_size=101, dim=48, n_layers=4, ffn_dim=72, max_seq_len=64) | overrides))
    model = MiniGrok(config).eval()
    for p in model.parameters():  # move norms off 1.0 so their mapping is tested too
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    export_hf(model, tmp_path)
    ids = torch.randint(0, 101, (2, 19))
    with torch.no_grad():
        ours = model(ids).logits
    torch.testing.assert_close(hf_logits(tmp_path, ids), ours, rtol=1e-5, atol=1e-5)
    back = import_hf(tmp_path)
    assert back.config.share == "none" and back.config.n_layers == config.n_layers
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture,n_kv_heads,tied", [("Llama", 2, False), ("Llama", 1, True), ("Qwen3", 2, False)])
def test_import_random_llama_and_qwen3(tmp_path, architecture, n_kv_heads, tied):
    """A Qwen3 imports as a QK-norm model (its head_dim, 12, not hidden_size / heads)."""
    torch.manual_seed(1)
    hf_config = getattr(transformers, f"{architecture}Config")(
        **SMALL_HF,
        num_key_value_heads=n_kv_heads,
        head_dim=12,
        rms_norm_eps=1e-6,
        rope_theta=2000.0,
        tie_word_embeddings=tied,
    )
    hf = getattr(transformers, f"{architecture}ForCausalLM")(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path)
    model = import_hf(tmp_path).eval()
    assert model.config.n_kv_heads == n_kv_heads and model.config.tie_embeddings == tied
    assert model.config.qk_norm == (architecture == "Qwen3") and model.config.head_dim == 12
    ids = torch.randint(0, 89, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_import_rejects_non_llama(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(CheckpointError, match="model_type='gpt2'"):
        import_hf(tmp_path)


def exported(tmp_path, **overrides):
    """A small model exported to tmp_path/hf (needs no transformers): the directory, its config and tensors."""
    torch.manual_seed(0)
    config = ModelConfig(**(dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64) | overrides))
    export_hf(MiniGrok(config), tmp_path / "hf")
    directory = tmp_path / "hf"
    return directory, json.loads((directory / "config.json").read_text()), load_file(directory / "model.safetensors")


def test_the_shard_index_cannot_reach_outside_the_model_directory(tmp_path):
    directory, _, tensors = exported(tmp_path)
    save_file(tensors, tmp_path / "outside.safetensors")
    for shard in ("../outside.safetensors", str(tmp_path / "outside.safetensors"), "/etc/passwd"):
        index = {"weight_map": {name: shard for name in tensors}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match="outside .*: refused"):
            import_hf(directory)
    (directory / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="has no weight_map"):
        import_hf(directory)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: [c], "holds a JSON list, not a Llama config"),
        (lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, r"lacks \['hidden_size'\]"),
        (lambda c: c | {"rope_parameters": [1, 2]}, "rope_parameters=.* must be an object"),
        (lambda c: c | {"num_attention_heads": "four"}, "num_attention_heads|n_heads"),
        (lambda c: c | {"num_hidden_layers": 1}, "the weights hold layers up to 1, but num_hidden_layers=1"),
    ],
)
def test_damaged_llama_configs_are_clear_errors(tmp_path, edit, message):
    directory, config, _ = exported(tmp_path)
    (directory / "config.json").write_text(json.dumps(edit(config)))
    with pytest.raises(CheckpointError, match=message):
        import_hf(directory)


def test_mixed_dtypes_are_refused(tmp_path):
    directory, _, tensors = exported(tmp_path)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].half()
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"the weights are \['F16', 'F32'\]"):
        import_hf(directory)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(window=5, window_pattern="SSL", n_kv_heads=2),  # alternating, GQA
        dict(window=1, n_kv_heads=1),  # every layer windowed, MQA: Mistral's single sliding_window
        dict(window=7, window_pattern="LS", share="cycle", n_unique_layers=2),  # the pattern over logical depth
    ],
)
def test_windowed_export_matches_transformers_logits(tmp_path, overrides):
    """Sliding-window models export as Ministral (Llama's tensors with sliding_window and layer_types): the logits
    of transformers' own model, built by AutoModelForCausalLM, on a sequence well past the window."""
    torch.manual_seed(3)
    config = ModelConfig(
        **(dict(vocab_size=101, dim=48, n_layers=4, n_heads=4, ffn_dim=72, max_seq_len=64) | overrides)
    )
    model = MiniGrok(config).eval()
    export_hf(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "ministral" and written["sliding_window"] == config.window
    ids = torch.randint(0, 101, (2, 23))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "MinistralForCausalLM"
    with torch.no_grad():
        ours = model(ids).logits
        torch.testing.assert_close(hf(ids).logits, ours, rtol=1e-5, atol=1e-5)
        full = MiniGrok(ModelConfig(**(config.to_dict() | {"window": None, "window_pattern": "S"}))).eval()
        full.load_state_dict(model.state_dict())
        assert not torch.allclose(full(ids).logits, ours, atol=1e-3)  # the window matters at this length
    back = import_hf(tmp_path)
    assert back.config.layer_windows() == config.layer_windows()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours, rtol=1e-5, atol=1e-5)


def test_import_mistral_with_a_sliding_window(tmp_path):
    """Mistral applies its sliding_window to every layer: the import windows each one and gives its logits."""
    torch.manual_seed(4)
    hf_config = transformers.MistralConfig(**SMALL_HF, num_key_value_heads=2, sliding_window=6)
    hf = transformers.MistralForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = import_hf(tmp_path)
    assert model.config.layer_windows() == [6, 6, 6]
    ids = torch.randint(0, 89, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_bad_layer_types_are_refused(tmp_path):
    directory, config, _ = exported(tmp_path, window=3, window_pattern="SL")
    config["layer_types"] = ["sliding_attention", "chunked_attention"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="layer_types=.*must list sliding_attention or full_attention"):
        import_hf(directory)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(n_heads=4, n_kv_heads=2),  # GQA
        dict(n_heads=4, n_kv_heads=1, tie_embeddings=False, rope_theta=500.0, norm_eps=1e-3),  # eps reaches q/k norms
        dict(n_heads=6, n_kv_heads=3, head_dim=10),  # head_dim not dim / n_heads
        dict(n_heads=4, n_kv_heads=2, share="cycle", n_unique_layers=2, window=5, window_pattern="SL"),
    ],
)
def test_qk_norm_export_matches_transformers_qwen3_logits(tmp_path, overrides):
    """QK-norm models export as Qwen3ForCausalLM (per-head q_norm and k_norm gains before RoPE): its logits."""
    torch.manual_seed(5)
    config = ModelConfig(
        **(dict(vocab_size=101, dim=48, n_layers=4, ffn_dim=72, max_seq_len=64, qk_norm=True) | overrides)
    )
    model = MiniGrok(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # every gain off 1.0, q_norm and k_norm included
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
        model.blocks[0].attn.q_norm.weight.mul_(4)  # large enough that a missing or misplaced q_norm shows
    export_hf(model, tmp_path)
    ids = torch.randint(0, 101, (2, 23))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    with torch.no_grad():
        ours = model(ids).logits
        torch.testing.assert_close(hf(ids).logits, ours, rtol=1e-5, atol=1e-5)
        hf.model.layers[0].self_attn.q_norm.weight.fill_(1.0)
        assert not torch.allclose(hf(ids).logits, ours, atol=1e-3)  # the gains are mapped, not ignored
    back = import_hf(tmp_path)
    assert back.config.qk_norm and back.config.layer_windows() == config.layer_windows()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(mlp="relu2"), "mlp='relu2': the Llama and Qwen3 layouts have SwiGLU MLPs only"),
        (dict(embed_dim=16), "embed_dim=16: the Llama and Qwen3 layouts have no factorised embedding"),
        (dict(embed_dim=16, qk_norm=True), "embed_dim=16"),
    ],
)
def test_export_refuses_what_the_layouts_cannot_hold(tmp_path, overrides, message):
    config = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, **overrides)
    with pytest.raises(ValueError, match=message):
        export_hf(MiniGrok(config), tmp_path)
    assert not any(tmp_path.iterdir())
