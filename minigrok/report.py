"""Sizes and costs of a model: parameters, FLOPs per token, KV-cache and checkpoint bytes.

FLOPs per token, with N_matmul the weights that multiply activations (every projection at every layer position,
the output head, tied or not, and a factorised embedding's two projections; of an MoE MLP the router, the shared
expert and experts_per_token of the experts),
T the context and d_attn = n_heads * head_dim:
    forward  = 2 * N_matmul + 4 * n_attention_layers * T * d_attn * 1/2   (QK^T and AV; causal: half the keys)
               + 2 * n_conv_layers * conv_kernel_size * dim                  (the depthwise taps of C layers)
(a windowed layer: T/2 less the keys its window hides from positions 0 .. T - 1, on average, where p sees <= window)
    training = 3 * forward                                      (the backward costs twice the forward)
KV-cache bytes per token are those a sequence of T tokens holds, divided by T: a full attention layer keeps every
token, a windowed one (config.window) at most `window` of them (its ring buffer), so windowed models cost less per
token the longer the context; conv layers hold no keys, only a constant state per sequence.
MFU is achieved model FLOP/s over the machine's measured matmul peak in the same dtype (minigrok.machine).

Weight schemes are sized from the tensors their checkpoint holds: every tensor in fp32 or bf16, or the packed
integers and float16 scales minigrok.quantize writes, the tensors it leaves float in fp32 (as `minigrok quantize`
writes a training checkpoint's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ModelConfig
from .machine import TORCH_DTYPES

DTYPE_BYTES = {name: dtype.itemsize for name, dtype in TORCH_DTYPES.items()}
SAFETENSORS_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1}
# name: (float dtype, bits, int4 group size, embedding quantised); no bits: a float checkpoint of that dtype.
SCHEMES = {
    "fp32": ("fp32", None, None, False),
    "bf16": ("bf16", None, None, False),
    "int8": ("fp32", 8, None, False),
    "int8 + embedding": ("fp32", 8, None, True),
    "int4 g64": ("fp32", 4, 64, False),
    "int4 g64 + embedding": ("fp32", 4, 64, True),
}


@dataclass
class SchemeSize:
    """What one weight scheme costs; KV bytes in its activations' dtype (weight-only schemes compute in bf16)."""

    disk_bytes: int  # model.safetensors' tensors (its JSON header adds about 100 bytes a tensor)
    resident_bytes: int  # the weights in memory once loaded: the same tensors, nothing is dequantised up front
    kv_bytes_per_token: int


