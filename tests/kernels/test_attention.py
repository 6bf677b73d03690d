"""FlashAttention kernel vs. an independent float64 PyTorch reference: outputs, LSE and gradients."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from minigrok.functional import attention
from minigrok.kernels.attention import flash_attention, flash_attention_forward

# (batch, q heads, kv heads, q len, kv len, head dim, causal, window)
CASES = [
    (1, 4, 4, 64, 64, 64, True, None),
    (2, 4, 2, 17, 17, 16, False, None),
    (1, 8, 2, 100, 130, 80, True, None),  # queries at the end of a longer key sequence
    (2, 8, 1, 1, 130, 128, True, None),  # MQA decode
    (1, 4, 2, 1, 17, 32, False, None),
    (1, 4, 2, 1, 100, 64, True, 32),  # decode with a sliding window
    (2, 4, 4, 130, 130, 32, True, 32),
    (1, 8, 2, 64, 100, 80, False, 32),  # symmetric local attention
    (1, 8, 1, 17, 64, 64, True, 32),
    (2, 4, 2, 100, 100, 128, False, None),
    (1, 4, 4, 17, 130, 16, True, None),
    (1, 8, 2, 130, 130, 16, True, 5),  # window smaller than a block: some padded rows see no key
    (1, 4, 4, 100, 130, 32, False, 2),  # each query sees itself and its two neighbours
    (1, 8, 2, 17, 64, 32, True, 1),  # each query sees only itself
    (2, 8, 1, 64, 64, 80, False, 32),
]
LOW_PRECISION_CASES = [
    (torch.float16, (1, 4, 2, 64, 64, 64, True, None)),
    (torch.float16, (2, 8, 1, 17, 100, 80, False, 32)),
    (torch.float16, (1, 4, 4, 1, 130, 128, True, None)),
    (torch.bfloat16, (1, 4, 2, 100, 130, 64, True, None)),
]


def case_id(case):
    b, hq, hkv, tq, tk, d, causal, window = case
    return f"b{b}-h{hq}x{hkv}-t{tq}x{tk}-d{d}-{'causal' if causal else 'full'}-w{window}"


def make_inputs(case, dtype=torch.float32, seed=0):
    b, hq, hkv, tq, tk, d, _, _ = case
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, tk, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, tk, d, generator=gen).to(dtype)
    do = torch.randn(b, hq, tq, d, generator=gen).to(dtype)
    return q, k, v, do


def reference(q, k, v, causal, window, scale=None):
    """Plain attention in the dtype of its inputs: returns (out, natural-log lse)."""
    tq, tk, d = q.shape[2], k.shape[2], q.shape[3]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(d) if scale is None else scale)
    query_pos = torch.arange(tq)[:, None] + (tk - tq)
    key_pos = torch.arange(tk)[None, :]
    visible = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        visible &= key_pos <= query_pos
    if window is not None:
        visible &= (query_pos - key_pos).abs() < window
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1)


def run_reference(q, k, v, do, causal, window, dtype, scale=None):
    """Reference (out, lse, dq, dk, dv) computed in `dtype` from the given inputs."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = reference(q, k, v, causal, window, scale)
    out.backward(do.to(dtype))
    return out, lse, q.grad, k.grad, v.grad


def run_kernel(q, k, v, do, causal, window, scale=None):
    """Kernel (out, lse, dq, dk, dv); fp32 in full precision (on a GPU tf32 would miss the 1e-5 bound).

    On CPU the interpreter upcasts half tiles to fp32 before its dots, so the half-precision bounds below check
    the kernel's algorithm there, and its native bf16/fp16 MMA only on a GPU.
    """
    kwargs = {"causal": causal, "scale": scale, "window": window, "allow_tf32": False}
    _, lse = flash_attention_forward(q, k, v, **kwargs)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = flash_attention(q, k, v, **kwargs)
    out.backward(do)
    return out, lse, q.grad, k.grad, v.grad


def rel_err(actual, expected):
    """Max abs error over max abs reference; plain max abs error when the reference is exactly zero
    (one visible key per query makes dq and dk vanish)."""
    expected = expected.double()
    err = (actual.double() - expected).abs().max()
    return (err / expected.abs().max() if expected.any() else err).item()


