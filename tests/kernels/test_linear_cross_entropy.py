"""Fused linear cross-entropy (the chunk loop driven by the Triton kernel or by PyTorch, the kernel on its own) against
an independent float64 reference."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import minigrok.functional as mf
from minigrok.functional.cross_entropy import chunk_loss_and_grad, chunked_loss_and_grads, default_chunk_rows
from minigrok.kernels import linear_cross_entropy as kernel_module

ce_module = importlib.import_module("minigrok.functional.cross_entropy")  # the package attribute is the function
linear_cross_entropy = functools.partial(mf.linear_cross_entropy, backend="triton")

IGNORE = -100
FP32_TOL = 1e-5

# (vocab, hidden, rows, chunk_rows): rows never a multiple of chunk_rows, vocab never a multiple of the kernel block.
SHAPES = [(65, 48, 130, 32), (1000, 80, 130, 32), (8192, 256, 70, 16)]
SMOOTHING_ZLOSS = [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-4), (0.1, 1e-4)]


def make_inputs(
    n: int, d: int, vocab: int, seed: int, ignore_index: int = IGNORE, logit_scale: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 hidden [n, d], weight [vocab, d] with logits of std ~logit_scale, targets with ~1/5 of rows ignored."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(vocab, d, generator=gen) * (logit_scale / d**0.5)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < 0.2] = ignore_index
    return hidden, weight, targets


def reference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """float64 mean over non-ignored rows of (1-eps) * nll + eps * mean_v(-log p_v) + z_loss * lse^2, of the logits
    softcap * tanh(logits / softcap) when softcap is given."""
    logits = hidden.double() @ weight.double().T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    log_probs = logits.log_softmax(-1)
    valid = targets != ignore_index
    nll = -log_probs.gather(1, targets.masked_fill(~valid, 0)[:, None])[:, 0]
    per_row = (1 - label_smoothing) * nll + label_smoothing * -log_probs.mean(-1) + z_loss * logits.logsumexp(-1) ** 2
    return torch.where(valid, per_row, 0.0).sum() / valid.sum().clamp(min=1)


def loss_and_grads(fn: Callable[..., torch.Tensor], hidden: torch.Tensor, weight: torch.Tensor, *args, **kwargs):
    """Run fn on fresh leaf copies of hidden and weight; return (loss, grad_hidden, grad_weight)."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = fn(h, w, *args, **kwargs)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def max_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    return (value.double() - ref).abs().max().item()


def rel_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    return max_err(value, ref) / ref.abs().max().item()


