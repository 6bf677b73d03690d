"""Weight-only int8 / int4 matmul in Triton: y = x @ dequant(W).T, the weight's integers dequantised tile by tile in
registers, never whole in memory; inference only (no autograd).

W is int8 [N, K] with one scale per row [N], or int4 packed two per byte as uint8 [N, K / 2] (column 2j in the low
nibble, 2j + 1 in the high one, both offset by 8) with scales [N, K / group_size]. Each K step multiplies an x tile
by the integer tile (small integers are exact in x's dtype, so half inputs run native MMA) with fp32 accumulation and
scales the partial sum: per group for int4 (BLOCK_K divides the group), once at the end for int8's per-row scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_dtype, load_tile, store_tile


@triton.jit
def _quantized_matmul_kernel(
    X, Q, S, Y,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_ym, stride_yn,
    M, N, K, group_size,
    BITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile of y: rows of x against output features of W, over K in steps of BLOCK_K.

    The pointers move to the tile's first row and column in 64 bits, so the offsets within it stay small (a head's
    [tokens, vocab] output can pass 2^31 elements)."""
    first_row = tl.program_id(0).to(tl.int64) * BLOCK_M
    first_col = tl.program_id(1).to(tl.int64) * BLOCK_N
    X += first_row * stride_xm
    Y += first_row * stride_ym + first_col * stride_yn
    Q += first_col * stride_qn
    S += first_col * stride_sn
    M -= first_row
    N -= first_col
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    steps = tl.arange(0, BLOCK_K)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + steps
        x = load_tile(X, rows, stride_xm, M, ks, stride_xk, K)
        mask = (ks[:, None] < K) & col_mask[None, :]
        if BITS == 8:
            q = tl.load(Q + cols[None, :] * stride_qn + ks[:, None] * stride_qk, mask=mask, other=0)
        else:  # each byte is read for both its columns; the second read hits the cache
            packed = tl.load(Q + cols[None, :] * stride_qn + (ks[:, None] // 2) * stride_qk, mask=mask, other=0x88)
            q = ((packed.to(tl.int32) >> ((ks[:, None] % 2) * 4)) & 0xF) - 8
        partial = tl.dot(x, q.to(x.dtype), input_precision=DOT_PRECISION)
        if BITS == 4:
            s = tl.load(S + cols * stride_sn + (start // group_size) * stride_sg, mask=col_mask, other=0.0)
            acc += partial * s.to(tl.float32)[None, :]
        else:
            acc += partial
    if BITS == 8:
        acc *= tl.load(S + cols * stride_sn, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    store_tile(Y, acc, rows, stride_ym, M, cols, stride_yn, N)


def _launch_settings(rows: int, dtype: torch.dtype, group_size: int | None) -> dict:
    """Tiles for `rows` rows of x: a 16-row tile for decoding (the narrowest tl.dot takes), wider ones for prefill
    over 8 warps; fp32 (FMA, not tensor cores) takes smaller ones. tests/kernels/test_gpu_compile.py checks that none
    spills on sm_80 / sm_90 (with 4 warps the 64 x 128 int8 tile spilled on sm_80)."""
    half = dtype != torch.float32
    block_m = min(triton.next_power_of_2(max(rows, 16)), 64 if half else 32)
    block_n = 32 if rows <= 16 else 128 if half and block_m == 64 else 64
    block_k = 64 if half else 32
    if group_size is not None:
        block_k = min(block_k, group_size)
    num_warps = 4 if rows <= 16 else 8
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=3 if half else 2)


def quantized_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """x [M, K] @ dequant(W).T -> [M, N] in x's dtype: W int8 [N, K] with scales [N] (bits 8), or packed uint8
    [N, K / 2] with group scales [N, K / group_size] (bits 4, group_size a power of two >= 16). No autograd."""
    check_dtype("quantized_matmul", x)
    assert x.dim() == 2 and qweight.dim() == 2 and bits in (8, 4), "quantized_matmul: x [M, K], qweight [N, K or K/2]"
    n, k = qweight.shape[0], qweight.shape[1] * (2 if bits == 4 else 1)
    assert x.shape[1] == k and scales.shape[0] == n, "quantized_matmul: x, qweight and scales disagree"
    group_size = None
    if bits == 4:
        group_size = k // scales.shape[1]
        assert scales.dim() == 2 and group_size * scales.shape[1] == k and group_size >= 16, "quantized_matmul: groups"
        assert group_size & (group_size - 1) == 0, "quantized_matmul: group_size must be a power of two"
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    settings = _launch_settings(m, x.dtype, group_size)
    grid = (triton.cdiv(m, settings["BLOCK_M"]), triton.cdiv(n, settings["BLOCK_N"]))
    _quantized_matmul_kernel[grid](
        x, qweight, scales, y,
        *x.stride(), *qweight.stride(), scales.stride(0), scales.stride(1) if bits == 4 else 0, *y.stride(),
        m, n, k, group_size or k,
        BITS=bits, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32 stays exact
        **settings,
    )  # fmt: skip
    return y
