"""Conversion to and from the Hugging Face Llama layout (LlamaForCausalLM), without importing transformers.

Our fused qkv_proj / gate_up_proj split into Llama's q/k/v and gate/up projections; the RoPE layout is the same.
Shared-layer models export with each shared block copied to every position that uses it (Llama has no sharing),
so an exported model has n_layers unique blocks and imports back with share="none".
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import WEIGHT_DTYPES, CheckpointError, read_header, read_json, read_tensors, write_json, write_tensors
from .config import ConfigError, ModelConfig, show
from .model import MiniGrok, parameter_shapes

_BLOCK_NORMS = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight"}


def hf_config_dict(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The Llama config.json fields describing `config`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def export_hf(model: MiniGrok, directory: str | Path) -> None:
    """Write config.json + model.safetensors that transformers.LlamaForCausalLM.from_pretrained loads."""
    config, state = model.config, model.state_dict()
    q_size, kv_size = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    tensors = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = state["lm_head.weight"]
    for layer, block in enumerate(model.schedule):
        ours, theirs = f"blocks.{block}.", f"model.layers.{layer}."
        q, k, v = state[ours + "attn.qkv_proj.weight"].split([q_size, kv_size, kv_size])
        gate, up = state[ours + "mlp.gate_up_proj.weight"].chunk(2)
        tensors |= {
            theirs + "self_attn.q_proj.weight": q,
            theirs + "self_attn.k_proj.weight": k,
            theirs + "self_attn.v_proj.weight": v,
            theirs + "self_attn.o_proj.weight": state[ours + "attn.o_proj.weight"],
            theirs + "mlp.gate_proj.weight": gate,
            theirs + "mlp.up_proj.weight": up,
            theirs + "mlp.down_proj.weight": state[ours + "mlp.down_proj.weight"],
        }
        tensors |= {theirs + hf_name: state[ours + name] for name, hf_name in _BLOCK_NORMS.items()}
    # Shared blocks appear at several layers: give each its own storage, as safetensors stores no aliases.
    tensors = {name: t.clone() for name, t in tensors.items()}
    directory = Path(directory)
    write_tensors(directory / "model.safetensors", tensors, metadata={"format": "pt"})
    write_json(directory / "config.json", hf_config_dict(config, model.embed.weight.dtype))


_REQUIRED_HF = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_IGNORED_HF = ("rotary_emb.inv_freq",)  # buffers some older Llama checkpoints carry: recomputed, never weights


def _config_from_hf(hf: object, path: Path) -> ModelConfig:
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path} holds a JSON {type(hf).__name__}, not a Llama config object")
    if hf.get("model_type") != "llama":
        raise CheckpointError(
            f"{path}: model_type={show(hf.get('model_type'))}; import_hf reads Llama checkpoints only"
        )
    if missing := [key for key in _REQUIRED_HF if key not in hf]:
        raise CheckpointError(f"{path} lacks {missing}: a Llama config.json needs {list(_REQUIRED_HF)}")
    rope = hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f'{path}: rope_parameters={show(rope)} must be an object such as {{"rope_theta": 10000}}')
    rope_type = rope.get("rope_type", "default")
    if hf.get("rope_scaling") or rope_type != "default":
        raise CheckpointError(
            f"{path}: RoPE scaling ({show(hf.get('rope_scaling') or rope_type)}) is not supported; only plain RoPE"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise CheckpointError(f"{path}: {flag}=true is not supported; minigrok's linears have no bias")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: hidden_act={show(hf['hidden_act'])}; only SwiGLU (silu) MLPs are supported")
    n_heads = hf["num_attention_heads"]
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim")
            or (hf["hidden_size"] // n_heads if isinstance(n_heads, int) and n_heads else None),
            ffn_dim=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"{path}: {error}") from error


def _weight_files(directory: Path) -> list[Path]:
    """model.safetensors, or the shards model.safetensors.index.json names: each inside `directory`, or refused."""
    index_path = directory / "model.safetensors.index.json"
    if not index_path.is_file():
        return [directory / "model.safetensors"]
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path} has no weight_map of tensor names to shard files: restore it")
    root = directory.resolve()
    files = []
    for name in sorted(set(weight_map.values())):
        path = (directory / name).resolve()
        if not path.is_relative_to(root):
            raise CheckpointError(f"{index_path} names the shard {name!r}, outside {directory}: refused")
        files.append(path)
    return files


def _read_hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Llama checkpoint, in one floating dtype (checked from the headers before loading)."""
    files = _weight_files(directory)
    dtypes = {name: dtype for path in files for name, (_, dtype) in read_header(path).items()}
    if len(set(dtypes.values())) > 1 or not set(dtypes.values()) <= WEIGHT_DTYPES:
        found = sorted(set(dtypes.values()))
        raise CheckpointError(f"{directory}: the weights are {found}; import_hf takes one of {sorted(WEIGHT_DTYPES)}")
    tensors = {}
    for path in files:
        tensors |= read_tensors(path)
    return tensors


def import_hf(directory: str | Path) -> MiniGrok:
    """Build a MiniGrok (share="none") from a Hugging Face Llama directory of config.json + safetensors.

    Every tensor of the checkpoint must be used: layers beyond num_hidden_layers, or names we do not know, are
    refused rather than dropped."""
    directory = Path(directory)
    config = _config_from_hf(read_json(directory / "config.json"), directory / "config.json")
    hf = _read_hf_tensors(directory)
    unused = {name for name in hf if not name.endswith(_IGNORED_HF)}

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise CheckpointError(f"{directory}: tensor {name!r} is missing from the Llama checkpoint")
        unused.discard(name)
        return hf[name]

    state = {"embed.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if not config.tie_embeddings:
        state["lm_head.weight"] = take("lm_head.weight")
    for layer in range(config.n_layers):
        ours, theirs = f"blocks.{layer}.", f"model.layers.{layer}."
        attn = [take(theirs + f"self_attn.{p}_proj.weight") for p in "qkv"]
        state[ours + "attn.qkv_proj.weight"] = torch.cat(attn)
        state[ours + "attn.o_proj.weight"] = take(theirs + "self_attn.o_proj.weight")
        state[ours + "mlp.gate_up_proj.weight"] = torch.cat(
            [take(theirs + f"mlp.{p}_proj.weight") for p in ("gate", "up")]
        )
        state[ours + "mlp.down_proj.weight"] = take(theirs + "mlp.down_proj.weight")
        state |= {ours + name: take(theirs + hf_name) for name, hf_name in _BLOCK_NORMS.items()}
    if unused:
        layers = sorted(
            {int(n.split(".")[2]) for n in unused if n.startswith("model.layers.") and n.split(".")[2].isdigit()}
        )
        hint = f"layers up to {layers[-1]}, but num_hidden_layers={config.n_layers}" if layers else "unknown tensors"
        raise CheckpointError(
            f"{directory}: the weights hold {hint} ({sorted(unused)[:3]}): fix config.json or the weights"
        )
    expected = parameter_shapes(config)
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{directory}: {name} has shape {tuple(tensor.shape)}, config.json implies {expected[name]}"
            )
    model = MiniGrok(config)
    model.load_state_dict(state)
    return model.to(state["embed.weight"].dtype)