def naive_loss(
    hidden, weight, targets, ignore_index=IGNORE, label_smoothing=0.0, z_loss=0.0, softcap=None
) -> torch.Tensor:
    """PyTorch's unfused path in the inputs' dtype: full logits, F.cross_entropy on their fp32 copy (soft-capped in
    fp32 when softcap is given)."""
    logits = (hidden @ weight.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    losses = F.cross_entropy(
        logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none"
    )
    valid = targets != ignore_index
    losses = losses + z_loss * logits.logsumexp(-1) ** 2 * valid
    return losses.sum() / valid.sum().clamp(min=1)


def assert_no_worse_than_naive(ours, naive, ref) -> None:
    """Each of (loss, grad_hidden, grad_weight) at most 2x as far from the float64 reference as the naive path's."""
    for name, value, naive_value, ref_value in zip(
        ("loss", "grad_hidden", "grad_weight"), ours, naive, ref, strict=True
    ):
        assert torch.isfinite(value).all(), name
        # Both losses are fp32 reductions; differences below fp32 noise (FP32_TOL relative) are not the kernel's doing.
        floor = FP32_TOL * ref_value.abs().item() if name == "loss" else 0.0
        assert max_err(value, ref_value) <= 2 * max_err(naive_value, ref_value) + floor, name


IMPLS = {
    "kernel": lambda h, w, t, chunk_rows, **kw: kernel_module.linear_cross_entropy(h, w, t, **kw),
    "functional_triton": lambda h, w, t, chunk_rows, **kw: linear_cross_entropy(h, w, t, chunk_rows=chunk_rows, **kw),
    "functional_torch": lambda h, w, t, chunk_rows, **kw: mf.linear_cross_entropy(
        h, w, t, chunk_rows=chunk_rows, backend="torch", **kw
    ),
    "cross_entropy": lambda h, w, t, chunk_rows, **kw: mf.cross_entropy(h @ w.T, t, **kw),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("label_smoothing, z_loss", SMOOTHING_ZLOSS)
@pytest.mark.parametrize("vocab, d, n, chunk_rows", SHAPES)
def test_fp32_matches_float64_reference(impl, vocab, d, n, chunk_rows, label_smoothing, z_loss):
    hidden, weight, targets = make_inputs(n, d, vocab, seed=vocab + d)
    opts = dict(ignore_index=IGNORE, label_smoothing=label_smoothing, z_loss=z_loss)
    loss, grad_h, grad_w = loss_and_grads(IMPLS[impl], hidden, weight, targets, chunk_rows, **opts)
    ref_loss, ref_h, ref_w = loss_and_grads(reference_loss, hidden.double(), weight.double(), targets, **opts)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert rel_err(loss, ref_loss) < FP32_TOL
    assert rel_err(grad_h, ref_h) < FP32_TOL
    assert rel_err(grad_w, ref_w) < FP32_TOL


SOFTCAPPED_IMPLS = ["kernel", "functional_triton", "functional_torch"]


@pytest.mark.parametrize("impl", SOFTCAPPED_IMPLS)
@pytest.mark.parametrize("label_smoothing, z_loss", SMOOTHING_ZLOSS)
@pytest.mark.parametrize("vocab, d, n, chunk_rows", SHAPES)
def test_softcapped_fp32_matches_float64_reference(impl, vocab, d, n, chunk_rows, label_smoothing, z_loss):
    """Logits of std ~6 under a cap of 5: most are squashed, so the loss and the chain rule through tanh both count."""
    hidden, weight, targets = make_inputs(n, d, vocab, seed=vocab + d + 1, logit_scale=6.0)
    opts = dict(ignore_index=IGNORE, label_smoothing=label_smoothing, z_loss=z_loss, softcap=5.0)
    loss, grad_h, grad_w = loss_and_grads(IMPLS[impl], hidden, weight, targets, chunk_rows, **opts)
    ref_loss, ref_h, ref_w = loss_and_grads(reference_loss, hidden.double(), weight.double(), targets, **opts)
    uncapped = reference_loss(hidden.double(), weight.double(), targets, IGNORE, label_smoothing, z_loss)
    assert (uncapped - ref_loss).abs() > 0.1 * ref_loss  # the cap changes the loss a lot
    assert rel_err(loss, ref_loss) < FP32_TOL
    assert rel_err(grad_h, ref_h) < FP32_TOL
    assert rel_err(grad_w, ref_w) < FP32_TOL


@pytest.mark.parametrize("impl", SOFTCAPPED_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab, d, n, chunk_rows", SHAPES[1:])
def test_softcapped_low_precision_no_worse_than_naive_torch(impl, dtype, vocab, d, n, chunk_rows):
    hidden, weight, targets = make_inputs(n, d, vocab, seed=20, logit_scale=6.0)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    opts = dict(ignore_index=IGNORE, label_smoothing=0.1, z_loss=1e-4, softcap=5.0)
    ours = loss_and_grads(IMPLS[impl], hidden, weight, targets, chunk_rows, **opts)
    naive = loss_and_grads(naive_loss, hidden, weight, targets, **opts)
    ref = loss_and_grads(reference_loss, hidden.double(), weight.double(), targets, **opts)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == ours[2].dtype == dtype
    assert_no_worse_than_naive(ours, naive, ref)


@pytest.mark.parametrize("impl", SOFTCAPPED_IMPLS)
def test_softcap_keeps_huge_logits_finite_and_bounded(impl):
    """Logits in the thousands under a cap of 30: the kernel's tanh (from one exp) saturates without overflow."""
    hidden, weight, targets = make_inputs(50, 64, 1000, seed=21, logit_scale=2000.0)
    opts = dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0)
    ours = loss_and_grads(IMPLS[impl], hidden, weight, targets, 16, **opts)
    naive = loss_and_grads(naive_loss, hidden, weight, targets, **opts)
    ref = loss_and_grads(reference_loss, hidden.double(), weight.double(), targets, **opts)
    assert ref[0] < 2 * 30 + 10  # each row's loss is at most 2 * cap + log V: bounded, whatever the logits
    assert_no_worse_than_naive(ours, naive, ref)


def test_large_logits_are_stable():
    """Logits in the hundreds overflow a plain exp in fp32; the online max must keep the kernel finite and accurate.

    At this scale fp32 rounding of the logits alone moves the softmax by ~1e-5, so the bar is PyTorch's own fp32 path.
    """
    hidden, weight, targets = make_inputs(50, 64, 1000, seed=1, logit_scale=150.0)
    ours = loss_and_grads(linear_cross_entropy, hidden, weight, targets, chunk_rows=16, z_loss=1e-4)
    naive = loss_and_grads(naive_loss, hidden, weight, targets, z_loss=1e-4)
    ref = loss_and_grads(reference_loss, hidden.double(), weight.double(), targets, z_loss=1e-4)
    assert_no_worse_than_naive(ours, naive, ref)


@pytest.mark.parametrize("impl", ["kernel", "functional_triton", "functional_torch"])
def test_ignored_rows_contribute_nothing(impl):
    hidden, weight, targets = make_inputs(130, 48, 1000, seed=2, ignore_index=0)
    ignored = targets == 0
    assert 0 < ignored.sum() < len(targets)
    opts = dict(ignore_index=0, label_smoothing=0.1, z_loss=1e-4)
    loss, grad_h, grad_w = loss_and_grads(IMPLS[impl], hidden, weight, targets, 32, **opts)
    moved = hidden.clone()
    moved[ignored] = 10 * torch.randn(int(ignored.sum()), 48)
    loss2, grad_h2, grad_w2 = loss_and_grads(IMPLS[impl], moved, weight, targets, 32, **opts)
    assert torch.equal(grad_h[ignored], torch.zeros_like(grad_h[ignored]))
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_h2, grad_h, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad_w2, grad_w, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("impl", ["kernel", "functional_triton", "functional_torch", "cross_entropy"])
def test_all_ignored_gives_zero_loss_and_grads(impl):
    hidden, weight, _ = make_inputs(40, 48, 65, seed=3)
    targets = torch.full((40,), IGNORE)
    loss, grad_h, grad_w = loss_and_grads(IMPLS[impl], hidden, weight, targets, 16, label_smoothing=0.1, z_loss=1e-4)
    assert loss.item() == 0.0
    assert torch.equal(grad_h, torch.zeros_like(grad_h))
    assert torch.equal(grad_w, torch.zeros_like(grad_w))


@pytest.mark.parametrize("impl", ["kernel", "functional_triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("label_smoothing, z_loss", [(0.0, 0.0), (0.1, 1e-4)])
@pytest.mark.parametrize("vocab, d, n, chunk_rows", SHAPES[1:])
def test_low_precision_no_worse_than_naive_torch(impl, dtype, vocab, d, n, chunk_rows, label_smoothing, z_loss):
    hidden, weight, targets = make_inputs(n, d, vocab, seed=4)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    opts = dict(ignore_index=IGNORE, label_smoothing=label_smoothing, z_loss=z_loss)
    ours = loss_and_grads(IMPLS[impl], hidden, weight, targets, chunk_rows, **opts)
    naive = loss_and_grads(naive_loss, hidden, weight, targets, **opts)
    # The reference sees the same rounded inputs, so only the computation's rounding is measured.
    ref = loss_and_grads(reference_loss, hidden.double(), weight.double(), targets, **opts)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == ours[2].dtype == dtype
    assert_no_worse_than_naive(ours, naive, ref)


@pytest.mark.parametrize("impl", ["kernel", "functional_triton", "functional_torch"])
def test_tied_embedding_weight_accumulates(impl):
    vocab, d, n = 1000, 48, 70
    hidden_unused, weight, targets = make_inputs(n, d, vocab, seed=5)
    ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(6))
    proj = torch.randn(d, d, generator=torch.Generator().manual_seed(7)) / d**0.5

    def model_loss(embedding_weight: torch.Tensor, fn: Callable[..., torch.Tensor]) -> torch.Tensor:
        hidden = torch.tanh(F.embedding(ids, embedding_weight) @ proj.to(embedding_weight.dtype)) * 3
        return fn(hidden, embedding_weight, targets, label_smoothing=0.1)

    embedding = torch.nn.Embedding(vocab, d)
    with torch.no_grad():
        embedding.weight.copy_(weight)
    loss = model_loss(embedding.weight, lambda h, w, t, **kw: IMPLS[impl](h, w, t, 16, **kw))
    loss.backward()
    ref_weight = weight.double().requires_grad_()
    ref_loss = model_loss(ref_weight, reference_loss)
    ref_loss.backward()
    assert rel_err(loss.detach(), ref_loss.detach()) < FP32_TOL
    assert rel_err(embedding.weight.grad, ref_weight.grad) < FP32_TOL


def test_backward_scales_by_incoming_gradient():
    hidden, weight, targets = make_inputs(70, 48, 65, seed=8)
    _, grad_h, grad_w = loss_and_grads(
        lambda h, w, t: 2.5 * linear_cross_entropy(h, w, t, chunk_rows=16), hidden, weight, targets
    )
    _, ref_h, ref_w = loss_and_grads(reference_loss, hidden.double(), weight.double(), targets)
    assert rel_err(grad_h, 2.5 * ref_h) < FP32_TOL
    assert rel_err(grad_w, 2.5 * ref_w) < FP32_TOL


def test_only_needed_grads_are_computed(monkeypatch):
    calls = []
    real = ce_module.chunked_loss_and_grads

    def spy(*args):
        calls.append(args[-2:])
        return real(*args)

    monkeypatch.setattr(ce_module, "chunked_loss_and_grads", spy)
    hidden, weight, targets = make_inputs(40, 48, 65, seed=9)
    ref_loss, ref_h, ref_w = loss_and_grads(reference_loss, hidden.double(), weight.double(), targets)

    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, weight, targets).backward()
    assert calls.pop() == (True, False) and rel_err(h.grad, ref_h) < FP32_TOL

    w = weight.clone().requires_grad_()
    linear_cross_entropy(hidden, w, targets).backward()
    assert calls.pop() == (False, True) and rel_err(w.grad, ref_w) < FP32_TOL

    with torch.no_grad():
        loss = linear_cross_entropy(hidden.requires_grad_(), w, targets)
    assert calls.pop() == (False, False) and not loss.requires_grad
    assert rel_err(loss, ref_loss) < FP32_TOL


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda h, w, t: (h[None], w, t), "hidden"),
        (lambda h, w, t: (h, w[:, :-1], t), "weight"),
        (lambda h, w, t: (h, w.double(), t), "dtype"),
        (lambda h, w, t: (h, w, t.float()), "targets"),
        (lambda h, w, t: (h, w, t[:-1]), "targets"),
        (lambda h, w, t: (h, w, torch.where(t == IGNORE, 65, t)), r"\[0, 65\)"),
    ],
)
def test_bad_arguments_raise(change, match):
    hidden, weight, targets = make_inputs(20, 48, 65, seed=10)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(*change(hidden, weight, targets))