@dataclass
class ModelReport:
    """Counts as the module docstring gives them: a shared block counts once per position in FLOPs and `total_params`."""

    total_params: int  # parameters as the forward pass sees them: shared blocks once per position
    active_params: int  # of total_params, those one token uses: of each MoE MLP only its experts_per_token experts
    unique_params: int  # parameters stored: shared blocks and tied tensors once
    non_embedding_params: int  # unique parameters minus the token embedding and an untied output head
    context: int
    forward_flops_per_token: int  # 2 * matmul params + causal attention at `context`
    train_flops_per_token: int  # three times the forward
    kv_cache_bytes_per_token: dict[str, int]  # attention layers' K/V at `context` (windowed: min(window, context))
    windowed_layers: int  # of the attention layers, each attending over (and caching) at most `window` positions
    window: int | None
    conv_state_bytes: dict[str, int]  # per sequence, whatever its length: the last k - 1 inputs of each conv layer
    checkpoint_bytes: dict[str, int]
    schemes: dict[str, SchemeSize | str]  # a scheme that does not fit the shapes: why not
    options: list[str]  # the architecture options that differ from the defaults (qk_norm, mlp, ...)
    embedding_saving: int | None  # with embed_dim: unique parameters saved against embed_dim=dim (negative: added)

    def scheme_rows(self) -> list[tuple[str, str]]:
        rows = []
        for name, size in self.schemes.items():
            if isinstance(size, str):
                rows.append((f"weights {name}", f"n/a: {size}"))
                continue
            disk, resident = f"{size.disk_bytes / 2**20:,.2f} MiB", f"{size.resident_bytes / 2**20:,.2f} MiB"
            rows.append(
                (f"weights {name}", f"{disk} on disk, {resident} resident, {size.kv_bytes_per_token:,} KV B/token")
            )
        return rows

    @property
    def at(self) -> str:
        """@ context where the KV bytes per token depend on it (windowed layers), else nothing."""
        return f" @ {self.context}" if self.windowed_layers else ""

    def window_rows(self) -> list[tuple[str, str]]:
        if not self.windowed_layers:
            return []
        return [("windowed layers", f"{self.windowed_layers}, each caching min({self.window}, context) tokens")]

    def option_rows(self) -> list[tuple[str, str]]:
        rows = [("options", ", ".join(self.options))] if self.options else []
        if self.embedding_saving is not None:
            rows.append(
                ("parameters saved by embed_dim", f"{self.embedding_saving:,} (against an embedding of width dim)")
            )
        return rows

    def __str__(self) -> str:
        sparse = self.active_params != self.total_params  # a mixture of experts: a token uses some of them
        rows = [
            *self.option_rows(),
            ("total parameters", f"{self.total_params:,}"),
            *([("active parameters / token", f"{self.active_params:,}")] if sparse else []),
            ("unique parameters", f"{self.unique_params:,}"),
            ("non-embedding parameters", f"{self.non_embedding_params:,}"),
            (f"forward FLOPs / token @ {self.context}", f"{self.forward_flops_per_token:,}"),
            (f"train FLOPs / token @ {self.context}", f"{self.train_flops_per_token:,}"),
            *self.window_rows(),
            *((f"KV cache bytes / token{self.at} ({d})", f"{b:,}") for d, b in self.kv_cache_bytes_per_token.items()),
            *((f"conv state bytes / sequence ({d})", f"{b:,}") for d, b in self.conv_state_bytes.items() if b),
            *((f"checkpoint size ({d})", f"{b / 2**20:,.2f} MiB") for d, b in self.checkpoint_bytes.items()),
            *self.scheme_rows(),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def model_report(config: ModelConfig, context: int | None = None) -> ModelReport:
    """The report of a model of `config`, by arithmetic on its shapes: nothing is built, so any size answers at once."""
    from .model import block_shapes, outside_shapes

    context = config.max_seq_len if context is None else context
    if context < 1:
        raise ValueError(f"context={context} must be >= 1")
    # A block is known by its mixer (A or C) and whether its MLP is a mixture of experts.
    block_types = list(zip(config.block_kinds(), config.moe_blocks(), strict=True))
    blocks = {key: block_shapes(config, *key) for key in set(block_types)}
    params = {key: sum(math.prod(shape) for shape in block.values()) for key, block in blocks.items()}

    def used(name: str, shape: tuple[int, ...]) -> int:  # the weights one token uses: k of the n_experts stacked
        stacked = name in ("mlp.gate_up_proj", "mlp.up_proj", "mlp.down_proj")
        return math.prod(shape) * config.experts_per_token // config.n_experts if stacked else math.prod(shape)

    active = {key: sum(used(n, s) for n, s in block.items()) for key, block in blocks.items()}
    matmul = {  # the conv taps are counted apart (conv_flops), the norms multiply nothing
        key: sum(used(n, s) for n, s in block.items() if not n.endswith(("norm.weight", "conv.weight")))
        for key, block in blocks.items()
    }
    positions = [block_types[index] for index in config.layer_blocks()]
    sizes = {name: math.prod(shape) for name, shape in outside_shapes(config).items()}
    embedding, head = sizes["embed.weight"], sizes.get("lm_head.weight", 0)
    outside = sum(sizes.values())  # the embedding, its projections, the final norm and an untied head
    unique = sum(params[key] for key in block_types) + outside
    total = sum(params[key] for key in positions) + outside  # shared blocks once per position
    active_params = sum(active[key] for key in positions) + outside
    projections = outside - embedding - head - config.dim  # of a factorised embedding (embed_dim)
    unfactorised = config.vocab_size * config.dim * (1 if config.tie_embeddings else 2)  # embedding and head at dim
    matmul_params = sum(matmul[key] for key in positions) + embedding + projections  # the head, tied or not
    conv_layers = config.layer_kinds().count("C")
    attention_dim = config.n_heads * config.head_dim
    windows = [w for w, kind in zip(config.layer_windows(), config.layer_kinds(), strict=True) if kind == "A"]
    # Causal attention at context T: QK^T and AV, 2 FLOPs each per multiply-add, half the keys on average (a
    # windowed layer: less those its window hides).
    mean_keys = sum(context / 2 - (0 if w is None else hidden_keys(context, w) / context) for w in windows)
    attention_flops = round(2 * 2 * attention_dim * mean_keys)
    conv_flops = 2 * conv_layers * config.conv_kernel_size * config.dim
    forward = 2 * matmul_params + attention_flops + conv_flops
    # Bytes per token of a sequence of `context` tokens: a windowed layer holds min(window, context) of them.
    cached = sum(1 if w is None else min(w, context) / context for w in windows)
    kv_per_token = round(2 * cached * config.n_kv_heads * config.head_dim)
    conv_state = conv_layers * (config.conv_kernel_size - 1) * config.dim
    return ModelReport(
        total_params=total,
        active_params=active_params,
        unique_params=unique,
        non_embedding_params=unique - embedding - head,
        context=context,
        forward_flops_per_token=forward,
        train_flops_per_token=3 * forward,
        kv_cache_bytes_per_token={d: kv_per_token * b for d, b in DTYPE_BYTES.items()},
        windowed_layers=sum(w is not None for w in windows),
        window=config.window,
        conv_state_bytes={d: conv_state * b for d, b in DTYPE_BYTES.items()},
        checkpoint_bytes={d: unique * b for d, b in DTYPE_BYTES.items()},
        schemes={name: scheme_size(config, *scheme, kv_per_token) for name, scheme in SCHEMES.items()},
        options=options(config),
        embedding_saving=None if config.embed_dim is None else unfactorised - (embedding + head + projections),
    )


def options(config: ModelConfig) -> list[str]:
    """The architecture options of `config` that are not the defaults, as the report lists them."""
    chosen = {
        "qk_norm": config.qk_norm,
        f"mlp={config.mlp}": config.mlp != "swiglu",
        "zero_init_proj": config.zero_init_proj,
        f"embed_dim={config.embed_dim}": config.embed_dim is not None,
        f"logit_softcap={config.logit_softcap} (logits = {config.logit_softcap} * tanh(z / {config.logit_softcap}))": (
            config.logit_softcap is not None
        ),
    }
    return [name for name, on in chosen.items() if on]


def hidden_keys(context: int, window: int) -> int:
    """The causal keys a window hides from all queries at positions 0 .. context - 1: sum of max(0, p + 1 - window)."""
    beyond = max(0, context - window)
    return beyond * (beyond + 1) // 2


def scheme_size(
    config: ModelConfig, dtype: str, bits: int | None, group_size: int | None, embedding: bool, kv_per_token: int
) -> SchemeSize | str:
    """The sizes of a `config` model's weights in one scheme (see SCHEMES), by arithmetic on one block's shapes; the
    reason as a string where int4 groups do not divide a weight's inputs."""
    from .model import block_shapes, outside_shapes
    from .quantize import Quantization, is_quantizable, packed_shapes

    quantization = None if bits is None else Quantization(bits, group_size, ())

    def size(name: str, shape: tuple[int, ...]) -> int:
        if quantization is None or not is_quantizable(name, embedding):
            return math.prod(shape) * DTYPE_BYTES[dtype]
        packed = packed_shapes(name, shape, quantization).values()
        return sum(math.prod(packed_shape) * SAFETENSORS_BYTES[kind] for packed_shape, kind in packed)

    outside = outside_shapes(config)
    if quantization is not None and config.n_experts:
        return "minigrok quantize does not handle mixture-of-experts models"
    try:
        blocks = sum(
            size(name, shape)
            for key in zip(config.block_kinds(), config.moe_blocks(), strict=True)
            for name, shape in block_shapes(config, *key).items()
        )
        total = blocks + sum(size(name, shape) for name, shape in outside.items())
    except ValueError as error:
        return str(error).split(":")[0]
    kv_bytes = kv_per_token * DTYPE_BYTES["fp32" if dtype == "fp32" and bits is None else "bf16"]
    return SchemeSize(disk_bytes=total, resident_bytes=total, kv_bytes_per_token=kv_bytes)
