"""The SwiGLU gate: silu(gate) * up."""

from __future__ import annotations

import torch

from ._dispatch import use_triton


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up, elementwise; gate and up share one shape."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate{tuple(gate.shape)} and up{tuple(up.shape)} must have one shape")
    if use_triton(backend, gate):
        from minigrok.kernels.swiglu import swiglu as triton_swiglu

        return triton_swiglu(gate, up)
    return torch.nn.functional.silu(gate) * up