def test_bad_options_raise():
    hidden, weight, targets = make_inputs(20, 48, 65, seed=11)
    for softcap in (0.0, -3.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match=rf"softcap={softcap!r} must be a positive number"):
            linear_cross_entropy(hidden, weight, targets, softcap=softcap)
    with pytest.raises(ValueError, match="chunk_rows=0"):
        linear_cross_entropy(hidden, weight, targets, chunk_rows=0)
    with pytest.raises(ValueError, match="label_smoothing=1.5"):
        linear_cross_entropy(hidden, weight, targets, label_smoothing=1.5)


@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("label_smoothing, z_loss", SMOOTHING_ZLOSS)
def test_chunk_functions_match_float64(dtype, label_smoothing, z_loss, softcap):
    """Both per-chunk steps the loop can be given: summed loss and grad_scale * d loss / d logits, or the loss alone
    (with a cap: of the capped logits, the gradient w.r.t. the uncapped ones)."""
    gen = torch.Generator().manual_seed(13)
    logits = (2 * torch.randn(37, 1001, generator=gen)).to(dtype)
    targets = torch.randint(0, 1001, (37,), generator=gen)
    targets[::5] = IGNORE
    n_valid = (targets != IGNORE).sum()
    opts = (IGNORE, label_smoothing, z_loss)
    identity = torch.eye(1001, dtype=torch.float64)
    ref_loss, ref_grad, _ = loss_and_grads(reference_loss, logits.double(), identity, targets, *opts, softcap)
    for chunk_fn in (chunk_loss_and_grad, kernel_module.chunk_loss_and_grad):
        loss_sum, grad = chunk_fn(logits.clone(), targets, *opts, 1.0 / n_valid, softcap)
        assert loss_sum.dtype == grad.dtype == torch.float32 and grad.shape == logits.shape
        assert rel_err(loss_sum / n_valid, ref_loss) < FP32_TOL
        assert rel_err(grad, ref_grad) < FP32_TOL
        loss_alone, no_grad = chunk_fn(logits.clone(), targets, *opts, None, softcap)
        assert no_grad is None and rel_err(loss_alone / n_valid, ref_loss) < FP32_TOL


