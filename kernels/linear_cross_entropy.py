"""Fused output projection + cross-entropy: logits are formed one chunk of rows at a time and never all at once.

Each chunk's fp32 logits come from a torch matmul; one Triton kernel (a program per row) turns them into the row's
loss and, in place, into d loss / d logits; two more matmuls fold that into the gradients of hidden and weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CHUNK_BYTES = 32 << 20


@triton.jit
def _row_loss_grad_kernel(
    logits_ptr,
    targets_ptr,
    losses_ptr,
    stride_row,
    n_cols,
    ignore_index,
    label_smoothing,
    z_loss,
    grad_scale,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row: loss into losses_ptr[row]; with COMPUTE_GRAD, grad_scale * d loss / d logits over the row's logits."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK)
    target = tl.load(targets_ptr + row)
    if target == ignore_index:
        tl.store(losses_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                tl.store(row_ptr + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=cols < n_cols)
    else:
        # Pass 1: online max / sum of exponentials for the logsumexp, plus the plain sum for label smoothing.
        running_max = float("-inf")
        exp_sum = 0.0
        logit_sum = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            exp_sum = exp_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
            logit_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
        lse = running_max + tl.log(exp_sum)
        target_logit = tl.load(row_ptr + target).to(tl.float32)
        loss = (1.0 - label_smoothing) * (lse - target_logit) + label_smoothing * (lse - logit_sum / n_cols)
        tl.store(losses_ptr + row, loss + z_loss * lse * lse)

        if COMPUTE_GRAD:
            # d/dx = softmax * (1 + 2 z lse) - eps / V - (1 - eps) onehot(target), times 1 / (valid rows).
            softmax_scale = 1.0 + 2.0 * z_loss * lse
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                mask = cols < n_cols
                x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                grad = tl.exp(x - lse) * softmax_scale - label_smoothing / n_cols
                grad = tl.where(cols == target, grad - (1.0 - label_smoothing), grad)
                tl.store(row_ptr + cols, grad * grad_scale, mask=mask)


def default_chunk_rows(n_rows: int, vocab_size: int) -> int:
    """Rows per chunk so that one chunk of fp32 logits takes about 32 MiB (at least 16 rows)."""
    return max(16, min(n_rows, _CHUNK_BYTES // (4 * vocab_size)))


def _launch_config(vocab_size: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(vocab_size), 4096)
    return block, 8 if block >= 2048 else 4


def _loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    chunk_rows: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean loss and the requested gradients (of the mean loss), chunk by chunk."""
    n_rows, vocab_size = hidden.shape[0], weight.shape[0]
    n_valid = max(int((targets != ignore_index).sum()), 1)
    losses = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_grad_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad_weight else None
    compute_grad = need_grad_hidden or need_grad_weight
    block, num_warps = _launch_config(vocab_size)
    for start in range(0, n_rows, chunk_rows):
        end = min(start + chunk_rows, n_rows)
        rows = hidden[start:end]
        logits = (rows @ weight.T).float()
        _row_loss_grad_kernel[(end - start,)](
            logits,
            targets[start:end],
            losses[start:end],
            logits.stride(0),
            vocab_size,
            ignore_index,
            float(label_smoothing),
            float(z_loss),
            1.0 / n_valid,
            COMPUTE_GRAD=compute_grad,
            BLOCK=block,
            num_warps=num_warps,
        )
        if not compute_grad:
            continue
        grad_logits = logits.to(hidden.dtype)
        if grad_hidden is not None:
            torch.mm(grad_logits, weight, out=grad_hidden[start:end])
        if grad_weight is not None:
            if grad_logits.dtype == torch.float32:
                grad_weight.addmm_(grad_logits.T, rows)
            else:
                grad_weight += (grad_logits.T @ rows).float()
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return losses.sum() / n_valid, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients; backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, label_smoothing, z_loss, chunk_rows):
        loss, grad_hidden, grad_weight = _loss_and_grads(
            hidden,
            weight,
            targets,
            ignore_index,
            label_smoothing,
            z_loss,
            chunk_rows,
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _validate(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    chunk_rows: int | None,
) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden must be [N, d] and weight [V, d]; got hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}: reshape hidden to 2-D and match its last dim to weight's"
        )
    if hidden.dtype != weight.dtype or hidden.dtype not in _DTYPES:
        raise ValueError(
            f"linear_cross_entropy: hidden and weight must share one dtype among float32/float16/bfloat16; "
            f"got hidden {hidden.dtype}, weight {weight.dtype}: cast one to the other's dtype"
        )
    if targets.shape != (hidden.shape[0],) or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"linear_cross_entropy: targets must be an int32/int64 tensor of shape [{hidden.shape[0]}]; "
            f"got {targets.dtype} {tuple(targets.shape)}: flatten targets and cast them with .long()"
        )
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"linear_cross_entropy: hidden, weight and targets must be on one device; got {hidden.device}, "
            f"{weight.device}, {targets.device}: move them with .to(hidden.device)"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing={label_smoothing} must lie in [0, 1]")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows={chunk_rows} must be >= 1, or None for the default")
    vocab_size = weight.shape[0]
    out_of_range = ((targets < 0) | (targets >= vocab_size)) & (targets != ignore_index)
    if bool(out_of_range.any()):
        bad = int(targets[out_of_range][0])
        raise ValueError(
            f"linear_cross_entropy: target id {bad} is outside [0, {vocab_size}) and is not ignore_index={ignore_index}: "
            "fix the targets or pass the ignore_index they use"
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of hidden [N, d] @ weight [V, d]^T against targets [N], over rows not equal to ignore_index.

    Same semantics as minigrok.functional.cross_entropy (label smoothing, z_loss * lse^2; 0 if every row is ignored).
    """
    _validate(hidden, weight, targets, ignore_index, label_smoothing, chunk_rows)
    targets = targets.contiguous()
    chunk_rows = chunk_rows or default_chunk_rows(hidden.shape[0], weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, label_smoothing, z_loss, chunk_rows)
    return _loss_and_grads(hidden, weight, targets, ignore_index, label_smoothing, z_loss, chunk_rows, False, False)[0]
