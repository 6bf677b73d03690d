"""Conversion to and from the Hugging Face Llama layout (LlamaForCausalLM), without importing transformers.

Our fused qkv_proj / gate_up_proj split into Llama's q/k/v and gate/up projections; the RoPE layout is the same.
Shared-layer models export with each shared block copied to every position that uses it (Llama has no sharing),
so an exported model has n_layers unique blocks and imports back with share="none".
Sliding-window models export as MinistralForCausalLM: Llama's tensors and layout, plus `sliding_window` and the
`layer_types` of each layer (the same window: a query sees itself and the sliding_window - 1 keys before it).
Mistral and Ministral checkpoints import the same way.
QK-norm models export as Qwen3ForCausalLM: Llama's tensors plus each attention's q_norm and k_norm gains, applied per
head over head_dim before RoPE with the model's rms_norm_eps, as ours; with a window, Qwen3's use_sliding_window and
layer_types. Qwen3 checkpoints import back.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .checkpoint import WEIGHT_DTYPES, CheckpointError, read_header, read_json, read_tensors, write_tensors
from .config import ConfigError, ModelConfig, show
from .files import write_json
from .model import MiniGrok, parameter_shapes


def keep_checkout_off_path() -> None:
    """Take this checkout's root off sys.path: transformers imports the Hub's `kernels` package, and Python run from
    the root (`python -m ...` puts it on the path) would find the repository's own kernels/ folder (installed as
    minigrok.kernels) in its place."""
    root = Path(__file__).resolve().parents[1]
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != root]


def import_transformers():
    """transformers, imported so that it finds its own `kernels` package (see keep_checkout_off_path)."""
    keep_checkout_off_path()
    import transformers

    return transformers


# One table drives both directions. Per block: our tensor and the Llama tensors it is made of, concatenated along
# dim 0 in this order (export splits, import concatenates).
BLOCK_NAMES = {
    "attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.o_proj.weight": ("self_attn.o_proj.weight",),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.down_proj.weight": ("mlp.down_proj.weight",),
    "attn_norm.weight": ("input_layernorm.weight",),
    "mlp_norm.weight": ("post_attention_layernorm.weight",),
}
QK_NORM_NAMES = {"attn.q_norm.weight": ("self_attn.q_norm.weight",), "attn.k_norm.weight": ("self_attn.k_norm.weight",)}
TOP_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# ModelConfig field -> Llama config.json key.
CONFIG_NAMES = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "ffn_dim": "intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "max_seq_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
}


def _part_rows(config: ModelConfig) -> dict[str, list[int]]:
    """Rows of each Llama part inside our fused tensors."""
    q_rows, kv_rows = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    return {"attn.qkv_proj.weight": [q_rows, kv_rows, kv_rows], "mlp.gate_up_proj.weight": [config.ffn_dim] * 2}


def block_names(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """BLOCK_NAMES, and with qk_norm the q_norm and k_norm gains of Qwen3's attention."""
    return BLOCK_NAMES | (QK_NORM_NAMES if config.qk_norm else {})


def architecture_fields(config: ModelConfig) -> dict:
    """The architecture and window fields of config.json: Llama's, Ministral's for a sliding-window model, Qwen3's
    (with its sliding-window switch) for a QK-norm one."""
    layer_types = ["full_attention" if w is None else "sliding_attention" for w in config.layer_windows()]
    window = {"sliding_window": config.window, "layer_types": layer_types}
    if config.qk_norm:
        qwen3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False}
        return qwen3 if config.window is None else qwen3 | {"use_sliding_window": True} | window
    if config.window is None:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    return {"architectures": ["MinistralForCausalLM"], "model_type": "ministral"} | window


def window_config(hf: dict, path: Path) -> dict:
    """window and window_pattern of a Llama, Mistral, Ministral or Qwen3 config.json (a layer_types period as the
    pattern)."""
    qwen3 = hf.get("model_type") == "qwen3"
    window = hf.get("sliding_window") if hf.get("model_type") != "llama" else None
    n_layers = hf["num_hidden_layers"] if isinstance(hf["num_hidden_layers"], int) else 0  # ModelConfig checks it
    if qwen3 and not hf.get("use_sliding_window"):
        window = None
    # Without layer_types, Mistral windows every layer, Qwen3 those from max_window_layers on.
    first = hf.get("max_window_layers", 28) if qwen3 else 0
    if not isinstance(first, int):
        raise CheckpointError(f"{path}: max_window_layers={show(first)} must be an integer (the first windowed layer)")
    default_types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    layer_types = hf.get("layer_types") or default_types
    if not isinstance(layer_types, list) or set(layer_types) - {"sliding_attention", "full_attention"}:
        raise CheckpointError(
            f"{path}: layer_types={show(layer_types)} must list sliding_attention or full_attention per layer"
        )
    pattern = "".join("S" if kind == "sliding_attention" else "L" for kind in layer_types)
    if window is None or "S" not in pattern:
        return {}
    period = next(p for p in range(1, len(pattern) + 1) if all(c == pattern[i % p] for i, c in enumerate(pattern)))
    return {"window": window, "window_pattern": pattern[:period]}


