"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch

from ._dispatch import use_triton


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim, computed in fp32 and cast back to x's dtype.

    With `residual`, normalises s = x + residual and returns (normed, s), so a block reads its activations once.
    """
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight.shape={tuple(weight.shape)} must be ({x.shape[-1]},), x's last dim")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"rms_norm: residual{tuple(residual.shape)} must have x's shape {tuple(x.shape)}; broadcast it first"
        )
    if use_triton(backend, x):
        from minigrok.kernels.rms_norm import rms_norm as triton_rms_norm

        return triton_rms_norm(x, weight, eps, residual)
    summed = x if residual is None else x + residual
    x32 = summed.float()
    normed = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if residual is None else (normed, summed)
