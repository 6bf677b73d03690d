"""Sizes and costs of a model: parameters, FLOPs per token, KV-cache and checkpoint bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .machine import TORCH_DTYPES

if TYPE_CHECKING:
    from .model import MiniGrok

DTYPE_BYTES = {name: dtype.itemsize for name, dtype in TORCH_DTYPES.items()}


@dataclass
class ModelReport:
    """Counts follow BENCHMARKING.md: a shared block counts once per position in FLOPs and `total_params`."""

    total_params: int  # parameters as the forward pass sees them: shared blocks once per position
    unique_params: int  # parameters stored: shared blocks and tied tensors once
    non_embedding_params: int  # unique parameters minus the token embedding and an untied output head
    context: int
    forward_flops_per_token: int  # 2 * matmul params + causal attention at `context`
    train_flops_per_token: int  # three times the forward
    kv_cache_bytes_per_token: dict[str, int]
    checkpoint_bytes: dict[str, int]

    def __str__(self) -> str:
        rows = [
            ("total parameters", f"{self.total_params:,}"),
            ("unique parameters", f"{self.unique_params:,}"),
            ("non-embedding parameters", f"{self.non_embedding_params:,}"),
            (f"forward FLOPs / token @ {self.context}", f"{self.forward_flops_per_token:,}"),
            (f"train FLOPs / token @ {self.context}", f"{self.train_flops_per_token:,}"),
            *((f"KV cache bytes / token ({d})", f"{b:,}") for d, b in self.kv_cache_bytes_per_token.items()),
            *((f"checkpoint size ({d})", f"{b / 2**20:,.2f} MiB") for d, b in self.checkpoint_bytes.items()),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def model_report(model: MiniGrok, context: int | None = None) -> ModelReport:
    config = model.config
    context = config.max_seq_len if context is None else context
    if context < 1:
        raise ValueError(f"context={context} must be >= 1")
    block_params = [sum(p.numel() for p in block.parameters()) for block in model.blocks]
    block_matmul = [
        sum(p.numel() for name, p in block.named_parameters() if name.endswith("proj.weight")) for block in model.blocks
    ]
    embedding = model.embed.weight.numel()
    head = 0 if model.lm_head is None else model.lm_head.weight.numel()
    final_norm = model.norm.weight.numel()
    unique = sum(block_params) + embedding + head + final_norm
    total = sum(block_params[b] for b in model.schedule) + embedding + head + final_norm
    matmul_params = sum(block_matmul[b] for b in model.schedule) + model.head_weight.numel()
    attention_dim = config.n_heads * config.head_dim
    # Causal attention at context T: QK^T and AV, 2 FLOPs each per multiply-add, half the keys on average.
    attention_flops = 2 * 2 * config.n_layers * context * attention_dim // 2
    forward = 2 * matmul_params + attention_flops
    kv_per_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim
    return ModelReport(
        total_params=total,
        unique_params=unique,
        non_embedding_params=unique - embedding - head,
        context=context,
        forward_flops_per_token=forward,
        train_flops_per_token=3 * forward,
        kv_cache_bytes_per_token={d: kv_per_token * b for d, b in DTYPE_BYTES.items()},
        checkpoint_bytes={d: unique * b for d, b in DTYPE_BYTES.items()},
    )