@pytest.mark.parametrize("label_smoothing, z_loss", [(0.0, 0.0), (0.1, 1e-4)])
def test_chunk_loop_gives_the_same_with_either_chunk_function(label_smoothing, z_loss):
    hidden, weight, targets = make_inputs(70, 48, 1000, seed=14)
    args = (hidden, weight, targets, IGNORE, label_smoothing, z_loss, None, 16)
    with_torch = chunked_loss_and_grads(*args, chunk_loss_and_grad, True, True)
    with_triton = chunked_loss_and_grads(*args, kernel_module.chunk_loss_and_grad, True, True)
    ref = loss_and_grads(reference_loss, hidden.double(), weight.double(), targets, IGNORE, label_smoothing, z_loss)
    for from_torch, from_triton, expected in zip(with_torch, with_triton, ref, strict=True):
        torch.testing.assert_close(from_triton, from_torch, rtol=1e-5, atol=1e-8)
        assert rel_err(from_triton, expected) < FP32_TOL


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_matmuls_no_worse_than_naive(backend):
    """Under bf16 autocast the chunk matmuls run in bf16 and the gradients come back in the inputs' fp32."""
    hidden, weight, targets = make_inputs(70, 48, 1000, seed=15)
    opts = dict(label_smoothing=0.1, z_loss=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = loss_and_grads(mf.linear_cross_entropy, hidden, weight, targets, chunk_rows=16, backend=backend, **opts)
        naive = loss_and_grads(naive_loss, hidden, weight, targets, **opts)
    ref = loss_and_grads(reference_loss, hidden.double(), weight.double(), targets, **opts)
    assert ours[1].dtype == ours[2].dtype == torch.float32
    assert_no_worse_than_naive(ours, naive, ref)


def test_default_chunk_rows_keeps_logits_near_32_mib_and_at_least_hidden_size():
    rows = default_chunk_rows(100_000, 50_257, 128)
    assert rows * 50_257 * 4 <= 32 << 20 < (rows + 1) * 50_257 * 4
    assert default_chunk_rows(100_000, 50_257, 2048) == 2048  # fp32 logits no larger than the fp32 weight gradient
    assert default_chunk_rows(100_000, 4_000_000, 8) == 16
    assert default_chunk_rows(10, 1000, 64) == 10
    assert default_chunk_rows(500, 1000, 64) == 500


@pytest.mark.parametrize("vocab, bad", [(1000, [1000, -5, 1003]), (65, [65, -1, 64 + 10**6])])
def test_bad_targets_give_nan_rows_without_reading_them(vocab, bad):
    """Off the CPU no host check runs: the kernel masks the target's load and turns only that row's loss into NaN."""
    gen = torch.Generator().manual_seed(16)
    logits = 2 * torch.randn(9, vocab, generator=gen)
    targets = torch.randint(0, vocab, (9,), generator=gen)
    targets[[1, 4, 7]] = torch.tensor(bad)
    targets[2] = IGNORE
    good = torch.tensor([i not in (1, 4, 7) for i in range(9)])
    for chunk_fn in (chunk_loss_and_grad, kernel_module.chunk_loss_and_grad):
        loss_sum, grad = chunk_fn(logits.clone(), targets, IGNORE, 0.1, 1e-4, torch.tensor(0.5))
        assert loss_sum.isnan()
        assert grad[~good].isnan().all() and grad[good].isfinite().all()
        good_sum, good_grad = chunk_fn(logits[good].clone(), targets[good], IGNORE, 0.1, 1e-4, torch.tensor(0.5))
        torch.testing.assert_close(grad[good], good_grad, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=rf"\[0, {vocab}\).*got values in \[{min(bad)}, {max(bad)}\]"):
        mf.cross_entropy(logits, targets)  # on CPU the check costs nothing, so it runs


class _NewTensorsOfShape(TorchDispatchMode):
    """Records each op's name, and the name of each op whose output is a new tensor (not an input's storage) of shape."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape, self.ops, self.allocations = shape, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        self.ops.append(str(func))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.shape == self.shape and not any(t.is_set_to(a) for a in inputs):
                self.allocations.append(f"{func} {t.dtype}")
        return out


aten = torch.ops.aten
# Ops whose result depends on tensor values the host must first read back: each one waits on a device.
VALUE_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten.equal.default, aten.is_nonzero.default}


class _NoHostReads(TorchDispatchMode):
    """Fails every op that would wait on a device: a value read into Python, or a result shaped by tensor values."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1])
        if func is aten._local_scalar_dense.default or func in VALUE_DEPENDENT or bool_index:
            raise AssertionError(f"{func} waits on the device to read tensor values")
        out = func(*args, **(kwargs or {}))
        if not all(isinstance(t, torch.Tensor) for t in tree_leaves(out)):
            raise AssertionError(f"{func} returns a Python value, read from the device")
        return out


HOST_READS = {
    "item": lambda t: t.sum().item(),
    "int": lambda t: int(t.max()),
    "bool": lambda t: bool((t < 0).any()),
    "if": lambda t: 1 if t.sum() else 0,
    "boolean mask": lambda t: t[t != IGNORE],
    "nonzero": lambda t: (t != IGNORE).nonzero(),
    "equal": lambda t: torch.equal(t, t),
}


@pytest.mark.parametrize("host_read", list(HOST_READS))
def test_no_host_reads_catches_each_kind_of_wait(host_read):
    """What the test below relies on: each way of waiting on the device raises under _NoHostReads."""
    with _NoHostReads(), pytest.raises(AssertionError, match="device"):
        HOST_READS[host_read](torch.randint(0, 9, (8,)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_device_path_never_waits_on_the_device(monkeypatch, backend, dtype):
    """Forward and backward as on a GPU (the eager target check is off, as off the CPU) with every op that would wait
    on the device failing: the loss stays a device tensor, the valid-row count too, and no branch reads a value."""
    monkeypatch.setattr(ce_module, "reading_back_is_free", lambda t: False)
    for name in ("tolist", "numpy"):  # on a CPU tensor these read without dispatching an op
        monkeypatch.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("a tensor's values were read"))
    hidden, weight, targets = make_inputs(70, 48, 1000, seed=18)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    opts = dict(label_smoothing=0.1, z_loss=1e-4, chunk_rows=16, backend=backend)
    with _NoHostReads():
        loss, grad_h, grad_w = loss_and_grads(mf.linear_cross_entropy, hidden, weight, targets, **opts)
    ref = loss_and_grads(mf.linear_cross_entropy, hidden, weight, targets, **opts)
    for got, expected in zip((loss, grad_h, grad_w), ref, strict=True):
        assert torch.equal(got, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp32-output half-precision GEMM is CUDA's")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_weight_gradient_accumulates_inside_the_gemm(dtype):
    """No [V, d] temporary per chunk: peak memory stays below the fp32 accumulator, its cast and two chunks' worth."""
    n, d, vocab, chunk_rows = 256, 512, 8192, 16
    hidden, weight, targets = (t.cuda() for t in make_inputs(n, d, vocab, seed=19))
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    args = (hidden, weight, targets, IGNORE, 0.1, 1e-4, None, chunk_rows, kernel_module.chunk_loss_and_grad, True, True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss, grad_h, grad_w = chunked_loss_and_grads(*args)
    torch.cuda.synchronize()
    chunk_bytes = chunk_rows * vocab * (2 + 4 + 2)  # a chunk's logits, their fp32 copy, its cast gradient
    assert torch.cuda.max_memory_allocated() - before <= vocab * d * (4 + 2) + n * d * 2 + 2 * chunk_bytes
    ref = loss_and_grads(reference_loss, hidden.double(), weight.double(), targets, IGNORE, 0.1, 1e-4)
    naive = loss_and_grads(naive_loss, hidden, weight, targets, IGNORE, 0.1, 1e-4)
    assert_no_worse_than_naive((loss, grad_h, grad_w), naive, ref)


def test_cpu_half_weight_gradient_costs_what_the_docstring_says():
    """The [V, d] tensors made, by dtype: in fp32 only the accumulator (one in-place addmm per chunk) and backward's
    scaled gradient; in bf16 on CPU (no half-in, fp32-out GEMM there) also a bf16 product and its fp32 copy per chunk
    and the final cast."""
    hidden, weight, targets = make_inputs(70, 48, 1000, seed=17)

    def recorded(dtype: torch.dtype) -> _NewTensorsOfShape:
        h, w = (t.to(dtype, copy=True).requires_grad_() for t in (hidden, weight))
        with _NewTensorsOfShape((1000, 48)) as recorder:
            mf.linear_cross_entropy(h, w, targets, chunk_rows=16).backward()
        return recorder

    fp32, bf16 = recorded(torch.float32), recorded(torch.bfloat16)
    assert fp32.allocations == ["aten.zeros.default torch.float32", "aten.mul.Tensor torch.float32"]
    assert fp32.ops.count("aten.addmm_.default") == 5  # ceil(70 / 16) chunks
    per_chunk = ["aten.mm.default torch.bfloat16", "aten._to_copy.default torch.float32"]
    final = ["aten._to_copy.default torch.bfloat16", "aten.mul.Tensor torch.bfloat16"]
    assert bf16.allocations == ["aten.zeros.default torch.float32", *per_chunk * 5, *final]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab, d, n", [(4099, 128, 600), (32000, 256, 300)])
def test_sweep_larger_vocab_default_chunks(dtype, vocab, d, n):
    hidden, weight, targets = make_inputs(n, d, vocab, seed=12)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    opts = dict(label_smoothing=0.1, z_loss=1e-4)
    ours = loss_and_grads(linear_cross_entropy, hidden, weight, targets, **opts)
    naive = loss_and_grads(naive_loss, hidden, weight, targets, **opts)
    ref = loss_and_grads(reference_loss, hidden.double(), weight.double(), targets, **opts)
    if dtype == torch.float32:
        assert all(rel_err(value, ref_value) < FP32_TOL for value, ref_value in zip(ours, ref, strict=True))
    else:
        assert_no_worse_than_naive(ours, naive, ref)
