"""Triton SwiGLU against an explicit float64 reference, for flat, batched and column-sliced (fused) inputs."""

from __future__ import annotations

import pytest
import torch
from checks import DEVICE, assert_matches_reference, check_outputs_finite, forward_backward, max_err

from minigrok.kernels.swiglu import swiglu


def reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up written out in float64."""
    gate, up = gate.double(), up.double()
    return gate / (1 + torch.exp(-gate)) * up


def make_gate_up(shape: tuple[int, ...], dtype: torch.dtype, fused: bool = False):
    """Seeded random gate, up and incoming gradient; `fused` slices gate/up as the two halves of one projection."""
    torch.manual_seed(0)
    if fused:
        gate, up = (3 * torch.randn(*shape[:-1], 2 * shape[-1], device=DEVICE, dtype=dtype)).chunk(2, dim=-1)
    else:
        gate, up = (3 * torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(2))
    return gate, up, torch.randn(shape, device=DEVICE, dtype=dtype)


SHAPES = [(1, 48), (7, 80), (2, 65, 256), (3, 2100), (1000,)]


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_fp32_matches_float64(shape, fused, poison_empty):
    gate, up, dout = make_gate_up(shape, torch.float32, fused)
    outs, grads = forward_backward(swiglu, [gate, up], [dout])
    ref_outs, ref_grads = forward_backward(reference, [gate.double(), up.double()], [dout])
    check_outputs_finite(outs + grads)
    for got, ref in zip(outs + grads, ref_outs + ref_grads, strict=True):
        assert got.shape == ref.shape and got.dtype == torch.float32
        assert max_err(got, ref) / ref.abs().max().item() < 1e-5


@pytest.mark.parametrize("shape", [(7, 80), (3, 2100)], ids=["7x80", "3x2100"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_torch_error(dtype, shape, poison_empty):
    from minigrok.functional import swiglu as functional_swiglu

    gate, up, dout = make_gate_up(shape, dtype)
    outs, grads = forward_backward(swiglu, [gate, up], [dout])
    torch_outs, torch_grads = forward_backward(
        lambda g, u: functional_swiglu(g, u, backend="torch"), [gate, up], [dout]
    )
    ref_outs, ref_grads = forward_backward(reference, [gate.double(), up.double()], [dout])
    check_outputs_finite(outs + grads)
    assert all(t.dtype == dtype for t in outs + grads)
    assert_matches_reference(outs + grads, torch_outs + torch_grads, ref_outs + ref_grads, dtype)


def test_matches_functional_torch_backend():
    from minigrok.functional import swiglu as functional_swiglu

    gate, up, dout = make_gate_up((2, 5, 80), torch.float32)
    outs, grads = forward_backward(swiglu, [gate, up], [dout])
    for backend in ("torch", "triton"):
        fn = lambda g, u, backend=backend: functional_swiglu(g, u, backend=backend)  # noqa: E731
        torch_outs, torch_grads = forward_backward(fn, [gate, up], [dout])
        for got, expected in zip(outs + grads, torch_outs + torch_grads, strict=True):
            assert max_err(got, expected.double()) / expected.abs().max().item() < 1e-5


def test_rejects_bad_arguments():
    """minigrok.functional.swiglu checks the shapes; the kernel adds its dtypes, which gate and up must share."""
    from minigrok.functional import swiglu as functional_swiglu

    gate = torch.randn(4, 80, device=DEVICE)
    with pytest.raises(ValueError, match="one shape"):
        functional_swiglu(gate, torch.randn(4, 48, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="float16"):
        swiglu(gate, gate.half())
    with pytest.raises(ValueError, match="float64"):
        swiglu(gate.double(), gate.double())


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large(dtype, fused, poison_empty):
    from minigrok.functional import swiglu as functional_swiglu

    gate, up, dout = make_gate_up((4, 129, 2816), dtype, fused)
    outs, grads = forward_backward(swiglu, [gate, up], [dout])
    torch_outs, torch_grads = forward_backward(
        lambda g, u: functional_swiglu(g, u, backend="torch"), [gate, up], [dout]
    )
    ref_outs, ref_grads = forward_backward(reference, [gate.double(), up.double()], [dout])
    check_outputs_finite(outs + grads)
    assert_matches_reference(outs + grads, torch_outs + torch_grads, ref_outs + ref_grads, dtype)
