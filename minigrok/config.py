"""ModelConfig: every shape and option of a MiniGrok model, validated where it is made."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import math
import re
import reprlib
import textwrap
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

SHARE_MODES = ("none", "all", "immediate", "cycle")
LAYER_KINDS = {"A": "attention", "C": "gated short convolution"}
BACKENDS = ("auto", "torch", "triton")
MLP_KINDS = ("swiglu", "relu2")


class ConfigError(ValueError):
    """A config field holds a value the model cannot use; the message names the field, the value and the fix."""


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxdict = 4
_SHORT.maxlevel = 1


def show(value: Any) -> str:
    """A rejected value as an error message shows it: a bounded repr, however large or deeply nested the value
    (a YAML alias bomb expands to gigabytes in a plain repr)."""
    return _SHORT.repr(value)


def divisors_of(n: int) -> str:
    """The divisors of n for an error message, or a description when there are too many to list quickly."""
    if n > 100_000:
        return f"the divisors of {n}"
    return str([d for d in range(1, n + 1) if n % d == 0])


def _unknown_key_error(owner: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"unknown {owner} field {show(key)}: {hint}valid fields are {', '.join(known)}")


def check_fields(owner: str, cls: type, values: dict[str, Any]) -> None:
    """Raise ConfigError for any key of `values` that is not a field of dataclass `cls`."""
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            raise _unknown_key_error(owner, key, known)


def field_docs(cls: type) -> dict[str, str]:
    """Each field's meaning: the string literal right under the field in the class source (litgpt's convention)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {
        field.target.id: doc.value.value.strip()
        for field, doc in itertools.pairwise(body)
        if isinstance(field, ast.AnnAssign)
        and isinstance(doc, ast.Expr)
        and isinstance(doc.value, ast.Constant)
        and isinstance(doc.value.value, str)
    }


def _as_yaml(value: Any) -> str:
    """A default as it would be written after --set (null, true, 0.003)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


def describe_fields(sections: dict[str, type]) -> str:
    """One aligned line per field, `section.field  default  meaning`: the listing of --help-config."""
    rows = []
    for section, cls in sections.items():
        docs = field_docs(cls)
        for field in dataclasses.fields(cls):
            default = "required" if field.default is dataclasses.MISSING else _as_yaml(field.default)
            rows.append((f"{section}.{field.name}", default, docs.get(field.name, "")))
    name_width, default_width = (max(len(row[column]) for row in rows) for column in (0, 1))
    return "\n".join(f"{name:<{name_width}}  {default:<{default_width}}  {meaning}" for name, default, meaning in rows)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads 3e-4 and 1e5 as numbers (YAML 1.1 wants a dot in the mantissa: 3.0e-4)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML text (a config file or one --set value) to Python values, never running code."""
    return yaml.load(text, Loader=_YamlLoader)


def preset_names() -> list[str]:
    """Names of the YAML presets shipped in configs/."""
    return sorted(
        p.name[: -len(".yaml")] for p in resources.files("minigrok.configs").iterdir() if p.name.endswith(".yaml")
    )


def load_yaml(path_or_preset: str | Path) -> dict[str, Any]:
    """Read a YAML config from a file path or a preset name (e.g. "tiny"); returns its top-level mapping."""
    path = Path(path_or_preset)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(
                f"config file {str(path)!r} does not exist: give a YAML path or one of the presets {preset_names()}"
            )
        text = path.read_text()
    else:
        preset = resources.files("minigrok.configs") / f"{path_or_preset}.yaml"
        if not preset.is_file():
            raise ConfigError(
                f"unknown preset {str(path_or_preset)!r}: choose one of {preset_names()} or give a YAML path"
            )
        text = preset.read_text()
    data = parse_yaml(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {str(path_or_preset)!r} must be a YAML mapping with 'model' (and 'train') sections")
    return data


def parse_overrides(pairs: list[str], sections: dict[str, type]) -> dict[str, dict[str, Any]]:
    """Turn ["model.dim=128", "train.seed=3", "n_layers=4"] into {"model": {"dim": 128}, "train": {"seed": 3}, ...}.

    A key without a section belongs to the first section. Values are parsed as YAML scalars (4, 1e-3, true, null).
    """
    first = next(iter(sections))
    overrides: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r} is not key=value: write e.g. --set {first}.dim=128")
        section, dot, field = key.rpartition(".")
        section = section if dot else first
        if section not in sections:
            raise ConfigError(f"--set {pair!r}: unknown section {section!r}; use one of {list(sections)}")
        check_fields(sections[section].__name__, sections[section], {field: None})
        overrides[section][field] = parse_yaml(value)
    return overrides


