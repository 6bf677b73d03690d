"""Triton RMSNorm (optionally fused with the residual add) against an explicit float64 reference."""

from __future__ import annotations

import pytest
import torch
from checks import (
    BF16_TRUNCATES,
    DEVICE,
    allowed_error,
    assert_matches_reference,
    check_outputs_finite,
    forward_backward,
    max_err,
)

from minigrok.kernels import rms_norm as kernel_module
from minigrok.kernels.rms_norm import rms_norm

EPS = 1e-5


def reference(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None):
    """RMSNorm written out in float64: y, or (y, s) with s = x + residual."""
    s = x.double() if residual is None else x.double() + residual.double()
    y = weight.double() * s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + EPS)
    return y if residual is None else (y, s)


def make_case(shape: tuple[int, ...], dtype: torch.dtype, with_residual: bool):
    """Seeded random inputs and incoming gradients: (inputs, grads_out)."""
    torch.manual_seed(0)
    hidden = shape[-1]
    inputs = [torch.randn(shape, device=DEVICE, dtype=dtype), torch.randn(hidden, device=DEVICE, dtype=dtype)]
    grads_out = [torch.randn(shape, device=DEVICE, dtype=dtype)]
    if with_residual:
        inputs.append(torch.randn(shape, device=DEVICE, dtype=dtype))
        grads_out.append(torch.randn(shape, device=DEVICE, dtype=dtype))
    return inputs, grads_out


def triton_fn(x, weight, residual=None):
    return rms_norm(x, weight, EPS, residual)


def assert_is_sum(s: torch.Tensor, x: torch.Tensor, residual: torch.Tensor) -> None:
    if s.dtype == torch.bfloat16 and BF16_TRUNCATES:
        torch.testing.assert_close(s, x + residual, rtol=2**-7, atol=0)
    else:
        assert torch.equal(s, x + residual)


def assert_fp32_matches_float64(shape: tuple[int, ...], with_residual: bool) -> None:
    """y (and s), dx, dweight (and dresidual) within 1e-5 relative of float64; s exactly x + residual."""
    inputs, grads_out = make_case(shape, torch.float32, with_residual)
    outs, grads = forward_backward(triton_fn, inputs, grads_out)
    ref_outs, ref_grads = forward_backward(reference, [t.double() for t in inputs], grads_out)
    check_outputs_finite(outs + grads)
    for got, ref in zip(outs + grads, ref_outs + ref_grads, strict=True):
        assert got.shape == ref.shape and got.dtype == torch.float32
        assert max_err(got, ref) / ref.abs().max().item() < 1e-5
    if with_residual:
        assert_is_sum(outs[1], inputs[0], inputs[2])
        assert torch.equal(grads[0], grads[2])  # s = x + residual: both get d s


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [48, 80, 256, 576, 960])
@pytest.mark.parametrize("leading", [(1,), (7,), (2, 65)], ids=["rows1", "rows7", "rows130"])
def test_fp32_matches_float64(leading, hidden, with_residual, poison_empty):
    assert_fp32_matches_float64((*leading, hidden), with_residual)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [80, 960])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_torch_error(dtype, hidden, with_residual, poison_empty):
    from minigrok.functional import rms_norm as functional_rms_norm

    def torch_fn(x, weight, residual=None):
        return functional_rms_norm(x, weight, EPS, residual, backend="torch")

    inputs, grads_out = make_case((130, hidden), dtype, with_residual)
    outs, grads = forward_backward(triton_fn, inputs, grads_out)
    torch_outs, torch_grads = forward_backward(torch_fn, inputs, grads_out)
    ref_outs, ref_grads = forward_backward(reference, [t.double() for t in inputs], grads_out)
    check_outputs_finite(outs + grads)
    assert all(t.dtype == dtype for t in outs + grads)
    assert_matches_reference(outs + grads, torch_outs + torch_grads, ref_outs + ref_grads, dtype)
    if with_residual:
        assert_is_sum(outs[1], inputs[0], inputs[2])


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [64, 200, 257])
def test_rows_wider_than_the_block_loop_over_blocks(monkeypatch, hidden, with_residual, poison_empty):
    """With the block capped at 64, rows of one, several and a partial last block take the looping path."""
    monkeypatch.setattr(kernel_module, "_MAX_BLOCK", 64)
    assert_fp32_matches_float64((2, 65, hidden), with_residual)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [16384, 20000])
def test_very_wide_rows(hidden, with_residual, poison_empty):
    """Past MAX_ROW_BLOCK (8192) a row no longer sits in registers; few rows keep the interpreter quick."""
    assert hidden > kernel_module._MAX_BLOCK
    assert_fp32_matches_float64((5, hidden), with_residual)


def test_dweight_is_deterministic():
    inputs, grads_out = make_case((130, 256), torch.float32, with_residual=True)
    first = forward_backward(triton_fn, inputs, grads_out)[1][1]
    second = forward_backward(triton_fn, inputs, grads_out)[1][1]
    assert torch.equal(first, second)


@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_functional_torch_backend(with_residual):
    from minigrok.functional import rms_norm as functional_rms_norm

    inputs, grads_out = make_case((3, 5, 80), torch.float32, with_residual)
    outs, grads = forward_backward(triton_fn, inputs, grads_out)
    for backend in ("torch", "triton"):
        torch_outs, torch_grads = forward_backward(
            lambda x, w, r=None, backend=backend: functional_rms_norm(x, w, EPS, r, backend=backend), inputs, grads_out
        )
        for got, expected in zip(outs + grads, torch_outs + torch_grads, strict=True):
            assert max_err(got, expected.double()) / expected.abs().max().item() < 1e-5


def test_rejects_bad_arguments():
    """minigrok.functional.rms_norm checks the shapes; the kernel adds its dtypes."""
    from minigrok.functional import rms_norm as functional_rms_norm

    x = torch.randn(4, 80, device=DEVICE)
    with pytest.raises(ValueError, match="weight.shape"):
        functional_rms_norm(x, torch.randn(48, device=DEVICE), EPS, backend="triton")
    with pytest.raises(ValueError, match="residual"):
        functional_rms_norm(x, torch.randn(80, device=DEVICE), EPS, torch.randn(4, 48, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="float64"):
        rms_norm(x.double(), torch.randn(80, device=DEVICE, dtype=torch.float64), EPS)
    with pytest.raises(ValueError, match="float16"):
        rms_norm(x, torch.randn(80, device=DEVICE), EPS, x.half())


@pytest.mark.slow
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [1000, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large(dtype, hidden, with_residual, poison_empty):
    from minigrok.functional import rms_norm as functional_rms_norm

    inputs, grads_out = make_case((4, 257, hidden), dtype, with_residual)
    outs, grads = forward_backward(triton_fn, inputs, grads_out)
    ref_outs, ref_grads = forward_backward(reference, [t.double() for t in inputs], grads_out)
    check_outputs_finite(outs + grads)
    if dtype == torch.float32:
        for got, ref in zip(outs + grads, ref_outs + ref_grads, strict=True):
            assert max_err(got, ref) / ref.abs().max().item() < 1e-5
    else:
        torch_fn = lambda x, w, r=None: functional_rms_norm(x, w, EPS, r, backend="torch")  # noqa: E731
        torch_outs, torch_grads = forward_backward(torch_fn, inputs, grads_out)
        for got, baseline, ref in zip(outs + grads, torch_outs + torch_grads, ref_outs + ref_grads, strict=True):
            assert max_err(got, ref) <= allowed_error(dtype, max_err(baseline, ref), ref)
