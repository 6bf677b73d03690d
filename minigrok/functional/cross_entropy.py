"""Token cross-entropy, plain and fused with the output projection (chunked so [N, vocab] logits never exist).

The fused op has one chunk loop and one autograd Function; the loss and gradient of each chunk of logits come from
`chunk_loss_and_grad` below or from the Triton kernel of the same name in minigrok.kernels.linear_cross_entropy.
Off the CPU nothing here reads a tensor's value back to the host, so a training step never waits on the device and can
be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..machine import reading_back_is_free
from ._dispatch import use_triton


def _check_targets(targets: torch.Tensor, n_rows: int, vocab_size: int, ignore_index: int) -> None:
    if targets.shape != (n_rows,):
        raise ValueError(f"cross-entropy: targets must have shape [{n_rows}], got {tuple(targets.shape)}")
    # Reading the ids back would wait on the device: there a bad id gives a NaN loss (see chunk_loss_and_grad).
    if not reading_back_is_free(targets) or torch.compiler.is_compiling():
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
    row ignored gives 0, not NaN. A target outside [0, V) raises ValueError on CPU; on other devices the check is
    PyTorch's device-side assert.
    """
    _check_targets(targets, logits.shape[0], logits.shape[-1], ignore_index)
    logits = logits.float()
    losses = torch.nn.functional.cross_entropy(
        logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none"
    )
    valid = targets != ignore_index
    if z_loss:
        losses = losses + z_loss * torch.logsumexp(logits, dim=-1).pow(2) * valid
    return losses.sum() / valid.sum().clamp(min=1)


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap): logits squashed smoothly into (-cap, cap), near the identity for small ones (Gemma 2's
    final logit soft-capping, ModelConfig.logit_softcap); cap None leaves them as they are."""
    return logits if cap is None else cap * torch.tanh(logits / cap)


def grad_through_soft_cap(grad: torch.Tensor, capped: torch.Tensor, cap: float | None) -> torch.Tensor:
    """The gradient w.r.t. the logits before soft_cap from `grad` w.r.t. the `capped` ones, in place: the chain rule
    through cap * tanh(z / cap), whose derivative is 1 - tanh^2 = 1 - (capped / cap)^2."""
    return grad if cap is None else grad.mul_(1 - (capped / cap).square())


# (logits, targets, ignore_index, label_smoothing, z_loss, grad_scale, softcap)
#   -> (summed loss, grad_scale * d loss / d logits)
ChunkLossAndGrad = Callable[
    [torch.Tensor, torch.Tensor, int, float, float, torch.Tensor | None, float | None],
    tuple[torch.Tensor, torch.Tensor | None],
]


def chunk_loss_and_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    grad_scale: torch.Tensor | None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed loss of one chunk of logits and, given grad_scale (0-d), grad_scale * its fp32 gradient w.r.t. them.

    With `softcap` the loss is that of soft_cap(logits, softcap), its gradient taken through the cap. A target outside
    [0, V) (and not ignore_index) makes the summed loss and its row's gradient NaN, as in the kernel.
    """
    if softcap is not None:
        logits = soft_cap(logits.float(), softcap)
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= logits.shape[-1]))
    safe_targets = targets.masked_fill(~valid | bad, 0)[:, None]
    row_weight = valid.float().masked_fill_(bad, float("nan"))  # 1 per counted row, 0 per ignored, NaN per bad
    # One fused pass that also upcasts half-precision logits; the softmax below reuses its buffer.
    log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    target_log_prob = log_probs.gather(1, safe_targets)[:, 0]
    losses = -(1 - label_smoothing) * target_log_prob
    if label_smoothing:
        losses -= label_smoothing * log_probs.mean(-1)
    if z_loss:
        lse = logits.gather(1, safe_targets)[:, 0].float() - target_log_prob  # logsumexp without another pass
        losses += z_loss * lse**2
    loss_sum = (losses * row_weight).sum()
    if grad_scale is None:
        return loss_sum, None
    # d/dlogits = softmax * (1 + 2 z lse) - (1 - eps) onehot(target) - eps / V, zero on ignored rows.
    grad = log_probs.exp_()
    if z_loss:
        grad.mul_((1 + 2 * z_loss * lse)[:, None])
    if label_smoothing:
        grad.sub_(label_smoothing / logits.shape[-1])
    grad.scatter_add_(1, safe_targets, torch.full_like(target_log_prob[:, None], label_smoothing - 1))
    grad = grad_through_soft_cap(grad, logits, softcap)
    return loss_sum, grad.mul_((row_weight * grad_scale)[:, None])


