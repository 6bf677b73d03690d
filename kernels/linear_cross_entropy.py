"""Cross-entropy over rows of logits in Triton: one kernel gives each row's loss and, in place, d loss / d logits.

It is the per-chunk step of the fused output projection + cross-entropy: minigrok.functional.linear_cross_entropy
forms the logits one chunk of rows at a time, hands each chunk to `chunk_loss_and_grad`, and folds the gradient into
those of hidden and weight, so [N, vocab] logits never exist. `linear_cross_entropy` here is the op on all rows in
one chunk, for calling the kernel without minigrok.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import row_settings, soft_cap, zero_row

_MAX_BLOCK = 4096  # the kernel loops over the vocabulary in blocks of this many logits


@triton.jit
def _row_loss_grad_kernel(
    logits_ptr,
    targets_ptr,
    losses_ptr,
    grad_scale_ptr,
    stride_row,
    n_cols,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row: loss into losses_ptr[row]; with COMPUTE_GRAD, grad_scale * d loss / d logits over the row's logits.

    With SOFTCAP the loss is that of softcap * tanh(logits / softcap), the gradient taken through it (1 - tanh^2)."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK)
    target = tl.load(targets_ptr + row)
    if target == ignore_index:
        tl.store(losses_ptr + row, 0.0)
        if COMPUTE_GRAD:
            zero_row(row_ptr, n_cols, BLOCK)
    else:
        # Pass 1: online max / sum of exponentials for the logsumexp, plus the plain sum for label smoothing.
        running_max = float("-inf")
        exp_sum = 0.0
        logit_sum = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
            if SOFTCAP:
                x = tl.where(mask, soft_cap(x, softcap), float("-inf"))
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            exp_sum = exp_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
            logit_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
        lse = running_max + tl.log(exp_sum)
        # A target id outside the row is never read: it makes the row's loss and gradient NaN instead (no host check).
        in_range = (target >= 0) & (target < n_cols)
        poison = tl.where(in_range, 0.0, float("nan"))
        target_logit = tl.load(row_ptr + target, mask=in_range, other=0.0).to(tl.float32)
        if SOFTCAP:
            target_logit = soft_cap(target_logit, softcap)
        loss = (1.0 - label_smoothing) * (lse - target_logit) + label_smoothing * (lse - logit_sum / n_cols)
        tl.store(losses_ptr + row, loss + z_loss * lse * lse + poison)

        if COMPUTE_GRAD:
            # d/dx = softmax * (1 + 2 z lse) - eps / V - (1 - eps) onehot(target), times grad_scale (and, capped,
            # times 1 - tanh^2 = 1 - (x / softcap)^2 of the capped x).
            grad_scale = tl.load(grad_scale_ptr) + poison
            softmax_scale = 1.0 + 2.0 * z_loss * lse
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                mask = cols < n_cols
                x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                if SOFTCAP:
                    x = soft_cap(x, softcap)
                grad = tl.exp(x - lse) * softmax_scale - label_smoothing / n_cols
                grad = tl.where(cols == target, grad - (1.0 - label_smoothing), grad)
                if SOFTCAP:
                    tanh = x / softcap
                    grad *= 1.0 - tanh * tanh
                tl.store(row_ptr + cols, grad * grad_scale, mask=mask)


def chunk_loss_and_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    grad_scale: torch.Tensor | None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed loss of logits [rows, V] and, given grad_scale (0-d fp32), grad_scale * d loss / d logits in fp32; with
    `softcap`, the loss of softcap * tanh(logits / softcap) and its gradient w.r.t. the uncapped logits.

    The gradient overwrites the logits' fp32 copy (the logits themselves when they are fp32 and contiguous). A target
    outside [0, V) that is not ignore_index is never read: its row's loss and gradient come out NaN. Nothing here
    reads a value back to the host.
    """
    logits = logits.float().contiguous()
    assert logits.dim() == 2 and targets.shape == (logits.shape[0],), (
        "chunk_loss_and_grad: logits [rows, V], targets [rows]"
    )
    losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    block, num_warps = row_settings(logits.shape[1], _MAX_BLOCK)
    _row_loss_grad_kernel[(logits.shape[0],)](
        logits,
        targets.contiguous(),
        losses,
        grad_scale,
        logits.stride(0),
        logits.shape[1],
        ignore_index,
        float(label_smoothing),
        float(z_loss),
        float(softcap or 1.0),
        SOFTCAP=softcap is not None,
        COMPUTE_GRAD=grad_scale is not None,
        BLOCK=block,
        num_warps=num_warps,
    )
    return losses.sum(), None if grad_scale is None else logits


class CrossEntropyFunction(torch.autograd.Function):
    """Mean loss over the non-ignored rows of logits; forward forms the gradient too, backward only scales it."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, label_smoothing, z_loss, softcap):
        n_valid = (targets != ignore_index).sum().clamp(min=1)
        options = (ignore_index, label_smoothing, z_loss)
        loss_sum, grad = chunk_loss_and_grad(logits, targets, *options, 1.0 / n_valid, softcap)
        ctx.save_for_backward(grad)
        ctx.logits_dtype = logits.dtype
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.logits_dtype), None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of hidden [N, d] @ weight [V, d]^T (soft-capped by `softcap` unless None) against targets
    [N], all rows in one chunk.

    The [N, V] fp32 logits exist at once here; minigrok.functional.linear_cross_entropy chunks them.
    """
    return CrossEntropyFunction.apply(hidden @ weight.T, targets, ignore_index, label_smoothing, z_loss, softcap)
