"""The weight-only quantised matmul x @ dequant(W).T, and the dequantisation that defines it.

W holds integers and float16 scales (minigrok.quantize writes them): int8 [out, in] with one scale per output row,
or int4 packed two per byte as uint8 [out, in / 2] (column 2j in the low nibble, 2j + 1 in the high one, offset by 8)
with one scale per row and group of inputs [out, in / group_size].
"""

from __future__ import annotations

import torch

from ._dispatch import use_triton


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The int4 values in [-8, 7] of packed uint8 [..., in / 2], as int8 [..., in]."""
    values = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)
    return values.to(torch.int8) - 8


def scale_values(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float weight [..., in] in `dtype` of integer values [..., in] and their group scales [..., groups]."""
    grouped = values.to(dtype).unflatten(-1, (scales.shape[-1], -1))
    return (grouped * scales.to(dtype)[..., None]).flatten(-2)


def dequantize(q: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [..., in] of int8 q [..., in] or packed int4 q [..., in / 2] and their scales, in `dtype`."""
    if bits == 8:
        return scale_values(q, scales[..., None], dtype)
    return scale_values(unpack_int4(q), scales, dtype)


def quantized_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int, backend: str = "auto"
) -> torch.Tensor:
    """x [..., in] @ dequant(W).T -> [..., out] in x's dtype. The Triton kernel dequantises tiles in registers (no
    gradient wanted only: it has no backward); the PyTorch path dequantises the whole weight in x's dtype first."""
    in_features = qweight.shape[-1] * (2 if bits == 4 else 1)
    if x.shape[-1] != in_features:
        raise ValueError(f"quantized_matmul: x's last dim {x.shape[-1]} must be the weight's {in_features} inputs")
    wants_grad = torch.is_grad_enabled() and x.requires_grad
    if use_triton(backend, x) and not wants_grad:
        from minigrok.kernels.quantized_matmul import quantized_matmul as triton_quantized_matmul

        rows = x.reshape(-1, in_features)
        return triton_quantized_matmul(rows, qweight, scales, bits).view(*x.shape[:-1], qweight.shape[0])
    return x @ dequantize(qweight, scales, bits, x.dtype).T
