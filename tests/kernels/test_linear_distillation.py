"""Fused linear distillation loss (the chunk loop with the PyTorch or the Triton chunk step) against an independent
float64 reference built on full logits and torch.nn.functional.kl_div / log_softmax."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import minigrok.functional as mf
from minigrok.functional.distillation import chunk_loss_and_grad
from minigrok.kernels import linear_distillation as kernel_module

IGNORE = -100
FP32_TOL = 1e-5
# (vocab, student dim, teacher dim, rows, chunk_rows): rows never a multiple of chunk_rows, vocab not a power of two.
SHAPES = [(65, 24, 40, 37, 8), (1000, 32, 48, 45, 16), (5003, 16, 24, 19, 7)]
SETTINGS = [
    (alpha, temperature, kind)
    for alpha in (0.0, 0.5, 1.0)
    for temperature in (1.0, 2.0)
    for kind in mf.distillation.KINDS
]


def make_inputs(n: int, d_s: int, d_t: int, vocab: int, seed: int):
    """fp32 student/teacher hidden and heads with logits of std ~2, targets with ~1/5 of rows ignored."""
    gen = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(n, d_s, generator=gen)
    student_head = torch.randn(vocab, d_s, generator=gen) * (2 / d_s**0.5)
    teacher_hidden = torch.randn(n, d_t, generator=gen)
    teacher_head = torch.randn(vocab, d_t, generator=gen) * (2.5 / d_t**0.5)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < 0.2] = IGNORE
    return student_hidden, student_head, teacher_hidden, teacher_head, targets


def reference(
    student_hidden,
    student_head,
    teacher_hidden,
    teacher_head,
    targets,
    alpha,
    temperature,
    kind,
    student_softcap=None,
    teacher_softcap=None,
):
    """float64 (loss, kl, ce) on full logits (each model's soft-capped as c * tanh(logits / c) when its cap is given):
    F.kl_div for the KL, F.cross_entropy for the CE."""
    student = student_hidden.double() @ student_head.double().T
    teacher = teacher_hidden.double() @ teacher_head.double().T
    if student_softcap is not None:
        student = student_softcap * torch.tanh(student / student_softcap)
    if teacher_softcap is not None:
        teacher = teacher_softcap * torch.tanh(teacher / teacher_softcap)
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher / temperature, dim=-1)
    if kind == "forward":  # KL(teacher || student): kl_div(input=log q, target=log p) is sum p (log p - log q)
        kl_rows = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
    else:
        kl_rows = F.kl_div(log_t, log_s, reduction="none", log_target=True).sum(-1)
    valid = targets != IGNORE
    ce_rows = F.cross_entropy(student, targets, ignore_index=IGNORE, reduction="none")
    n = valid.sum().clamp(min=1)
    kl = torch.where(valid, kl_rows, 0.0).sum() / n
    ce = ce_rows.sum() / n
    return alpha * temperature**2 * kl + (1 - alpha) * ce, kl, ce


def run(fn, student_hidden, student_head, *rest, **kwargs):
    """(loss, kl, ce, grad of the student hidden, grad of the student head) of fn on fresh leaf copies."""
    h = student_hidden.detach().clone().requires_grad_()
    w = student_head.detach().clone().requires_grad_()
    loss, kl, ce = fn(h, w, *rest, **kwargs)
    loss.backward()
    return loss.detach(), kl.detach(), ce.detach(), h.grad, w.grad


def rel_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    return (value.double() - ref).abs().max().item() / ref.abs().max().item()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("alpha, temperature, kind", SETTINGS)
@pytest.mark.parametrize("vocab, d_s, d_t, n, chunk_rows", SHAPES[:2])
def test_fp32_matches_float64_reference(backend, vocab, d_s, d_t, n, chunk_rows, alpha, temperature, kind):
    inputs = make_inputs(n, d_s, d_t, vocab, seed=vocab + n)
    opts = dict(alpha=alpha, temperature=temperature, kind=kind)
    got = run(mf.linear_distillation_loss, *inputs, chunk_rows=chunk_rows, backend=backend, **opts)
    expected = run(reference, *(t.double() if t.is_floating_point() else t for t in inputs), **opts)
    assert got[0].dtype == torch.float32 and got[0].shape == ()
    for name, value, ref in zip(("loss", "kl", "ce", "grad_hidden", "grad_head"), got, expected, strict=True):
        assert torch.isfinite(value).all(), name
        assert rel_err(value, ref) < FP32_TOL, name
    assert expected[1] > 0.05  # the teacher and the student disagree: the KL term is tested on something


CAPS = [(3.0, None), (None, 2.5), (3.0, 2.5)]  # (student_softcap, teacher_softcap), against logits of std ~2
CAPPED_SETTINGS = [(0.5, 2.0, "forward"), (0.5, 1.0, "reverse"), (1.0, 2.0, "reverse")]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("student_softcap, teacher_softcap", CAPS)
@pytest.mark.parametrize("alpha, temperature, kind", CAPPED_SETTINGS)
@pytest.mark.parametrize("vocab, d_s, d_t, n, chunk_rows", SHAPES)
def test_softcapped_fp32_matches_float64_reference(
    backend, vocab, d_s, d_t, n, chunk_rows, alpha, temperature, kind, student_softcap, teacher_softcap
):
    """Each model's logits soft-capped by its own cap, the student's gradient taken through its cap."""
    inputs = make_inputs(n, d_s, d_t, vocab, seed=vocab + n + 1)
    opts = dict(alpha=alpha, temperature=temperature, kind=kind)
    opts |= dict(student_softcap=student_softcap, teacher_softcap=teacher_softcap)
    got = run(mf.linear_distillation_loss, *inputs, chunk_rows=chunk_rows, backend=backend, **opts)
    as_double = [t.double() if t.is_floating_point() else t for t in inputs]
    expected = run(reference, *as_double, **opts)
    uncapped = reference(*as_double, alpha, temperature, kind)
    assert (uncapped[0] - expected[0]).abs() > 0.01 * expected[0]  # the caps change the loss
    for name, value, ref in zip(("loss", "kl", "ce", "grad_hidden", "grad_head"), got, expected, strict=True):
        assert rel_err(value, ref) < FP32_TOL, name


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_long_rows_loop_over_blocks(kind):
    """A vocabulary above the kernel's block: the online logsumexps and KL sum cross block boundaries."""
    inputs = make_inputs(19, 16, 24, 5003, seed=3)
    opts = dict(alpha=0.5, temperature=2.0, kind=kind)
    expected = run(reference, *(t.double() if t.is_floating_point() else t for t in inputs), **opts)
    for backend in ("torch", "triton"):
        got = run(mf.linear_distillation_loss, *inputs, chunk_rows=7, backend=backend, **opts)
        assert all(rel_err(v, r) < FP32_TOL for v, r in zip(got, expected, strict=True)), backend


@pytest.mark.parametrize("caps", [(None, None), (1.5, 1.0)])  # (student_softcap, teacher_softcap)
def test_chunk_functions_agree_and_leave_the_teacher_alone(caps):
    gen = torch.Generator().manual_seed(5)
    student = 2 * torch.randn(23, 777, generator=gen)
    teacher = (2 * torch.randn(23, 777, generator=gen)).bfloat16()
    targets = torch.randint(0, 777, (23,), generator=gen)
    targets[::4] = IGNORE
    teacher_copy = teacher.clone()
    for kind in ("forward", "reverse"):
        args = (targets, IGNORE, 0.3, 1.5, kind)
        torch_out = chunk_loss_and_grad(student.clone(), teacher, *args, torch.tensor(0.25), *caps)
        triton_out = kernel_module.chunk_loss_and_grad(student.clone(), teacher, *args, torch.tensor(0.25), *caps)
        for a, b in zip(torch_out, triton_out, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        assert torch_out[2][::4].eq(0).all() and torch_out[2][1::4].abs().sum() > 0  # ignored rows: no gradient
        no_grad = kernel_module.chunk_loss_and_grad(student.clone(), teacher, *args, None, *caps)
        assert no_grad[2] is None and torch.equal(no_grad[0], triton_out[0])
    assert torch.equal(teacher, teacher_copy)


def test_teacher_gets_no_gradient_and_alpha_zero_is_cross_entropy():
    student_hidden, student_head, teacher_hidden, teacher_head, targets = make_inputs(41, 24, 40, 65, seed=6)
    teacher_hidden.requires_grad_()
    teacher_head.requires_grad_()
    distilled = run(
        mf.linear_distillation_loss, student_hidden, student_head, teacher_hidden, teacher_head, targets, alpha=0.0
    )
    assert teacher_hidden.grad is None and teacher_head.grad is None
    h, w = student_hidden.clone().requires_grad_(), student_head.clone().requires_grad_()
    mf.linear_cross_entropy(h, w, targets).backward()
    torch.testing.assert_close(distilled[3], h.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(distilled[4], w.grad, rtol=1e-6, atol=1e-9)


def test_all_rows_ignored_gives_zero_not_nan():
    inputs = list(make_inputs(9, 24, 40, 65, seed=7))
    inputs[-1] = torch.full((9,), IGNORE)
    loss, kl, ce, grad_h, grad_w = run(mf.linear_distillation_loss, *inputs)
    assert loss == kl == ce == 0 and not grad_h.any() and not grad_w.any()


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {**a, "teacher_head": a["teacher_head"][:-1]}, "teacher's vocabulary is 64, the student's 65"),
        (lambda a: {**a, "teacher_hidden": a["teacher_hidden"][:-1]}, "teacher_hidden has 8 rows"),
        (lambda a: {**a, "teacher_hidden": a["teacher_hidden"][:, :-1]}, "teacher_head"),
        (lambda a: {**a, "alpha": 1.5}, "alpha=1.5"),
        (lambda a: {**a, "temperature": 0}, "temperature=0"),
        (lambda a: {**a, "kind": "sideways"}, "kind='sideways'"),
        (lambda a: {**a, "targets": a["targets"].float()}, "targets"),
        (lambda a: {**a, "student_softcap": 0.0}, "student_softcap=0.0 must be a positive number"),
        (lambda a: {**a, "teacher_softcap": -1}, "teacher_softcap=-1 must be a positive number"),
    ],
)
def test_bad_arguments_raise(change, match):
    names = ("student_hidden", "student_head", "teacher_hidden", "teacher_head", "targets")
    args = dict(zip(names, make_inputs(9, 24, 40, 65, seed=8), strict=True))
    with pytest.raises(ValueError, match=match):
        mf.linear_distillation_loss(**change(args))


def test_torch_path_never_holds_full_logits():
    """Neither model's [N, V] logits are made: no tensor in forward or backward is larger than the teacher's head."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    n, vocab, d_t = 90, 1000, 48
    inputs = make_inputs(n, 32, d_t, vocab, seed=9)
    h, w = inputs[0].clone().requires_grad_(), inputs[1].clone().requires_grad_()
    with Largest() as largest:
        mf.linear_distillation_loss(h, w, *inputs[2:], chunk_rows=16, backend="torch").loss.backward()
    assert largest.numel <= vocab * d_t < n * vocab  # chunks of 16 x V, the weights, never N x V
    with Largest() as unchunked:
        mf.linear_distillation_loss(h, w, *inputs[2:], chunk_rows=n, backend="torch")
    assert unchunked.numel == n * vocab  # what the check above would see if the rows were not chunked
