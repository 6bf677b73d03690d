"""The PyTorch path of every op in minigrok.functional against float64 math written out here."""

import pytest
import torch
import torch.nn.functional as torch_F

import minigrok.functional as F


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def reference_attention(q, k, v, causal, window, scale=None):
    """Float64 attention with an explicit mask, K/V repeated per query group."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    q_len, kv_len = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    pos = torch.arange(q_len)[:, None] + kv_len - q_len
    key = torch.arange(kv_len)[None, :]
    visible = torch.ones(q_len, kv_len, dtype=torch.bool)
    if causal:
        visible &= key <= pos
    if window is not None:
        visible &= (pos - key).abs() < window
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("q_len,kv_len", [(17, 17), (1, 33), (7, 40), (64, 64)])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_sdpa_and_float64(n_heads, n_kv_heads, q_len, kv_len, causal):
    gen = torch.Generator().manual_seed(n_heads * 100 + q_len + kv_len)
    q = torch.randn(2, n_heads, q_len, 40, generator=gen)
    k = torch.randn(2, n_kv_heads, kv_len, 40, generator=gen)
    v = torch.randn(2, n_kv_heads, kv_len, 40, generator=gen)
    out = F.attention(q, k, v, causal=causal, backend="torch")
    assert rel_err(out, reference_attention(q, k, v, causal, None)) < 1e-5
    mask = F.attention_mask(q_len, kv_len, causal, None, q.device)
    sdpa = torch_F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert rel_err(out, sdpa) < 1e-5


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len,kv_len,window", [(50, 50, 8), (5, 60, 16), (1, 60, 4)])
def test_attention_window_and_scale(causal, q_len, kv_len, window):
    gen = torch.Generator().manual_seed(q_len * kv_len + window)
    q = torch.randn(1, 4, q_len, 16, generator=gen)
    k, v = (torch.randn(1, 2, kv_len, 16, generator=gen) for _ in range(2))
    out = F.attention(q, k, v, causal=causal, window=window, scale=0.3, backend="torch")
    assert rel_err(out, reference_attention(q, k, v, causal, window, scale=0.3)) < 1e-5


def test_attention_gradients_float64():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 9, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 13, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 13, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: F.attention(q, k, v, window=5, backend="torch"), (q, k, v))


@pytest.mark.parametrize(
    "shapes,message",
    [
        (((1, 3, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8)), "multiple"),
        (((1, 2, 9, 8), (1, 2, 4, 8), (1, 2, 4, 8)), "exceeds"),
        (((1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 5, 8)), "one shape"),
        (((2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8)), r"\[B, H, T, D\]"),
    ],
)
def test_attention_rejects_bad_shapes(shapes, message):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        F.attention(q, k, v, backend="torch")


def test_attention_rejects_bad_window_and_backend():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="window=0"):
        F.attention(q, q, q, window=0, backend="torch")
    with pytest.raises(ValueError, match="backend='cuda'"):
        F.attention(q, q, q, backend="cuda")


@pytest.mark.parametrize("rows,hidden", [(1, 48), (7, 80), (130, 256)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(rows, hidden, with_residual):
    gen = torch.Generator().manual_seed(rows + hidden)
    x = torch.randn(rows, hidden, generator=gen)
    residual = torch.randn(rows, hidden, generator=gen) if with_residual else None
    weight = torch.rand(hidden, generator=gen) + 0.5
    summed = x.double() + (0 if residual is None else residual.double())
    expected = weight.double() * summed / (summed.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    out = F.rms_norm(x, weight, 1e-5, residual=residual, backend="torch")
    if with_residual:
        out, total = out
        assert rel_err(total, summed) < 1e-6
    assert rel_err(out, expected) < 1e-5


@pytest.mark.parametrize("head_dim", [16, 80, 128])
def test_rope_rotates_half_split_pairs(head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    q = torch.randn(2, 8, 11, head_dim, generator=gen)
    k = torch.randn(2, 2, 11, head_dim, generator=gen)
    positions = torch.arange(37, 48)  # offset positions, as in KV-cache decoding
    cos, sin = F.rope_cos_sin(positions, head_dim, theta=500.0)
    q_out, k_out = F.apply_rope(q, k, cos, sin, backend="torch")
    half = head_dim // 2
    inv_freq = 500.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    angle = positions.double()[:, None] * inv_freq
    for x, out in ((q, q_out), (k, k_out)):
        x1, x2 = x.double()[..., :half], x.double()[..., half:]
        expected = torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)
        assert rel_err(out, expected) < 1e-5
    # A rotation keeps norms, and the score q.k depends only on the distance between positions.
    assert torch.allclose(q_out.norm(dim=-1), q.norm(dim=-1), rtol=1e-5)


def test_rope_rejects_mismatched_tables():
    q = torch.randn(1, 2, 5, 16)
    cos, sin = F.rope_cos_sin(torch.arange(4), 16)
    with pytest.raises(ValueError, match="cos/sin of shape"):
        F.apply_rope(q, q, cos, sin, backend="torch")


def test_swiglu():
    gen = torch.Generator().manual_seed(3)
    gate, up = torch.randn(7, 80, generator=gen), torch.randn(7, 80, generator=gen)
    expected = gate.double() / (1 + (-gate.double()).exp()) * up.double()
    assert rel_err(F.swiglu(gate, up, backend="torch"), expected) < 1e-6
    with pytest.raises(ValueError, match="one shape"):
        F.swiglu(gate, up[:, :5], backend="torch")


def reference_cross_entropy(logits, targets, ignore_index=-100, smoothing=0.0, z_loss=0.0):
    logits = logits.double()
    valid = targets != ignore_index
    log_probs = logits.log_softmax(-1)
    safe = targets.masked_fill(~valid, 0)
    nll = -log_probs.gather(1, safe[:, None])[:, 0]
    smooth = -log_probs.mean(-1)
    lse = logits.logsumexp(-1)
    losses = (1 - smoothing) * nll + smoothing * smooth + z_loss * lse**2
    return (losses * valid).sum() / valid.sum().clamp(min=1)


@pytest.mark.parametrize("vocab", [65, 1000])
@pytest.mark.parametrize("smoothing,z_loss", [(0.0, 0.0), (0.1, 1e-4)])
def test_cross_entropy_and_chunked_linear_cross_entropy(vocab, smoothing, z_loss):
    gen = torch.Generator().manual_seed(vocab)
    hidden = torch.randn(130, 48, generator=gen, requires_grad=True)
    weight = (torch.randn(vocab, 48, generator=gen) * 0.2).requires_grad_()
    targets = torch.randint(0, vocab, (130,), generator=gen)
    targets[::7] = -100
    reference = reference_cross_entropy(
        hidden.double() @ weight.double().T, targets, smoothing=smoothing, z_loss=z_loss
    )
    ref_grads = torch.autograd.grad(reference, (hidden, weight))
    plain = F.cross_entropy(hidden @ weight.T, targets, label_smoothing=smoothing, z_loss=z_loss)
    assert rel_err(plain, reference) < 1e-5
    fused = F.linear_cross_entropy(
        hidden, weight, targets, label_smoothing=smoothing, z_loss=z_loss, chunk_rows=32, backend="torch"
    )
    assert rel_err(fused, reference) < 1e-5
    for grad, ref in zip(torch.autograd.grad(fused * 3.0, (hidden, weight)), ref_grads, strict=True):
        assert rel_err(grad, 3.0 * ref) < 1e-5


def test_cross_entropy_ignored_rows_and_bad_targets():
    logits = torch.randn(4, 10)
    assert F.cross_entropy(logits, torch.full((4,), -100)).item() == 0.0
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        F.cross_entropy(logits, torch.tensor([1, 2, 10, 3]))
