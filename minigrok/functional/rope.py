"""Rotary position embedding in the half-split layout (the Hugging Face Llama one)."""

from __future__ import annotations

import torch

from ._dispatch import use_triton


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [T, head_dim // 2] in fp32 for the given integer positions."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim)
    )
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def _check_rope_args(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"apply_rope: q{tuple(q.shape)} and k{tuple(k.shape)} must be [B, H, T, D] sharing B, T and D; "
            "transpose [B, T, H, D] inputs with .transpose(1, 2)"
        )
    batch, _, seq_len, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"apply_rope: head dim {head_dim} must be even to split into rotation pairs")
    if cos.shape not in ((seq_len, head_dim // 2), (batch, seq_len, head_dim // 2)) or sin.shape != cos.shape:
        raise ValueError(
            f"apply_rope: expected cos/sin of shape [T, D/2] = [{seq_len}, {head_dim // 2}] (or [B, T, D/2] per row) "
            f"for q{tuple(q.shape)}; got cos{tuple(cos.shape)}, sin{tuple(sin.shape)}: slice the tables at the "
            "positions of q"
        )


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, Hq, T, D] and k [B, Hkv, T, D] by the angles in cos/sin [T, D // 2], or [B, T, D // 2] when each
    row sits at its own positions (a batched decode step; this form takes the PyTorch path).

    Pairs (x[i], x[i + D/2]) rotate together; the arithmetic is fp32 and the result keeps the input dtype.
    """
    _check_rope_args(q, k, cos, sin)
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # broadcast over the heads
    elif use_triton(backend, q):
        from minigrok.kernels.rope import apply_rope as triton_apply_rope

        return triton_apply_rope(q, k, cos, sin)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
