"""What the kernel files share: the interpreter switch, supported dtypes, tile loads and stores, row views and row
launch settings.

Elementwise and reduction kernels compute in fp32 whatever they load (the precision the ops promise). Dots take
half-precision tiles as they are on a GPU (native MMA, fp32 accumulation); the CPU interpreter gets half-precision
math wrong, tl.dot included, so under it every loaded tile is upcast to fp32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when @triton.jit decorates, so this is fixed at import, as the kernels are.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The widest block a program holds in registers without spilling on sm_80/sm_90 (ptxas); longer rows loop over blocks.
MAX_ROW_BLOCK = 8192


def check_dtype(op: str, *tensors: torch.Tensor) -> None:
    """Raise unless the tensors share one dtype the kernels support (float32, float16, bfloat16)."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or not dtypes <= set(DTYPES):
        raise ValueError(
            f"{op}: got dtypes {', '.join(str(t.dtype) for t in tensors)}; the Triton kernel needs one dtype among "
            "float32, float16, bfloat16: cast the inputs to one of them"
        )


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """View t as [rows, last dim]; copies only when the last dim itself is strided or the view is impossible.

    Row strides go to the kernels, so column slices of one fused projection are not copied.
    """
    t = t.reshape(-1, t.shape[-1] if t.dim() else 1)
    return t if t.stride(-1) == 1 else t.contiguous()


def row_settings(n_cols: int, max_block: int = MAX_ROW_BLOCK) -> tuple[int, int]:
    """BLOCK for a program over one row of n_cols (capped at max_block), and num_warps for that BLOCK.

    Warps grow with the block as in Liger-Kernel's calculate_settings: 4 below 2048, 8 below 8192, else 16.
    """
    block = min(triton.next_power_of_2(n_cols), max_block)
    return block, 4 if block < 2048 else 8 if block < 8192 else 16


UPCAST = tl.constexpr(INTERPRET)  # tiles upcast on load: only under the interpreter


@triton.jit
def load_tile(base, rows, stride_row, n_rows, cols, stride_col, n_cols):
    """Load a [rows, cols] tile in its own dtype (fp32 under the interpreter), zero-filling out-of-range entries."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tile = tl.load(base + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def store_tile(base, tile, rows, stride_row, n_rows, cols, stride_col, n_cols):
    """Store a [rows, cols] tile in the destination's dtype, skipping out-of-range entries."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(base + rows[:, None] * stride_row + cols[None, :] * stride_col, tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def zero_row(row_ptr, n_cols, BLOCK: tl.constexpr):
    """Store fp32 zeros over a row of n_cols values, BLOCK at a time (the gradient of an ignored target's row)."""
    offs = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        tl.store(row_ptr + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=cols < n_cols)


@triton.jit
def soft_cap(x, cap):
    """cap * tanh(x / cap) in fp32, from one exp (tl has no tanh): tanh |y| = (1 - e) / (1 + e) with e = exp(-2 |y|)
    <= 1, so nothing overflows (an infinite x gives +-cap)."""
    e = tl.exp(-2.0 * tl.abs(x / cap))
    capped = cap * (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -capped, capped)
