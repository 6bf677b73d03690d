"""What the kernel files share: the interpreter switch, supported dtypes, row views and row launch settings.

Every kernel upcasts what it loads to fp32 before any arithmetic: the CPU interpreter gets half-precision math wrong,
and fp32 is the precision the ops promise anyway.
"""

from __future__ import annotations

import os

import torch
import triton

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
