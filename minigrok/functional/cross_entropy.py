"""Token cross-entropy, plain and fused with the output projection (chunked so [N, vocab] logits never exist)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import use_triton


def _check_targets(targets: torch.Tensor, n_rows: int, vocab_size: int, ignore_index: int) -> None:
    if targets.shape != (n_rows,):
        raise ValueError(f"cross-entropy: targets must have shape [{n_rows}], got {tuple(targets.shape)}")
    if torch.compiler.is_compiling():  # value checks sync with the device; compiled graphs skip them
        return
    valid = targets[targets != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab_size):
        raise ValueError(
            f"cross-entropy: target ids must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"got values in [{int(valid.min())}, {int(valid.max())}]"
        )


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of logits [N, V] against targets [N] over the rows whose target is not ignore_index.

    `z_loss` adds z_loss * logsumexp(logits)^2 per row (keeps the softmax normaliser near 1); a batch with every
    row ignored gives 0, not NaN.
    """
    _check_targets(targets, logits.shape[0], logits.shape[-1], ignore_index)
    logits = logits.float()
    losses = F.cross_entropy(
        logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none"
    )
    valid = targets != ignore_index
    if z_loss:
        losses = losses + z_loss * torch.logsumexp(logits, dim=-1).pow(2) * valid
    return losses.sum() / valid.sum().clamp(min=1)


def _chunk_loss_and_grad(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss of one chunk of logits and its fp32 gradient with respect to them."""
    valid = targets != ignore_index
    safe_targets = targets.masked_fill(~valid, 0)[:, None]
    # One fused pass that also upcasts half-precision logits; the softmax below reuses its buffer.
    log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    target_log_prob = log_probs.gather(1, safe_targets)[:, 0]
    losses = -(1 - label_smoothing) * target_log_prob
    if label_smoothing:
        losses -= label_smoothing * log_probs.mean(-1)
    if z_loss:
        lse = logits.gather(1, safe_targets)[:, 0].float() - target_log_prob  # logsumexp without another pass
        losses += z_loss * lse**2
    loss_sum = (losses * valid).sum()
    # d/dlogits = softmax * (1 + 2 z lse) - (1 - eps) onehot(target) - eps / V, zero on ignored rows.
    grad = log_probs.exp_()
    if z_loss:
        grad.mul_((1 + 2 * z_loss * lse)[:, None])
    if label_smoothing:
        grad.sub_(label_smoothing / logits.shape[-1])
    grad.scatter_add_(1, safe_targets, torch.full_like(target_log_prob[:, None], label_smoothing - 1))
    return loss_sum, grad.mul_(valid[:, None])


def default_chunk_rows(n_rows: int, vocab_size: int) -> int:
    """Rows per chunk so that one chunk of fp32 logits takes about 32 MiB."""
    return max(16, min(n_rows, (32 << 20) // (4 * vocab_size)))


def _chunked_loss_and_grads(
    hidden, weight, targets, ignore_index, label_smoothing, z_loss, chunk_rows, want_grad_hidden, want_grad_weight
):
    """Mean loss and, if wanted, the gradients of hidden and weight, one chunk of rows at a time."""
    grad_hidden = torch.empty_like(hidden) if want_grad_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad_weight else None
    n_valid = (targets != ignore_index).sum().clamp(min=1)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    # Under autocast the matmuls run in its dtype: cast each chunk's gradient once, not once per matmul.
    device_type = hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    matmul_dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = hidden[start : start + chunk_rows]
        logits = rows @ weight.T
        loss_sum, grad_logits = _chunk_loss_and_grad(
            logits, targets[start : start + chunk_rows], ignore_index, label_smoothing, z_loss
        )
        total += loss_sum
        grad_logits = grad_logits.div_(n_valid).to(matmul_dtype)
        if grad_hidden is not None:
            grad_hidden[start : start + chunk_rows] = grad_logits @ weight
        if grad_weight is not None:
            grad_weight += (grad_logits.T @ rows).float()
    return total / n_valid, grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forms the loss and both gradients chunk by chunk in forward; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, label_smoothing, z_loss, chunk_rows):
        loss, grad_hidden, grad_weight = _chunked_loss_and_grads(
            hidden, weight, targets, ignore_index, label_smoothing, z_loss, chunk_rows, *ctx.needs_input_grad[:2]
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype),
            None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype),
            *([None] * 5),
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_rows: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """cross_entropy(hidden [N, d] @ weight[V, d]^T, targets) without materialising the [N, V] logits.

    Rows are processed `chunk_rows` at a time; gradients of hidden and weight are formed in the same pass.
    """
    if use_triton(backend, hidden):  # the kernel checks its own inputs (one device sync for the targets, not two)
        from minigrok.kernels.linear_cross_entropy import linear_cross_entropy as triton_linear_cross_entropy

        return triton_linear_cross_entropy(
            hidden, weight, targets, ignore_index, label_smoothing, z_loss, chunk_rows=chunk_rows
        )
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: expected hidden [N, d] and weight [V, d]; got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    _check_targets(targets, hidden.shape[0], weight.shape[0], ignore_index)
    chunk_rows = chunk_rows or default_chunk_rows(hidden.shape[0], weight.shape[0])
    args = (hidden, weight, targets, ignore_index, label_smoothing, z_loss, chunk_rows)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(*args)
    return _chunked_loss_and_grads(*args, False, False)[0]  # evaluation: the loss alone
