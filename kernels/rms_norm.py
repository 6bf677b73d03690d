"""RMSNorm in Triton, optionally fused with the residual add before it: forward, backward and autograd wrapper."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import MAX_ROW_BLOCK, as_rows, check_dtype, row_settings

_MAX_BLOCK = MAX_ROW_BLOCK  # a wider row is walked in blocks of this many
_NUM_STAGES = 2  # backward: the next row's loads are in flight while one row is computed


@triton.jit
def _norm_input(X, R, x_row, r_row, cols, mask, s_dtype, HAS_RESIDUAL: tl.constexpr):
    """One block of the norm's input in fp32: x, or s = x + residual rounded to s_dtype (s and y share x's dtype).

    The rounded sum is what is returned and what is normalised, so y is exactly the norm of s (as in the torch path).
    """
    x = tl.load(X + x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x = (x + tl.load(R + r_row + cols, mask=mask, other=0.0).to(tl.float32)).to(s_dtype).to(tl.float32)
    return x


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, S, RSTD,
    x_row_stride, r_row_stride, y_row_stride, s_row_stride,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr,
):  # fmt: skip
    """One program per row: s = x (+ residual), y = w * s * rstd, rstd = 1 / sqrt(mean(s^2) + eps).

    A row wider than BLOCK is read twice in blocks (sum of squares, then y); the second read comes from L2.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row, r_row, y_row, s_row = row * x_row_stride, row * r_row_stride, row * y_row_stride, row * s_row_stride
    offs = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        mask = offs < n_cols
        x = _norm_input(X, R, x_row, r_row, offs, mask, Y.dtype.element_ty, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(S + s_row + offs, x.to(S.dtype.element_ty), mask=mask)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + y_row + offs, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            x = _norm_input(X, R, x_row, r_row, cols, mask, Y.dtype.element_ty, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                tl.store(S + s_row + cols, x.to(S.dtype.element_ty), mask=mask)
            sum_sq += x * x
        rstd = tl.rsqrt(tl.sum(sum_sq, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            x = _norm_input(X, R, x_row, r_row, cols, mask, Y.dtype.element_ty, HAS_RESIDUAL)
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + y_row + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _dx_block(x, dy, w, rstd, dot, n_cols):
    """d/dx of w * x * rstd(x) on one block, given the row's dot = sum(dy * w * x): rstd * (dy w - x rstd^2 dot / n)."""
    return rstd * (dy * w - x * (rstd * rstd * dot / n_cols))


@triton.jit
def _rms_norm_bwd_kernel(
    DY, DS, X, W, RSTD, DX, DW_PARTIAL,
    dy_row_stride, ds_row_stride, x_row_stride, dx_row_stride,
    n_rows, n_cols, rows_per_program,
    HAS_DS: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """Each program walks a contiguous chunk of rows, writing dx per row and its own partial sum of dw.

    dx = rstd * (g - x_hat * mean(g * x_hat)) with g = dy * w, x_hat = x * rstd. A row that fits one block stays in
    registers and the row loop is software-pipelined; a wider row is read twice in blocks (the dot, then dx), and the
    program's dw partial row is added to in memory (L2), so no block grows past BLOCK.
    """
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 so row * stride cannot overflow
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    dw_row = DW_PARTIAL + pid * n_cols
    if ONE_BLOCK:
        mask = offs < n_cols
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for row in tl.range(row_start, row_end, num_stages=NUM_STAGES):
            x = tl.load(X + row * x_row_stride + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * dy_row_stride + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            dot = tl.sum(dy * w * x, axis=0)
            dx = _dx_block(x, dy, w, rstd, dot, n_cols)
            if HAS_DS:
                dx += tl.load(DS + row * ds_row_stride + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row * dx_row_stride + offs, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * x * rstd
        tl.store(dw_row + offs, dw, mask=mask)
    else:
        # Plain loops: the dw partial is read back each row, which a pipelined prefetch could overtake. Each thread
        # reads back only the elements it stored (one layout for every block), so no barrier is needed.
        for row in range(row_start, row_end):
            rstd = tl.load(RSTD + row)
            dot_acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                mask = cols < n_cols
                x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                dot_acc += dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) * x
            dot = tl.sum(dot_acc, axis=0)
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                mask = cols < n_cols
                x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                dx = _dx_block(x, dy, w, rstd, dot, n_cols)
                if HAS_DS:
                    dx += tl.load(DS + row * ds_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row * dx_row_stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
                dw = tl.load(dw_row + cols, mask=mask, other=0.0) + dy * x * rstd
                tl.store(dw_row + cols, dw, mask=mask)


def _n_programs(device: torch.device, n_rows: int) -> int:
    """Backward programs: one per SM on a GPU (each keeps a dw partial), a handful in the interpreter."""
    n = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(n, n_rows))


def _forward(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """x, residual: [rows, hidden]. Returns y, s (None without residual) and rstd [rows] in fp32."""
    n_rows, n_cols = x.shape
    block, num_warps = row_settings(n_cols, _MAX_BLOCK)
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    s = torch.empty_like(y) if residual is not None else None
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    _rms_norm_fwd_kernel[(n_rows,)](
        x, residual, weight, y, s, rstd,
        x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0), s.stride(0) if s is not None else 0,
        n_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, ONE_BLOCK=block >= n_cols, num_warps=num_warps,
    )  # fmt: skip
    return y, s, rstd


def _backward(
    dy: torch.Tensor, ds: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """All [rows, hidden] but weight and rstd. Returns dx (including ds) and dweight, reduced in two fixed stages."""
    n_rows, n_cols = x.shape
    block, num_warps = row_settings(n_cols, _MAX_BLOCK)
    n_programs = _n_programs(x.device, n_rows)
    one_block = block >= n_cols
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    # A row wider than one block adds into its program's partial row, which must start at zero.
    dw_partial = (torch.empty if one_block else torch.zeros)((n_programs, n_cols), dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(n_programs,)](
        dy, ds, x, weight, rstd, dx, dw_partial,
        dy.stride(0), ds.stride(0) if ds is not None else 0, x.stride(0), dx.stride(0),
        n_rows, n_cols, triton.cdiv(n_rows, n_programs),
        HAS_DS=ds is not None, BLOCK=block, ONE_BLOCK=one_block, NUM_STAGES=_NUM_STAGES, num_warps=num_warps,
    )  # fmt: skip
    return dx, dw_partial.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """Saves the norm's input (s with a residual), weight and rstd; backward recomputes the normalised rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float):
        weight = weight.contiguous()
        y, s, rstd = _forward(as_rows(x), weight, None if residual is None else as_rows(residual), eps)
        y = y.view(x.shape)
        ctx.has_residual = residual is not None
        if residual is None:
            ctx.save_for_backward(x, weight, rstd)
            return y
        s = s.view(x.shape)
        ctx.save_for_backward(s, weight, rstd)  # the norm's input is s; saving an output costs no memory
        return y, s

    @staticmethod
    def backward(ctx, dy: torch.Tensor, ds: torch.Tensor | None = None):
        normed_input, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(as_rows(dy), None if ds is None else as_rows(ds), as_rows(normed_input), weight, rstd)
        dx = dx.view(normed_input.shape)
        # With a residual, s = x + residual, so x and residual receive the same gradient (as torch's add does).
        return dx, dw, (dx if ctx.has_residual else None), None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """weight * s / sqrt(mean(s^2) + eps) over the last dim, s = x (+ residual); fp32 math, output in x's dtype.

    Returns y, or (y, s) when `residual` is given.
    """
    check_dtype("rms_norm", *(t for t in (x, residual) if t is not None))
    assert weight.shape == (x.shape[-1],) and (residual is None or residual.shape == x.shape), "rms_norm: shapes"
    return RMSNormFunction.apply(x, weight, residual, eps)