def default_chunk_rows(n_rows: int, vocab_size: int, hidden_size: int) -> int:
    """Rows per chunk: fp32 logits of about 32 MiB, but at least hidden_size rows (and 16), at most n_rows.

    Each chunk reads and writes the fp32 [V, d] weight gradient once; with at least d rows that costs no more than a
    read and write of the chunk's own fp32 logits, and those logits take no more memory than the gradient itself.
    """
    return min(max(n_rows, 1), max(16, hidden_size, (32 << 20) // (4 * vocab_size)))


def _add_weight_grad(grad_weight: torch.Tensor, grad_logits: torch.Tensor, rows: torch.Tensor) -> None:
    """grad_weight (fp32 [V, d]) += grad_logits.T @ rows, multiplied in grad_logits' dtype, in place."""
    rows = rows.to(grad_logits.dtype)  # under autocast rows may be fp32; calls with out= are not autocast
    if grad_logits.dtype == torch.float32:
        grad_weight.addmm_(grad_logits.T, rows)
    elif grad_weight.is_cuda:  # the GEMM multiplies in half precision and accumulates into its fp32 output
        torch.addmm(grad_weight, grad_logits.T, rows, out_dtype=torch.float32, out=grad_weight)
    else:  # no half-in, fp32-out GEMM on CPU: a [V, d] product and its fp32 copy
        grad_weight += (grad_logits.T @ rows).float()


# (rows of this chunk, its logits, grad_scale) -> (summed losses, grad_scale * d loss / d logits or None)
ChunkStep = Callable[[slice, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]


def chunk_loop(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    n_valid: torch.Tensor,
    chunk_rows: int,
    chunk_step: ChunkStep,
    want_grad_hidden: bool,
    want_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The summed losses of chunk_step over chunks of rows of hidden @ weight^T, divided by n_valid, and if wanted the
    gradients of hidden and weight (chunk_step's logit gradients come scaled by 1 / n_valid)."""
    grad_hidden = torch.empty_like(hidden) if want_grad_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad_weight else None
    grad_scale = 1.0 / n_valid if want_grad_hidden or want_grad_weight else None  # stays on the device: no sync
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    # Under autocast the matmuls run in its dtype: cast each chunk's gradient once, not once per matmul.
    device_type = hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    matmul_dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
    for start in range(0, hidden.shape[0], chunk_rows):
        chunk = slice(start, start + chunk_rows)
        rows = hidden[chunk]
        loss_sums, grad_logits = chunk_step(chunk, rows @ weight.T, grad_scale)
        total = total + loss_sums
        if grad_scale is None:
            continue
        grad_logits = grad_logits.to(matmul_dtype)
        if grad_hidden is not None:
            grad_hidden[chunk] = grad_logits @ weight
        if grad_weight is not None:
            _add_weight_grad(grad_weight, grad_logits, rows)
    return total / n_valid, grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype)


def chunked_loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_rows: int,
    chunk_fn: ChunkLossAndGrad,
    want_grad_hidden: bool,
    want_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean loss and, if wanted, the gradients of hidden and weight, one chunk of rows at a time through chunk_fn."""

    def step(chunk: slice, logits: torch.Tensor, grad_scale: torch.Tensor | None):
        return chunk_fn(logits, targets[chunk], ignore_index, label_smoothing, z_loss, grad_scale, softcap)

    n_valid = (targets != ignore_index).sum().clamp(min=1)
    return chunk_loop(hidden, weight, n_valid, chunk_rows, step, want_grad_hidden, want_grad_weight)


class GradsInForward(torch.autograd.Function):
    """A loss of (hidden, weight) whose gradients `loop(hidden, weight, *args, want_grad_hidden, want_grad_weight)`
    forms with it in forward; backward only scales them. Losses of several values (e.g. a loss and its parts)
    differentiate through the first only."""

    @staticmethod
    def forward(ctx, hidden, weight, loop, *args):
        losses, grad_hidden, grad_weight = loop(hidden, weight, *args, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_hidden, grad_weight)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_loss = grad_losses.flatten()[0]
        return (
            None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype),
            None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype),
            *([None] * (len(ctx.needs_input_grad) - 2)),
        )


def _check_linear_cross_entropy_args(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    chunk_rows: int | None,
    softcap: float | None = None,
) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden must be [N, d] and weight [V, d]; got hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}: reshape hidden to 2-D and match its last dim to weight's"
        )
    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise ValueError(
            f"linear_cross_entropy: hidden and weight must share one dtype outside autocast; got hidden "
            f"{hidden.dtype}, weight {weight.dtype}: cast one to the other's dtype"
        )
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"linear_cross_entropy: targets must be int32/int64, got {targets.dtype}: cast with .long()")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"linear_cross_entropy: hidden, weight and targets must be on one device; got {hidden.device}, "
            f"{weight.device}, {targets.device}: move them with .to(hidden.device)"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing={label_smoothing} must lie in [0, 1]")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows={chunk_rows} must be >= 1, or None for the default")
    check_softcap("linear_cross_entropy", "softcap", softcap)
    _check_targets(targets, hidden.shape[0], weight.shape[0], ignore_index)


def check_softcap(op: str, name: str, cap: float | None) -> None:
    """Raise ValueError unless the soft cap `name` is None or a positive finite number."""
    if cap is not None and (not isinstance(cap, (int, float)) or isinstance(cap, bool) or not 0 < cap < math.inf):
        raise ValueError(f"{op}: {name}={cap!r} must be a positive number (e.g. 30.0), or None for no capping")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_rows: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """cross_entropy(soft_cap(hidden [N, d] @ weight[V, d]^T, softcap), targets) without materialising the [N, V]
    logits (softcap None: the plain logits).

    Rows are processed `chunk_rows` at a time (default: default_chunk_rows); gradients of hidden and weight are
    formed in the same pass, through the soft cap.

    Bad target ids: on CPU a target outside [0, V) that is not ignore_index raises ValueError. On CUDA that check
    would wait on the device, so none is made: the kernel masks its read of the target's logit, and a bad target
    turns the loss (and its row's gradient) into NaN, which the caller's finite-loss check reports.

    Weight gradient, per call with N rows, C = chunk_rows, V x d weight of s bytes per element: each of the ceil(N / C)
    chunks adds grad_logits[C, V]^T @ rows[C, d] into one fp32 [V, d] accumulator, reading and writing it once
    (8 V d bytes; fp32 inputs, and fp16/bf16 on CUDA where the GEMM accumulates into its fp32 output), so
    ceil(N / C) * 8 V d bytes, with no [V, d] temporary, plus 4 V d read and s V d written by the final cast to
    weight's dtype. With C >= d (the default) the accumulation costs at most 8 N V + 8 V d bytes. Half-precision
    inputs on CPU add, per chunk, a [V, d] product and its fp32 copy: 6 V d bytes of temporaries, 20 V d of traffic.
    """
    _check_linear_cross_entropy_args(hidden, weight, targets, ignore_index, label_smoothing, chunk_rows, softcap)
    if use_triton(backend, hidden):
        from minigrok.kernels.linear_cross_entropy import chunk_loss_and_grad as chunk_fn
    else:
        chunk_fn = chunk_loss_and_grad
    chunk_rows = chunk_rows or default_chunk_rows(hidden.shape[0], weight.shape[0], hidden.shape[1])
    args = (hidden, weight, targets, ignore_index, label_smoothing, z_loss, softcap, chunk_rows, chunk_fn)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return GradsInForward.apply(hidden, weight, chunked_loss_and_grads, *args[2:])
    return chunked_loss_and_grads(*args, False, False)[0]  # evaluation: the loss alone
