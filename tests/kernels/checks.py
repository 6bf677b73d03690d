"""Checks shared by the kernel tests: gradients through a function, error bounds, fully written outputs."""

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The Triton interpreter truncates fp32 -> bf16 where a GPU rounds to nearest.
BF16_TRUNCATES = os.environ.get("TRITON_INTERPRET") == "1"


def forward_backward(fn, inputs: list[torch.Tensor], grads_out: list[torch.Tensor]):
    """Outputs of fn(*inputs) and the gradients of all inputs when grads_out flow into the outputs."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads_in = torch.autograd.grad(outs, inputs, [g.to(o.dtype) for o, g in zip(outs, grads_out, strict=True)])
    return list(outs), list(grads_in)


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item()


def allowed_error(dtype: torch.dtype, torch_err: float, ref: torch.Tensor) -> float:
    """Twice PyTorch's own error (same op in the same dtype), plus one bf16 ulp of the largest value where the
    interpreter truncates fp32 -> bf16 (the GPU rounds to nearest), which can cost that much more."""
    extra = 2**-7 * ref.abs().max().item() if dtype == torch.bfloat16 and BF16_TRUNCATES else 0.0
    return 2 * torch_err + extra


def check_outputs_finite(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        assert torch.isfinite(t).all(), "a NaN/inf survived: part of a (NaN-poisoned) buffer was not written"


def assert_matches_reference(results, baselines, references, dtype: torch.dtype) -> None:
    """fp32 results within 1e-5 relative of the float64 references; half-precision ones within allowed_error of
    PyTorch's own error (`baselines`: the same op computed by PyTorch in `dtype`)."""
    for got, baseline, ref in zip(results, baselines, references, strict=True):
        if dtype == torch.float32:
            assert max_err(got, ref) / ref.abs().max().item() < 1e-5
        else:
            assert max_err(got, ref) <= allowed_error(dtype, max_err(baseline, ref), ref)
