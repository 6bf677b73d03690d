"""Knowledge distillation fused with both output projections: student and teacher logits are formed one chunk of rows
at a time (the chunk loop of linear_cross_entropy), so neither model's [N, vocab] logits exist at once.

The per-chunk loss and gradient come from `chunk_loss_and_grad` below (the definition) or from the Triton kernel of
the same name in minigrok.kernels.linear_distillation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ._dispatch import use_triton
from .cross_entropy import (
    GradsInForward,
    _check_linear_cross_entropy_args,
    check_softcap,
    chunk_loop,
    default_chunk_rows,
    grad_through_soft_cap,
    soft_cap,
)
from .cross_entropy import chunk_loss_and_grad as ce_chunk_loss_and_grad

KINDS = ("forward", "reverse")

# (student logits, teacher logits, targets, ignore_index, alpha, temperature, kind, grad_scale, student_softcap,
#  teacher_softcap) -> (summed KL, summed CE, grad_scale * d loss / d student logits or None)
DistillChunkFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, int, float, float, str, torch.Tensor | None, float | None, float | None],
    tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
]


class DistillationLoss(NamedTuple):
    """The loss to minimise and its two parts, each a mean over the non-ignored tokens (the parts carry no grad)."""

    loss: torch.Tensor
    kl: torch.Tensor
    ce: torch.Tensor


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
    """Summed KL at `temperature` and summed CE over the non-ignored rows of one chunk, and, given grad_scale (0-d),
    grad_scale * the fp32 gradient of alpha * T^2 * KL + (1 - alpha) * CE w.r.t. the student's logits.

    Each model's logits are first soft-capped by its own cap (soft_cap; None: as they are), the gradient taken through
    the student's."""
    student_logits = soft_cap(student_logits.float(), student_softcap)
    teacher_logits = soft_cap(teacher_logits.float(), teacher_softcap)
    ce_scale = None if grad_scale is None else grad_scale * (1 - alpha)
    ce_sum, ce_grad = ce_chunk_loss_and_grad(student_logits, targets, ignore_index, 0.0, 0.0, ce_scale)
    valid = targets != ignore_index
    log_p_student = torch.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = torch.log_softmax(teacher_logits / temperature, dim=-1)
    if kind == "forward":  # KL(teacher || student)
        p = log_p_teacher.exp()
        kl_rows = (p * (log_p_teacher - log_p_student)).sum(-1)
    else:  # KL(student || teacher)
        p = log_p_student.exp()
        kl_rows = (p * (log_p_student - log_p_teacher)).sum(-1)
    kl_sum = (kl_rows * valid).sum()
    if grad_scale is None:
        return kl_sum, ce_sum, None
    # d KL / d (student logits / T): softmax_student - p_teacher (forward); p (log p - log q - KL) (reverse).
    if kind == "forward":
        kl_grad = log_p_student.exp() - p
    else:
        kl_grad = p * (log_p_student - log_p_teacher - kl_rows[:, None])
    # T^2 * d KL / d logits = T * d KL / d (logits / T): Hinton et al.'s T^2 keeps the gradient's scale as T grows.
    grad = ce_grad + kl_grad * (alpha * temperature * valid * grad_scale)[:, None]
    return kl_sum, ce_sum, grad_through_soft_cap(grad, student_logits, student_softcap)