def check_fp32(case, scale=None):
    *_, causal, window = case
    q, k, v, do = make_inputs(case)
    ours = run_kernel(q, k, v, do, causal, window, scale)
    ref = run_reference(q, k, v, do, causal, window, torch.float64, scale)
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv"), ours, ref, strict=True):
        assert a.dtype == (torch.float32 if name == "lse" else q.dtype), name
        assert rel_err(a, e) < 1e-5, f"{name}: relative error {rel_err(a, e):.2e}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference_fp32(case):
    check_fp32(case)


def test_custom_scale():
    check_fp32((1, 4, 2, 17, 64, 32, True, None), scale=0.3)


@pytest.mark.parametrize(
    "dtype, case", LOW_PRECISION_CASES, ids=lambda x: case_id(x) if isinstance(x, tuple) else str(x)
)
def test_low_precision_within_twice_torch_error(dtype, case):
    *_, causal, window = case
    q, k, v, do = make_inputs(case, dtype)
    ours = run_kernel(q, k, v, do, causal, window)
    ref = run_reference(q, k, v, do, causal, window, torch.float64)
    base = run_reference(q, k, v, do, causal, window, dtype)  # the same math, done in `dtype` by PyTorch
    for name, a, e, b in zip(("out", "lse", "dq", "dk", "dv"), ours, ref, base, strict=True):
        assert a.dtype == (torch.float32 if name == "lse" else dtype), name
        ours_err = (a.double() - e).abs().max().item()
        torch_err = (b.double() - e).abs().max().item()
        assert ours_err <= 2 * torch_err, f"{name}: ours {ours_err:.2e} vs torch {torch_err:.2e}"


def test_output_and_gradients_fully_written(monkeypatch):
    case = (2, 4, 2, 100, 130, 80, True, 32)
    q, k, v, do = make_inputs(case)
    out = torch.full(q.shape, float("nan"))
    flash_attention_forward(q, k, v, causal=True, window=32, out=out)
    ref = run_reference(q, k, v, do, True, 32, torch.float64)
    assert rel_err(out, ref[0]) < 1e-5

    # The backward allocates its own buffers: make every fresh allocation NaN so an unwritten element shows.
    def poisoned(alloc):
        return lambda *args, **kwargs: alloc(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))
    ours = run_kernel(q, k, v, do, True, 32)
    monkeypatch.undo()
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv"), ours, ref, strict=True):
        assert not a.isnan().any(), name
        assert rel_err(a, e) < 1e-5, name


def test_out_buffer_with_strides():
    q, k, v, _ = make_inputs((1, 4, 2, 17, 64, 32, False, None))
    out = torch.full((1, 17, 4, 32), float("nan")).transpose(1, 2)
    result, _ = flash_attention_forward(q, k, v, causal=False, out=out)
    assert result is out
    assert torch.equal(out, flash_attention_forward(q, k, v, causal=False)[0])


def test_backward_is_deterministic():
    case = (1, 4, 2, 64, 100, 64, True, None)  # two query heads per KV head, several key and query blocks
    q, k, v, do = make_inputs(case)
    first = run_kernel(q, k, v, do, True, None)
    second = run_kernel(q, k, v, do, True, None)
    for name, a, b in zip(("dq", "dk", "dv"), first[2:], second[2:], strict=True):
        assert torch.equal(a, b), name


def test_model_layout_strides():
    """q/k/v/dO as [B, T, H, D] transposed to [B, H, T, D] give the same results as contiguous tensors."""
    case = (2, 4, 2, 64, 100, 80, True, 32)
    q, k, v, do = make_inputs(case)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, do)]
    assert not strided[0].is_contiguous()
    expected = run_kernel(q, k, v, do, True, 32)
    got = run_kernel(*strided, True, 32)
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv"), got, expected, strict=True):
        assert torch.equal(a, e), name


