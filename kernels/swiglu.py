"""SwiGLU, silu(gate) * up, in Triton: forward, a backward that recomputes the sigmoid, and the autograd wrapper."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import as_rows, check_dtype

_MAX_BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(
    GATE, UP, OUT, gate_row_stride, up_row_stride, out_row_stride, n_cols, BLOCK: tl.constexpr
):  # fmt: skip
    """Program (row, block of columns): out = gate * sigmoid(gate) * up."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(GATE + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(OUT + row * out_row_stride + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DOUT, GATE, UP, DGATE, DUP,
    dout_row_stride, gate_row_stride, up_row_stride, dgate_row_stride, dup_row_stride,
    n_cols, BLOCK: tl.constexpr,
):  # fmt: skip
    """dup = dout * silu(gate); dgate = dout * up * sig * (1 + gate * (1 - sig)), sig = sigmoid(gate) recomputed."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dout = tl.load(DOUT + row * dout_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    dgate = dout * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(DUP + row * dup_row_stride + cols, (dout * gate * sig).to(DUP.dtype.element_ty), mask=mask)
    tl.store(DGATE + row * dgate_row_stride + cols, dgate.to(DGATE.dtype.element_ty), mask=mask)


def _launch_settings(rows: torch.Tensor) -> tuple[tuple[int, int], int, int]:
    """Grid (rows, column blocks), BLOCK and num_warps (about 8 elements a thread) for a [rows, cols] tensor."""
    n_rows, n_cols = rows.shape
    block = min(_MAX_BLOCK, triton.next_power_of_2(n_cols))
    return (n_rows, triton.cdiv(n_cols, block)), block, max(1, block // 256)


class SwiGLUFunction(torch.autograd.Function):
    """Saves gate and up; backward recomputes the sigmoid rather than storing it."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate2, up2 = as_rows(gate), as_rows(up)
        out = torch.empty(gate2.shape, dtype=gate.dtype, device=gate.device)
        grid, block, num_warps = _launch_settings(gate2)
        _swiglu_fwd_kernel[grid](
            gate2, up2, out, gate2.stride(0), up2.stride(0), out.stride(0), gate2.shape[1], BLOCK=block, num_warps=num_warps
        )  # fmt: skip
        ctx.save_for_backward(gate, up)
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        dout2, gate2, up2 = as_rows(dout), as_rows(gate), as_rows(up)
        dgate = torch.empty(gate2.shape, dtype=gate.dtype, device=gate.device)
        dup = torch.empty_like(dgate)
        grid, block, num_warps = _launch_settings(gate2)
        _swiglu_bwd_kernel[grid](
            dout2, gate2, up2, dgate, dup,
            dout2.stride(0), gate2.stride(0), up2.stride(0), dgate.stride(0), dup.stride(0),
            gate2.shape[1], BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
        return dgate.view(gate.shape), dup.view(up.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up elementwise, for gate and up of one shape and dtype; fp32 math, output in their dtype."""
    check_dtype("swiglu", gate, up)
    assert gate.shape == up.shape, "swiglu: gate and up must share one shape"
    return SwiGLUFunction.apply(gate, up)