def chunked_distillation_loss_and_grads(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    alpha: float,
    temperature: float,
    kind: str,
    student_softcap: float | None,
    teacher_softcap: float | None,
    chunk_rows: int,
    chunk_fn: DistillChunkFn,
    want_grad_hidden: bool,
    want_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """[loss, kl, ce] (means over the non-ignored rows) and, if wanted, the gradients of the student's hidden and head,
    one chunk of rows of both models at a time."""

    def step(chunk: slice, student_logits: torch.Tensor, grad_scale: torch.Tensor | None):
        with torch.no_grad():
            teacher_logits = teacher_hidden[chunk] @ teacher_head.T
        options = (ignore_index, alpha, temperature, kind, grad_scale, student_softcap, teacher_softcap)
        kl_sum, ce_sum, grad = chunk_fn(student_logits, teacher_logits, targets[chunk], *options)
        loss_sum = alpha * temperature**2 * kl_sum + (1 - alpha) * ce_sum
        return torch.stack([loss_sum, kl_sum, ce_sum]), grad

    n_valid = (targets != ignore_index).sum().clamp(min=1)
    return chunk_loop(student_hidden, student_head, n_valid, chunk_rows, step, want_grad_hidden, want_grad_weight)


def _check_distillation_args(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    student_vocab: int,
    alpha: float,
    temperature: float,
    kind: str,
) -> None:
    if teacher_hidden.dim() != 2 or teacher_head.dim() != 2 or teacher_hidden.shape[1] != teacher_head.shape[1]:
        raise ValueError(
            f"linear_distillation_loss: teacher_hidden must be [N, d_t] and teacher_head [V, d_t]; got "
            f"{tuple(teacher_hidden.shape)} and {tuple(teacher_head.shape)}: reshape teacher_hidden to 2-D"
        )
    if teacher_hidden.shape[0] != student_hidden.shape[0]:
        raise ValueError(
            f"linear_distillation_loss: teacher_hidden has {teacher_hidden.shape[0]} rows, student_hidden "
            f"{student_hidden.shape[0]}: pass the hidden states of the same tokens"
        )
    if teacher_head.shape[0] != student_vocab:
        raise ValueError(
            f"linear_distillation_loss: the teacher's vocabulary is {teacher_head.shape[0]}, the student's "
            f"{student_vocab}: distil between models of one tokenizer and vocab_size"
        )
    if teacher_hidden.device != student_hidden.device or teacher_head.device != student_hidden.device:
        raise ValueError("linear_distillation_loss: teacher tensors must be on the student's device: move them")
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise ValueError(f"linear_distillation_loss: alpha={alpha!r} must lie in [0, 1]")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"linear_distillation_loss: temperature={temperature!r} must be a positive number")
    if kind not in KINDS:
        raise ValueError(f"linear_distillation_loss: kind={kind!r} is unknown: choose one of {KINDS}")


def linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 1.0,
    kind: str = "forward",
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    backend: str = "auto",
) -> DistillationLoss:
    """alpha * T^2 * KL + (1 - alpha) * CE of the student's logits, without materialising either model's [N, V] logits.

    With s = student_hidden @ student_head^T / T and t = teacher_hidden @ teacher_head^T / T, per row i
    KL_i = KL(softmax(t_i) || softmax(s_i)) for kind="forward" and KL(softmax(s_i) || softmax(t_i)) for "reverse",
    CE_i the cross-entropy of the unscaled student logits against targets[i]. With M the rows whose target is not
    ignore_index (n = max(|M|, 1)): kl = sum_M KL_i / n, ce = sum_M CE_i / n, loss = alpha * T^2 * kl + (1 - alpha) * ce.
    T^2 (Hinton et al., 2015) keeps the KL's gradient at the scale of the CE's as T changes. With student_softcap
    (teacher_softcap) the student's (teacher's) logits are c * tanh(logits / c) before any of this, as that model's
    ModelConfig.logit_softcap makes them; None leaves them as they are. The teacher gets no
    gradient; the student's hidden and head do, formed chunk by chunk in forward (memory O(chunk_rows x V)).
    """
    _check_linear_cross_entropy_args(student_hidden, student_head, targets, ignore_index, 0.0, chunk_rows)
    for name, cap in (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap)):
        check_softcap("linear_distillation_loss", name, cap)
    _check_distillation_args(
        student_hidden, teacher_hidden, teacher_head, student_head.shape[0], alpha, temperature, kind
    )
    if use_triton(backend, student_hidden):
        from minigrok.kernels.linear_distillation import chunk_loss_and_grad as chunk_fn
    else:
        chunk_fn = chunk_loss_and_grad
    chunk_rows = chunk_rows or default_chunk_rows(student_hidden.shape[0], *student_head.shape)
    teacher_hidden, teacher_head = teacher_hidden.detach(), teacher_head.detach()
    options = (ignore_index, alpha, temperature, kind, student_softcap, teacher_softcap, chunk_rows, chunk_fn)
    args = (teacher_hidden, teacher_head, targets, *options)
    if torch.is_grad_enabled() and (student_hidden.requires_grad or student_head.requires_grad):
        losses = GradsInForward.apply(student_hidden, student_head, chunked_distillation_loss_and_grads, *args)
    else:
        losses = chunked_distillation_loss_and_grads(student_hidden, student_head, *args, False, False)[0]
    return DistillationLoss(losses[0], losses[1].detach(), losses[2].detach())
