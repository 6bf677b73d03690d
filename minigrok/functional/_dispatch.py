"""The one place that decides whether an op runs as a Triton kernel or as plain PyTorch."""

from __future__ import annotations

import functools

import torch

BACKENDS = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    """True when triton imports; cached so the import is attempted once."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(backend: str, tensor: torch.Tensor) -> bool:
    """`auto` picks Triton for CUDA tensors when triton imports; `torch`/`triton` force a path."""
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install triton, or use backend='torch'")
        from minigrok.kernels._common import INTERPRET

        if tensor.device.type != "cuda" and not INTERPRET:
            raise ValueError(
                f"backend='triton' got a tensor on {tensor.device}: the Triton kernels need CUDA tensors "
                "(or TRITON_INTERPRET=1 set before import); move it with .cuda() or use backend='torch'"
            )
        return True
    if backend == "auto":
        return tensor.is_cuda and triton_available()
    raise ValueError(f"backend={backend!r} is not one of {BACKENDS}: pick one of them")
