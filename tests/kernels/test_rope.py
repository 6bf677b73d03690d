"""Triton rotary embedding against an explicit float64 rotation, for strided q/k, GQA and decode offsets."""

from __future__ import annotations

import pytest
import torch
from checks import DEVICE, assert_matches_reference, check_outputs_finite, forward_backward, max_err

from minigrok.kernels.rope import apply_rope


def cos_sin(offset: int, seq_len: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 tables [T, D/2] for positions offset .. offset + T - 1 (a decode step at cache position `offset`)."""
    positions = torch.arange(offset, offset + seq_len, dtype=torch.float64, device=DEVICE)
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=DEVICE) / head_dim)
    angles = positions[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The half-split rotation in float64: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.double().chunk(2, dim=-1)
    cos, sin = cos.double(), sin.double()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def make_qk(layout: str, batch: int, n_q: int, n_kv: int, seq_len: int, head_dim: int, dtype: torch.dtype):
    """Seeded random q [B, Hq, T, D], k [B, Hkv, T, D] in the given memory layout."""
    torch.manual_seed(0)
    if layout == "bhtd":  # contiguous
        return (torch.randn(batch, n, seq_len, head_dim, device=DEVICE, dtype=dtype) for n in (n_q, n_kv))
    if layout == "bthd":  # the model's [B, T, H, D].transpose(1, 2)
        return (
            torch.randn(batch, seq_len, n, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2) for n in (n_q, n_kv)
        )
    # column slices of one fused qkv projection output: rows have gaps
    qkv = torch.randn(batch, seq_len, (n_q + 2 * n_kv) * head_dim, device=DEVICE, dtype=dtype)
    q = qkv[..., : n_q * head_dim].view(batch, seq_len, n_q, head_dim).transpose(1, 2)
    k = qkv[..., n_q * head_dim : (n_q + n_kv) * head_dim].view(batch, seq_len, n_kv, head_dim).transpose(1, 2)
    return q, k


def run_case(layout, n_q, n_kv, seq_len, offset, head_dim, dtype):
    """Triton and float64 reference outputs and gradients (dq, dk) for one configuration."""
    q, k = make_qk(layout, 2, n_q, n_kv, seq_len, head_dim, dtype)
    cos, sin = cos_sin(offset, seq_len, head_dim)
    grads_out = [torch.randn(t.shape, device=DEVICE, dtype=dtype) for t in (q, k)]
    got = forward_backward(lambda q, k: apply_rope(q, k, cos, sin), [q, k], grads_out)
    ref = forward_backward(
        lambda q, k: (reference(q, cos, sin), reference(k, cos, sin)), [q.double(), k.double()], grads_out
    )
    return (q, k, cos, sin, grads_out), got, ref


@pytest.mark.parametrize("layout", ["bhtd", "bthd", "fused_qkv"])
@pytest.mark.parametrize("head_dim", [16, 64, 80, 128])
def test_fp32_matches_float64(head_dim, layout, poison_empty):
    _, (outs, grads), (ref_outs, ref_grads) = run_case(layout, 8, 2, 7, 37, head_dim, torch.float32)
    check_outputs_finite(outs + grads)
    for got, ref in zip(outs + grads, ref_outs + ref_grads, strict=True):
        assert got.shape == ref.shape and got.dtype == torch.float32
        assert max_err(got, ref) / ref.abs().max().item() < 1e-5


@pytest.mark.parametrize(
    ("n_q", "n_kv", "seq_len", "offset"),
    [(8, 2, 1, 37), (6, 3, 5, 0), (4, 4, 3, 1000), (5, 1, 1, 0)],
    ids=["decode", "odd-heads", "mha-far", "mqa-single"],
)
def test_heads_and_positions(n_q, n_kv, seq_len, offset, poison_empty):
    _, (outs, grads), (ref_outs, ref_grads) = run_case("bthd", n_q, n_kv, seq_len, offset, 80, torch.float32)
    check_outputs_finite(outs + grads)
    for got, ref in zip(outs + grads, ref_outs + ref_grads, strict=True):
        assert max_err(got, ref) / ref.abs().max().item() < 1e-5


@pytest.mark.parametrize("head_dim", [80, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_torch_error(dtype, head_dim, poison_empty):
    from minigrok.functional import apply_rope as functional_apply_rope

    (q, k, cos, sin, grads_out), (outs, grads), (ref_outs, ref_grads) = run_case("bthd", 8, 2, 7, 37, head_dim, dtype)
    torch_outs, torch_grads = forward_backward(
        lambda q, k: functional_apply_rope(q, k, cos, sin, backend="torch"), [q, k], grads_out
    )
    check_outputs_finite(outs + grads)
    assert all(t.dtype == dtype for t in outs + grads)
    assert_matches_reference(outs + grads, torch_outs + torch_grads, ref_outs + ref_grads, dtype)


def test_inplace_writes_into_the_given_views():
    q, k = make_qk("fused_qkv", 2, 8, 2, 7, 64, torch.float32)
    cos, sin = cos_sin(37, 7, 64)
    expected_q, expected_k = reference(q, cos, sin), reference(k, cos, sin)
    with torch.no_grad():
        q_out, k_out = apply_rope(q, k, cos, sin, inplace=True)
    assert q_out is q and k_out is k
    assert max_err(q, expected_q) / expected_q.abs().max().item() < 1e-5
    assert max_err(k, expected_k) / expected_k.abs().max().item() < 1e-5


def test_inplace_under_autograd():
    q_leaf, k_leaf = make_qk("bhtd", 2, 8, 2, 7, 64, torch.float32)
    q_leaf.requires_grad_(), k_leaf.requires_grad_()
    cos, sin = cos_sin(37, 7, 64)
    q, k = q_leaf * 1, k_leaf * 1  # non-leaf, not views: autograd can record the in-place rotation
    q_out, k_out = apply_rope(q, k, cos, sin, inplace=True)
    assert q_out is q and k_out is k
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    dq, dk = torch.autograd.grad((q_out, k_out), (q_leaf, k_leaf), (dq_out, dk_out))
    for got, d_out in ((dq, dq_out), (dk, dk_out)):
        expected = reference(d_out, cos, -sin)  # the transpose of a rotation
        assert max_err(got, expected) / expected.abs().max().item() < 1e-5
    q_view, k_view = (q_leaf * 1)[:, :, :], (k_leaf * 1)[:, :, :]  # views, as the model's transposed q/k are
    with pytest.raises(ValueError, match="inplace=False"):
        apply_rope(q_view, k_view, cos, sin, inplace=True)


def test_matches_functional_torch_backend():
    from minigrok.functional import apply_rope as functional_apply_rope

    (q, k, cos, sin, grads_out), (outs, grads), _ = run_case("bthd", 8, 2, 7, 37, 80, torch.float32)
    for backend in ("torch", "triton"):
        fn = lambda q, k, backend=backend: functional_apply_rope(q, k, cos, sin, backend=backend)  # noqa: E731
        torch_outs, torch_grads = forward_backward(fn, [q, k], grads_out)
        for got, expected in zip(outs + grads, torch_outs + torch_grads, strict=True):
            assert max_err(got, expected.double()) / expected.abs().max().item() < 1e-5


def test_rejects_bad_arguments():
    """minigrok.functional.apply_rope checks the arguments; the kernel adds its dtypes."""
    from minigrok.functional import apply_rope as functional_apply_rope

    q, k = make_qk("bthd", 1, 4, 2, 3, 16, torch.float32)
    cos, sin = cos_sin(0, 3, 16)
    with pytest.raises(ValueError, match="even"):
        functional_apply_rope(q[..., :15], k[..., :15], cos[:, :7], sin[:, :7], backend="triton")
    with pytest.raises(ValueError, match="cos"):
        functional_apply_rope(q, k, cos[:2], sin[:2], backend="triton")
    with pytest.raises(ValueError, match="B, H, T, D"):
        functional_apply_rope(q[0], k[0], cos, sin, backend="triton")
    with pytest.raises(ValueError, match="float64"):
        apply_rope(q.double(), k, cos, sin)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["bthd", "fused_qkv"])
@pytest.mark.parametrize("head_dim", [96, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large(dtype, head_dim, layout, poison_empty):
    from minigrok.functional import apply_rope as functional_apply_rope

    (q, k, cos, sin, grads_out), (outs, grads), (ref_outs, ref_grads) = run_case(
        layout, 32, 8, 64, 4000, head_dim, dtype
    )
    torch_outs, torch_grads = forward_backward(
        lambda q, k: functional_apply_rope(q, k, cos, sin, backend="torch"), [q, k], grads_out
    )
    check_outputs_finite(outs + grads)
    assert_matches_reference(outs + grads, torch_outs + torch_grads, ref_outs + ref_grads, dtype)
