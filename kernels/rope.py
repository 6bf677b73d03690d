"""Rotary position embedding (half-split layout) in Triton: q and k rotated in one launch, any strides, autograd."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_dtype


@triton.jit
def _rotate_heads(
    X, OUT, x_head_stride, x_dim_stride, out_head_stride, out_dim_stride, n_heads, half, cos, sin,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """Rotate every head of one (batch, position): the pair (x[i], x[i + half]) turns by the angle of cos[i], sin[i]."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (dims < half)
    x1_ptrs = X + heads * x_head_stride + dims * x_dim_stride
    out1_ptrs = OUT + heads * out_head_stride + dims * out_dim_stride
    # Both halves are loaded before anything is stored, which makes in-place (OUT == X) safe.
    x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x1_ptrs + half * x_dim_stride, mask=mask, other=0.0).to(tl.float32)
    tl.store(out1_ptrs, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
    tl.store(out1_ptrs + half * out_dim_stride, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, Q_OUT, K_OUT, COS, SIN,
    q_sb, q_sh, q_st, q_sd, k_sb, k_sh, k_st, k_sd,
    qo_sb, qo_sh, qo_st, qo_sd, ko_sb, ko_sh, ko_st, ko_sd,
    cos_st, cos_sd, sin_st, sin_sd,
    seq_len, n_q_heads, n_k_heads, half,
    INVERSE: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """One program per (batch, position), rotating all heads of q and of k there."""
    pid = tl.program_id(0)
    b = (pid // seq_len).to(tl.int64)
    t = (pid % seq_len).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(COS + t * cos_st + dims * cos_sd, mask=dims < half, other=0.0).to(tl.float32)
    sin = tl.load(SIN + t * sin_st + dims * sin_sd, mask=dims < half, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin  # the inverse (= transpose) of a rotation is the rotation by -angle
    _rotate_heads(
        Q + b * q_sb + t * q_st, Q_OUT + b * qo_sb + t * qo_st, q_sh, q_sd, qo_sh, qo_sd,
        n_q_heads, half, cos, sin, BLOCK_QH, BLOCK_HALF,
    )  # fmt: skip
    _rotate_heads(
        K + b * k_sb + t * k_st, K_OUT + b * ko_sb + t * ko_st, k_sh, k_sd, ko_sh, ko_sd,
        n_k_heads, half, cos, sin, BLOCK_KH, BLOCK_HALF,
    )  # fmt: skip


def _rotate(
    q: torch.Tensor,
    k: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    inverse: bool,
) -> None:
    """Write q, k [B, H, T, D] rotated by +angle (or -angle when `inverse`) into q_out, k_out; any strides."""
    batch, n_q_heads, seq_len, head_dim = q.shape
    n_k_heads = k.shape[1]
    block_qh, block_kh = triton.next_power_of_2(n_q_heads), triton.next_power_of_2(n_k_heads)
    block_half = triton.next_power_of_2(head_dim // 2)
    num_warps = 4 if max(block_qh, block_kh) * block_half <= 4096 else 8
    _rope_kernel[(batch * seq_len,)](
        q, k, q_out, k_out, cos, sin,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), *cos.stride(), *sin.stride(),
        seq_len, n_q_heads, n_k_heads, head_dim // 2,
        INVERSE=inverse, BLOCK_QH=block_qh, BLOCK_KH=block_kh, BLOCK_HALF=block_half, num_warps=num_warps,
    )  # fmt: skip


class RopeFunction(torch.autograd.Function):
    """Saves only the cos/sin tables: the backward of a rotation is the rotation by the opposite angle."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inplace: bool):
        q_out, k_out = (q, k) if inplace else (torch.empty_like(q), torch.empty_like(k))
        _rotate(q, k, q_out, k_out, cos, sin, inverse=False)
        if inplace:
            ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dq_in, dk_in = torch.empty_like(dq), torch.empty_like(dk)
        _rotate(dq, dk, dq_in, dk_in, cos, sin, inverse=True)
        return dq_in, dk_in, None, None, None  # cos/sin are fixed tables: no gradient


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, Hq, T, D] and k [B, Hkv, T, D] (any strides) by cos/sin [T, D/2]; fp32 math, input dtypes kept.

    With `inplace`, q and k are overwritten and returned. Decode positions come in by slicing the cos/sin tables.
    """
    check_dtype("apply_rope", q)
    check_dtype("apply_rope", k)
    assert q.dim() == k.dim() == 4 and q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:], "apply_rope: q, k"
    assert q.shape[-1] % 2 == 0 and cos.shape == sin.shape == (q.shape[2], q.shape[-1] // 2), "apply_rope: cos, sin"
    records_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if inplace and records_grad and (q._base is not None or k._base is not None):
        # Autograd cannot record a two-output Function that modifies a view in place.
        raise ValueError(
            "apply_rope: inplace=True on q/k that are views requiring grad cannot be recorded by autograd; "
            "pass inplace=False when training"
        )
    return RopeFunction.apply(q, k, cos, sin, inplace)