def hf_config_dict(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The Llama (or, with a window, Ministral; with qk_norm, Qwen3) config.json fields describing `config`."""
    return (
        architecture_fields(config)
        | {hf_key: getattr(config, field) for field, hf_key in CONFIG_NAMES.items()}
        | {
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }
    )


def export_hf(model: MiniGrok, directory: str | Path) -> None:
    """Write config.json + model.safetensors that transformers.LlamaForCausalLM.from_pretrained loads (a windowed
    model: MinistralForCausalLM, a QK-norm one: Qwen3ForCausalLM; or AutoModelForCausalLM)."""
    config, state = model.config, model.state_dict()
    if config.mlp != "swiglu":
        raise ValueError(
            f"mlp={config.mlp!r}: the Llama and Qwen3 layouts have SwiGLU MLPs only, so this model cannot be "
            "exported; export a model with mlp='swiglu'"
        )
    if config.embed_dim is not None:
        raise ValueError(
            f"embed_dim={config.embed_dim}: the Llama and Qwen3 layouts have no factorised embedding (embed_proj, "
            "head_proj), so this model cannot be exported; export a model with embed_dim=null"
        )
    if config.n_experts:
        raise ValueError(
            f"n_experts={config.n_experts}: the Llama layout has dense MLPs only, so a mixture-of-experts model "
            "cannot be exported; export a dense model (n_experts=0)"
        )
    if "C" in config.layer_kinds():
        raise ValueError(
            f"layer_pattern={config.layer_pattern!r} has convolution (C) layers, which the Llama layout cannot hold: "
            "only models with layer_pattern='A' export to Hugging Face"
        )
    if config.logit_softcap is not None:
        raise ValueError(
            f"logit_softcap={config.logit_softcap}: the Llama layout has no logit soft-capping, so the exported model "
            "would give other logits than this one; only models with logit_softcap=null export to Hugging Face"
        )
    tied = {"lm_head.weight"} if config.tie_embeddings else set()
    tensors = {hf_name: state[name] for name, hf_name in TOP_NAMES.items() if name not in tied}
    part_rows = _part_rows(config)
    for layer, block in enumerate(model.layer_blocks):
        for name, hf_names in block_names(config).items():
            fused = state[f"blocks.{block}.{name}"]
            parts = fused.split(part_rows.get(name, [fused.shape[0]]))
            tensors |= {f"model.layers.{layer}.{hf_name}": part for hf_name, part in zip(hf_names, parts, strict=True)}
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
    if hf.get("model_type") not in ("llama", "mistral", "ministral", "qwen3"):
        raise CheckpointError(
            f"{path}: model_type={show(hf.get('model_type'))}; import_hf reads Llama, Mistral, Ministral and Qwen3 "
            "checkpoints only"
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
    fields = {field: hf[hf_key] for field, hf_key in CONFIG_NAMES.items() if hf.get(hf_key) is not None}
    if "rope_theta" in rope:  # newer configs keep it only here
        fields["rope_theta"] = rope["rope_theta"]
    n_heads = fields["n_heads"]
    fields.setdefault("n_kv_heads", n_heads)
    if hf["model_type"] == "qwen3":
        fields |= {"qk_norm": True} | ({} if "head_dim" in fields else {"head_dim": 128})  # Qwen3's default
    if "head_dim" not in fields and isinstance(n_heads, int) and n_heads:
        fields["head_dim"] = fields["dim"] // n_heads
    fields["tie_embeddings"] = bool(fields.get("tie_embeddings", False))  # Llama's defaults, where ours differ
    fields.setdefault("norm_eps", 1e-6)
    fields |= window_config(hf, path)
    try:
        return ModelConfig(**fields)
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
    """Build a MiniGrok (share="none") from a Hugging Face Llama (Mistral, Ministral, Qwen3) directory of
    config.json + safetensors.

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

    tied = {"lm_head.weight"} if config.tie_embeddings else set()
    state = {name: take(hf_name) for name, hf_name in TOP_NAMES.items() if name not in tied}
    for layer in range(config.n_layers):
        for name, hf_names in block_names(config).items():
            state[f"blocks.{layer}.{name}"] = torch.cat(
                [take(f"model.layers.{layer}.{hf_name}") for hf_name in hf_names]
            )
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