@dataclass
class ModelConfig:
    """Shape of a decoder-only transformer. `None` (null) fields are derived in __post_init__ and stored resolved.

    Each field's docstring is its meaning in `--help-config` (read by field_docs).
    """

    vocab_size: int
    """rows of the token embedding and of the output head (training follows the tokenizer unless set)"""
    dim: int
    """width of the residual stream"""
    n_layers: int
    """logical transformer blocks, applied in order"""
    n_heads: int
    """query heads per attention layer"""
    n_kv_heads: int | None = None
    """key/value heads, a divisor of n_heads (null = n_heads, MHA; 1 = MQA)"""
    head_dim: int | None = None
    """channels per head, even for RoPE (null = dim // n_heads)"""
    ffn_dim: int | None = None
    """hidden width of the MLP (null = 8/3 * dim for swiglu, 4 * dim for relu2, rounded up to a multiple of 64)"""
    max_seq_len: int = 2048
    """longest sequence the model accepts, prompt and generated tokens together"""
    rope_theta: float = 10000.0
    """base of the RoPE frequencies"""
    norm_eps: float = 1e-5
    """epsilon added to the mean square in RMSNorm"""
    tie_embeddings: bool = True
    """the output head reuses the token embedding's weights"""
    logit_softcap: float | None = None
    """cap the logits smoothly to (-c, c) as c * tanh(logits / c) (Gemma 2; e.g. 30; null = no capping)"""
    share: str = "none"
    """logical layers to physical blocks: none, all (one block), immediate (0,0,1,1,..) or cycle (0,1,..,0,1,..)"""
    n_unique_layers: int | None = None
    """physical blocks behind the n_layers positions (null = n_layers for none, 1 for all, else n_layers // 2)"""
    layer_pattern: str = "A"
    """mixer of each layer, the letters repeated over depth: A attention, C gated short convolution (e.g. CCA)"""
    conv_kernel_size: int = 3
    """taps of the causal depthwise convolution of C layers, 2 to 8"""
    init_std: float = 0.02
    """standard deviation of the normal weight init (residual projections scaled by 1/sqrt(2 * n_layers))"""
    backend: str = "auto"
    """implementation of the ops: auto (Triton on CUDA when installed, else PyTorch), torch or triton"""
    n_experts: int = 0
    """experts of a mixture-of-experts MLP (0 = every MLP dense)"""
    experts_per_token: int = 2
    """with n_experts: experts each token is routed to (top-k)"""
    moe_shared_expert: bool = False
    """with n_experts: every token also goes through one dense MLP of moe_ffn_dim"""
    moe_layers: str = "M"
    """with n_experts: which physical blocks have an MoE MLP, M (MoE) or D (dense) each, repeated over the blocks"""
    moe_ffn_dim: int | None = None
    """with n_experts: hidden width of each expert (null = ffn_dim)"""
    moe_capacity_factor: float | None = None
    """with n_experts: in training, cap each expert at factor * tokens * k / n_experts tokens (null = dropless)"""
    window: int | None = None
    """sliding-window size of the windowed (S) layers: a query sees itself and the window - 1 keys before it"""
    window_pattern: str = "S"
    """S (windowed) / L (full) per layer (convolution layers count too), repeated over depth, e.g. SSSL"""
    qk_norm: bool = False
    """RMSNorm of each query and key head (over head_dim, a learned gain each) before RoPE, as in Qwen3"""
    mlp: str = "swiglu"
    """MLP (and expert) kind: swiglu down(silu(gate(x)) * up(x)), or relu2 down(relu(up(x))^2)"""
    zero_init_proj: bool = False
    """initialise every residual output projection (attention, conv, MLP and expert down) to zero"""
    embed_dim: int | None = None
    """width of the token embedding, below dim, factorised: embed_proj up to dim, head_proj down before the head"""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            self._check_positive_int(name)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        self._check_positive_int("n_kv_heads")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}: "
                f"choose n_kv_heads from {divisors_of(self.n_heads)}"
            )
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(
                    f"dim={self.dim} is not divisible by n_heads={self.n_heads}: change one of them or set head_dim explicitly"
                )
            self.head_dim = self.dim // self.n_heads
        self._check_positive_int("head_dim")
        if self.head_dim % 2:
            raise ConfigError(
                f"head_dim={self.head_dim} is odd: RoPE rotates pairs of channels, so use an even head_dim"
            )
        if self.mlp not in MLP_KINDS:
            raise ConfigError(f"mlp={show(self.mlp)} is unknown: choose one of {MLP_KINDS}")
        if self.ffn_dim is None:  # relu2 has two matrices to swiglu's three: 3/2 the width, the same parameters
            hidden = 8 * self.dim / 3 if self.mlp == "swiglu" else 4 * self.dim
            self.ffn_dim = 64 * math.ceil(hidden / 64)
        self._check_positive_int("ffn_dim")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{name}={show(value)} must be a positive number")
        cap = self.logit_softcap
        if cap is not None and (not isinstance(cap, (int, float)) or isinstance(cap, bool) or not 0 < cap < math.inf):
            raise ConfigError(f"logit_softcap={show(cap)} must be a positive number such as 30.0, or null (no capping)")
        for name in ("tie_embeddings", "qk_norm", "zero_init_proj"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={show(getattr(self, name))} must be true or false")
        if self.embed_dim is not None:
            self._check_positive_int("embed_dim")
            if self.embed_dim >= self.dim:
                raise ConfigError(
                    f"embed_dim={self.embed_dim} must be below dim={self.dim} to factorise the embedding: choose a "
                    f"smaller embed_dim (e.g. {max(1, self.dim // 4)}) or null for an embedding of width dim"
                )
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend={show(self.backend)} is unknown: choose one of {BACKENDS}")
        self._resolve_sharing()
        self._check_moe()
        self._check_layer_pattern()
        self._check_window()

    def _check_positive_int(self, name: str) -> None:
        value = getattr(self, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name}={show(value)} must be a positive integer")

    def _resolve_sharing(self) -> None:
        if self.share not in SHARE_MODES:
            raise ConfigError(f"share={show(self.share)} is unknown: choose one of {SHARE_MODES}")
        default = {"none": self.n_layers, "all": 1}.get(self.share)
        if self.n_unique_layers is None:
            if default is None and self.n_layers % 2:
                raise ConfigError(
                    f"share={show(self.share)} with odd n_layers={self.n_layers} has no default n_unique_layers: "
                    "set n_unique_layers to a divisor of n_layers"
                )
            self.n_unique_layers = default if default is not None else self.n_layers // 2
        self._check_positive_int("n_unique_layers")
        if default is not None and self.n_unique_layers != default:
            raise ConfigError(
                f"n_unique_layers={self.n_unique_layers} does not fit share={show(self.share)}, which uses {default} "
                f"block(s) for n_layers={self.n_layers}: drop n_unique_layers or pick share='immediate' or 'cycle'"
            )
        if self.n_layers % self.n_unique_layers:
            raise ConfigError(
                f"n_unique_layers={self.n_unique_layers} does not divide n_layers={self.n_layers} for "
                f"share={show(self.share)}: choose one of {divisors_of(self.n_layers)}"
            )

    def _check_moe(self) -> None:
        if not isinstance(self.n_experts, int) or isinstance(self.n_experts, bool) or self.n_experts < 0:
            raise ConfigError(f"n_experts={show(self.n_experts)} must be 0 (dense) or a positive integer")
        if self.moe_ffn_dim is None:
            self.moe_ffn_dim = self.ffn_dim
        if not self.n_experts:
            return
        self._check_positive_int("experts_per_token")
        self._check_positive_int("moe_ffn_dim")
        if self.experts_per_token > self.n_experts:
            raise ConfigError(
                f"experts_per_token={self.experts_per_token} exceeds n_experts={self.n_experts}: "
                f"choose experts_per_token from 1 to {self.n_experts}"
            )
        if not isinstance(self.moe_shared_expert, bool):
            raise ConfigError(f"moe_shared_expert={show(self.moe_shared_expert)} must be true or false")
        pattern = self.moe_layers
        if not isinstance(pattern, str) or not re.fullmatch("[DM]+", pattern) or self.n_unique_layers % len(pattern):
            raise ConfigError(
                f"moe_layers={show(pattern)} must be a string of D (dense) and M (MoE) whose length divides "
                f"n_unique_layers={self.n_unique_layers}, e.g. 'M' (every block) or 'DM' (every second)"
            )
        factor = self.moe_capacity_factor
        if factor is not None and (not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0):
            raise ConfigError(
                f"moe_capacity_factor={show(factor)} must be a positive number such as 1.25, or null (dropless)"
            )

    def moe_blocks(self) -> list[bool]:
        """Whether each physical block's MLP is a mixture of experts (moe_layers repeated over the blocks)."""
        if not self.n_experts:
            return [False] * self.n_unique_layers
        return [self.moe_layers[i % len(self.moe_layers)] == "M" for i in range(self.n_unique_layers)]

    def _check_layer_pattern(self) -> None:
        pattern = self.layer_pattern
        if not isinstance(pattern, str) or not pattern or set(pattern) - set(LAYER_KINDS):
            raise ConfigError(
                f"layer_pattern={show(pattern)} must be a string of the letters {', '.join(LAYER_KINDS)} "
                "(A attention, C convolution), repeated over the layers, e.g. 'CCA'"
            )
        if len(pattern) > self.n_layers:
            raise ConfigError(
                f"layer_pattern={show(pattern)} is longer than n_layers={self.n_layers}: its last letters would be "
                f"unused; shorten it to {self.n_layers} letters or add layers"
            )
        if not isinstance(self.conv_kernel_size, int) or isinstance(self.conv_kernel_size, bool):
            raise ConfigError(f"conv_kernel_size={show(self.conv_kernel_size)} must be an integer from 2 to 8")
        if not 2 <= self.conv_kernel_size <= 8:
            raise ConfigError(f"conv_kernel_size={self.conv_kernel_size} must be an integer from 2 to 8")
        first: dict[int, int] = {}  # block -> the first layer that runs it
        kinds = self.layer_kinds()
        for layer, block in enumerate(self.layer_blocks()):
            if kinds[first.setdefault(block, layer)] != kinds[layer]:
                raise ConfigError(
                    f"layer_pattern={show(pattern)} with share={show(self.share)} runs block {block} at layers "
                    f"{first[block]} and {layer} as both attention and convolution: a shared block has one mixer; "
                    "pick a pattern that gives every layer of a block the same letter (with share='cycle', a "
                    "pattern whose length divides n_unique_layers)"
                )

    def layer_kinds(self) -> str:
        """The mixer letter (see LAYER_KINDS) of each logical layer: layer_pattern repeated over n_layers."""
        return (self.layer_pattern * self.n_layers)[: self.n_layers]

    def block_kinds(self) -> str:
        """The mixer letter of each physical block (validated: every layer a block runs at has the same one)."""
        first = {block: layer for layer, block in reversed(list(enumerate(self.layer_blocks())))}
        return "".join(self.layer_kinds()[first[block]] for block in range(self.n_unique_layers))

    def _check_window(self) -> None:
        pattern = self.window_pattern
        if not isinstance(pattern, str) or not pattern or set(pattern) - {"S", "L"}:
            raise ConfigError(
                f"window_pattern={show(pattern)} must be a non-empty string of S (windowed) and L (full) layers, "
                "e.g. 'SSSL'"
            )
        if self.window is None and "S" in pattern and pattern != "S":  # the default "S" alone means no window
            raise ConfigError(
                f"window_pattern={show(pattern)} has windowed (S) layers but window is null: set window (e.g. "
                "window=256) or drop window_pattern for full attention everywhere"
            )
        if self.window is not None:
            self._check_positive_int("window")
            if "S" not in pattern:
                raise ConfigError(
                    f"window={self.window} with window_pattern={show(pattern)} windows no layer: put an S in "
                    "window_pattern (e.g. 'SSSL') or drop window"
                )
            kinds = self.layer_kinds()
            if all(kinds[layer] != "A" for layer, window in enumerate(self.layer_windows()) if window):
                raise ConfigError(
                    f"window={self.window} with window_pattern={show(pattern)} and layer_pattern="
                    f"{show(self.layer_pattern)} windows only convolution layers (the pattern counts every layer): "
                    "put an S where layer_pattern has an A, or drop window"
                )

    def layer_windows(self) -> list[int | None]:
        """The attention window of each logical layer: `window` where the repeated window_pattern says S, else None
        (every layer None when window is null)."""
        pattern = self.window_pattern if self.window is not None else "L"
        return [self.window if pattern[i % len(pattern)] == "S" else None for i in range(self.n_layers)]

    def layer_blocks(self) -> list[int]:
        """The physical block used at each logical layer position."""
        repeats = self.n_layers // self.n_unique_layers
        if self.share == "immediate":
            return [i // repeats for i in range(self.n_layers)]
        return [i % self.n_unique_layers for i in range(self.n_layers)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        check_fields("ModelConfig", cls, values)
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        if missing := [name for name in required if name not in values]:
            raise ConfigError(f"ModelConfig is missing {missing}: every model needs {required}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path_or_preset: str | Path) -> ModelConfig:
        """Build from a preset name (see configs/) or a YAML file; reads its `model` section."""
        data = load_yaml(path_or_preset)
        return cls.from_dict(data.get("model", data))


def build_model_config(config: str, overrides: list[str]) -> ModelConfig:
    """ModelConfig from a preset or YAML path (its `model` section) with --set overrides applied."""
    data = load_yaml(config)
    values = dict(data.get("model", data)) | parse_overrides(overrides, {"model": ModelConfig})["model"]
    return ModelConfig.from_dict(values)