def test_matches_sdpa_causal_gqa():
    q, k, v, do = make_inputs((1, 8, 2, 100, 100, 64, True, None))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
    expected.backward(do)
    got = run_kernel(q, k, v, do, True, None)
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-5)
    for a, leaf in zip(got[2:], leaves, strict=True):
        torch.testing.assert_close(a, leaf.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "q_shape, kv_shape, kwargs, match",
    [
        ((1, 6, 16, 32), (1, 4, 16, 32), {}, "heads"),
        ((1, 4, 32, 32), (1, 4, 16, 32), {}, "q length 32 exceeds k/v length 16"),
        ((1, 4, 16, 8), (1, 4, 16, 8), {}, "head_dim=8"),
        ((1, 4, 16, 33), (1, 4, 16, 33), {}, "head_dim=33"),
        ((2, 4, 16, 32), (1, 4, 16, 32), {}, "batch"),
        ((1, 4, 16, 32), (1, 4, 16, 32), {"window": 0}, "window=0"),
        ((4, 16, 32), (1, 4, 16, 32), {}, r"\[B, H, T, D\]"),
    ],
)
def test_bad_inputs_raise(q_shape, kv_shape, kwargs, match):
    """minigrok.functional.attention checks the arguments; the kernel adds its head_dim limits."""
    q, k, v = torch.randn(q_shape), torch.randn(kv_shape), torch.randn(kv_shape)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, backend="triton", **kwargs)


def test_mismatched_kv_and_dtypes_raise():
    q, k, v = torch.randn(1, 4, 16, 32), torch.randn(1, 4, 16, 32), torch.randn(1, 4, 17, 32)
    with pytest.raises(ValueError, match="k and v of one shape"):
        attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="dtype"):
        attention(q, k.half(), k.half(), backend="triton")
    with pytest.raises(ValueError, match="float64"):
        flash_attention(q.double(), k.double(), k.double())
    with pytest.raises(ValueError, match="out must match q"):
        flash_attention_forward(q, k, k, out=torch.empty(1, 4, 16, 16))


HEADS = [(4, 4), (4, 2), (8, 2), (8, 1)]
LENGTHS = [(tq, tk) for tq, tk in itertools.combinations_with_replacement([1, 17, 64, 100, 130], 2)]
SWEEP = [
    (1 + i % 2, hq, hkv, tq, tk, (16, 32, 64, 80, 128)[i % 5], causal, window)
    for i, ((hq, hkv), (tq, tk), causal, window) in enumerate(
        itertools.product(HEADS, LENGTHS, (True, False), (None, 32, 7))
    )
]


@pytest.mark.slow
@pytest.mark.parametrize("case", SWEEP, ids=case_id)
def test_sweep_fp32(case):
    check_fp32(case)


@pytest.mark.parametrize("allow_tf32, precision", [(True, "tf32"), (False, "ieee")])
def test_functional_passes_the_fp32_dot_precision_to_flash_attention(allow_tf32, precision, monkeypatch):
    import minigrok.kernels.attention as flash

    seen, kernel_args = [], flash._kernel_args

    def recorded(*args):
        settings = kernel_args(*args)
        seen.append(settings["DOT_PRECISION"])
        return settings

    monkeypatch.setattr(flash, "_kernel_args", recorded)
    q, k, v = torch.randn(1, 4, 17, 32), torch.randn(1, 2, 17, 32), torch.randn(1, 2, 17, 32)  # a prefill
    attention(q, k, v, backend="triton", allow_tf32=allow_tf32)
    assert seen == [precision]


@pytest.mark.parametrize("major, shared_memory", [(8, 166912), (9, 232448)])
def test_the_autotuner_keeps_a_config_for_every_head_dim_and_dtype(major, shared_memory, monkeypatch):
    """The GPU's tile tables, pruned as on an sm_80 / sm_90 card: never empty, so every launch finds a config."""
    import types

    import triton

    import minigrok.kernels.attention as flash

    props = types.SimpleNamespace(major=major, minor=0, shared_memory_per_block_optin=shared_memory)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    for kernel, tiles in [
        (flash._attn_fwd_kernel, flash._FWD_TILES),
        (flash._attn_bwd_dq_kernel, flash._DQ_TILES),
        (flash._attn_bwd_dkdv_kernel, flash._DKDV_TILES),
    ]:
        configs = [
            triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n}, num_warps=t.num_warps, num_stages=t.num_stages)
            for t in tiles
        ]
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for block_d in (16, 32, 64, 128, 256):
                q = torch.empty(1, 1, 1, block_d, dtype=dtype)
                kept = kernel.early_config_prune(configs, {"Q": q}, BLOCK_D=block_d)
                assert kept, f"{kernel.fn.__name__}: no config left for {dtype} at head block {block_d} on sm_{major}0"
