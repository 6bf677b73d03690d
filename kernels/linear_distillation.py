"""Distillation loss over rows of student and teacher logits in Triton: one kernel gives each row's KL at a temperature
and cross-entropy and, in place, the gradient of alpha * T^2 * KL + (1 - alpha) * CE w.r.t. the student's logits.

It is the per-chunk step of minigrok.functional.linear_distillation_loss, which forms both models' logits one chunk of
rows at a time (the chunk loop of linear_cross_entropy), so [N, vocab] logits never exist.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import row_settings, soft_cap, zero_row

_MAX_BLOCK = 4096  # the kernel loops over the vocabulary in blocks of this many logits of each model


@triton.jit
def _row_distillation_kernel(
    student_ptr,
    teacher_ptr,
    targets_ptr,
    kl_ptr,
    ce_ptr,
    grad_scale_ptr,
    stride_student,
    stride_teacher,
    n_cols,
    ignore_index,
    alpha,
    temperature,
    student_softcap,
    teacher_softcap,
    REVERSE: tl.constexpr,
    CAP_STUDENT: tl.constexpr,
    CAP_TEACHER: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row: KL and CE into kl_ptr[row], ce_ptr[row]; with COMPUTE_GRAD, grad_scale * d loss / d student logits
    over the row's student logits. CAP_STUDENT (CAP_TEACHER) soft-caps the student's (teacher's) logits first, c *
    tanh(logits / c), the gradient taken through the student's cap (times 1 - tanh^2)."""
    row = tl.program_id(0)
    student_row = student_ptr + row.to(tl.int64) * stride_student
    teacher_row = teacher_ptr + row.to(tl.int64) * stride_teacher
    offs = tl.arange(0, BLOCK)
    target = tl.load(targets_ptr + row)
    if target == ignore_index:
        tl.store(kl_ptr + row, 0.0)
        tl.store(ce_ptr + row, 0.0)
        if COMPUTE_GRAD:
            zero_row(student_row, n_cols, BLOCK)
    else:
        # Pass 1: online logsumexp of the raw student logits z (for CE), of s = z / T and of t = teacher / T, and of
        # sum exp(a - max a) (a - b), where a is the distribution the KL weighs by (t forward, s reverse), b the other.
        inv_t = 1.0 / temperature
        z_max, z_sum = float("-inf"), 0.0
        s_max, s_sum = float("-inf"), 0.0
        t_max, t_sum = float("-inf"), 0.0
        weighted = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            z = tl.load(student_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            t = tl.load(teacher_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            if CAP_STUDENT:
                z = tl.where(mask, soft_cap(z, student_softcap), float("-inf"))
            if CAP_TEACHER:
                t = tl.where(mask, soft_cap(t, teacher_softcap), float("-inf"))
            t = t * inv_t
            s = z * inv_t
            new_z = tl.maximum(z_max, tl.max(z, axis=0))
            z_sum = z_sum * tl.exp(z_max - new_z) + tl.sum(tl.exp(z - new_z), axis=0)
            z_max = new_z
            new_s = tl.maximum(s_max, tl.max(s, axis=0))
            new_t = tl.maximum(t_max, tl.max(t, axis=0))
            if REVERSE:
                gap = tl.where(mask, tl.exp(s - new_s) * (s - t), 0.0)
                weighted = weighted * tl.exp(s_max - new_s) + tl.sum(gap, axis=0)
            else:
                gap = tl.where(mask, tl.exp(t - new_t) * (t - s), 0.0)
                weighted = weighted * tl.exp(t_max - new_t) + tl.sum(gap, axis=0)
            s_sum = s_sum * tl.exp(s_max - new_s) + tl.sum(tl.exp(s - new_s), axis=0)
            t_sum = t_sum * tl.exp(t_max - new_t) + tl.sum(tl.exp(t - new_t), axis=0)
            s_max, t_max = new_s, new_t
        lse_z = z_max + tl.log(z_sum)
        lse_s = s_max + tl.log(s_sum)
        lse_t = t_max + tl.log(t_sum)
        # KL(p_a || p_b) = sum p_a (a - b) - lse_a + lse_b
        if REVERSE:
            kl = weighted / s_sum - lse_s + lse_t
        else:
            kl = weighted / t_sum - lse_t + lse_s
        # A target id outside the row is never read: it makes the row's CE and gradient NaN instead (no host check).
        in_range = (target >= 0) & (target < n_cols)
        poison = tl.where(in_range, 0.0, float("nan"))
        target_logit = tl.load(student_row + target, mask=in_range, other=0.0).to(tl.float32)
        if CAP_STUDENT:
            target_logit = soft_cap(target_logit, student_softcap)
        tl.store(kl_ptr + row, kl)
        tl.store(ce_ptr + row, lse_z - target_logit + poison)

        if COMPUTE_GRAD:
            # (1 - alpha) (softmax(z) - onehot) + alpha T dKL/ds, times grad_scale (T^2 dKL/dz = T dKL/ds).
            grad_scale = tl.load(grad_scale_ptr) + poison
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                mask = cols < n_cols
                z = tl.load(student_row + cols, mask=mask, other=0.0).to(tl.float32)
                t = tl.load(teacher_row + cols, mask=mask, other=0.0).to(tl.float32)
                if CAP_STUDENT:
                    z = soft_cap(z, student_softcap)
                if CAP_TEACHER:
                    t = soft_cap(t, teacher_softcap)
                t = t * inv_t
                log_p_s = z * inv_t - lse_s
                p_s = tl.exp(log_p_s)
                if REVERSE:
                    kl_grad = p_s * (log_p_s - (t - lse_t) - kl)
                else:
                    kl_grad = p_s - tl.exp(t - lse_t)
                ce_grad = tl.exp(z - lse_z)
                ce_grad = tl.where(cols == target, ce_grad - 1.0, ce_grad)
                grad = (1.0 - alpha) * ce_grad + alpha * temperature * kl_grad
                if CAP_STUDENT:
                    tanh = z / student_softcap
                    grad *= 1.0 - tanh * tanh
                tl.store(student_row + cols, grad * grad_scale, mask=mask)


def chunk_loss_and_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    alpha: float,
    temperature: float,
    kind: str,
    grad_scale: torch.Tensor | None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(summed KL, summed CE) over the non-ignored rows of logits [rows, V] and, given grad_scale (0-d fp32),
    grad_scale * d (alpha T^2 KL + (1 - alpha) CE) / d student logits in fp32.

    kind "forward" is KL(teacher || student), "reverse" KL(student || teacher), both at `temperature`, of each
    model's logits soft-capped by its cap (c * tanh(logits / c); None: as they are). The gradient
    overwrites the student logits' fp32 copy (the logits themselves when they are fp32 and contiguous). A target outside
    [0, V) that is not ignore_index is never read: its row's CE and gradient come out NaN. Nothing here reads a value
    back to the host.
    """
    student = student_logits.float().contiguous()
    teacher = teacher_logits.contiguous()
    assert student.dim() == 2 and teacher.shape == student.shape and targets.shape == (student.shape[0],), (
        "chunk_loss_and_grad: student and teacher logits [rows, V], targets [rows]"
    )
    kl = torch.empty(student.shape[0], dtype=torch.float32, device=student.device)
    ce = torch.empty_like(kl)
    block, num_warps = row_settings(student.shape[1], _MAX_BLOCK)
    _row_distillation_kernel[(student.shape[0],)](
        student,
        teacher,
        targets.contiguous(),
        kl,
        ce,
        grad_scale,
        student.stride(0),
        teacher.stride(0),
        student.shape[1],
        ignore_index,
        float(alpha),
        float(temperature),
        float(student_softcap or 1.0),
        float(teacher_softcap or 1.0),
        REVERSE=kind == "reverse",
        CAP_STUDENT=student_softcap is not None,
        CAP_TEACHER=teacher_softcap is not None,
        COMPUTE_GRAD=grad_scale is not None,
        BLOCK=block,
        num_warps=num_warps,
    )
    return kl.sum(), ce.sum(), None if grad_scale is None else student
