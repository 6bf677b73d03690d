"""Split-KV decode attention vs. float64 math: cache lengths, GQA ratios, head dims, dtypes, the cache's layout,
the split-count rule, the dispatch from minigrok.functional.attention and greedy generation."""

import itertools
import math

import pytest
import torch
from checks import assert_matches_reference, check_outputs_finite

import minigrok.kernels.decode_attention as decode
from minigrok import MiniGrok, ModelConfig
from minigrok.functional import attention
from minigrok.generate import cache_length

# (batch, q heads, kv heads, cache length, head dim, dtype)
CASES = [
    (1, 8, 8, 1, 64, torch.float32),  # one key: one split, written straight to the output
    (2, 8, 2, 17, 80, torch.float32),  # head dim padded to 128, a partial key block
    (1, 8, 1, 100, 128, torch.float32),  # MQA, two one-block splits
    (2, 8, 8, 1000, 16, torch.float32),
    (2, 4, 4, 4096, 80, torch.float32),  # splits of several key blocks each
    (1, 8, 1, 4096, 64, torch.bfloat16),
    (1, 8, 2, 1000, 128, torch.bfloat16),
    (2, 8, 2, 100, 80, torch.float16),
    (1, 8, 8, 17, 64, torch.float16),
]
SWEEP = [
    (1 + i % 2, 8, 8 // ratio, kv_len, head_dim, dtype)
    for i, (kv_len, ratio, head_dim, dtype) in enumerate(
        itertools.product(
            [1, 17, 100, 1000, 4096], [1, 4, 8], [16, 64, 80, 128], [torch.float32, torch.bfloat16, torch.float16]
        )
    )
]


def case_id(case) -> str:
    b, hq, hkv, tk, d, dtype = case
    return f"b{b}-h{hq}x{hkv}-t{tk}-d{d}-{str(dtype).removeprefix('torch.')}"


def make_inputs(case, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, hq, hkv, tk, d, dtype = case
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, t, d, generator=gen).to(dtype) for h, t in ((hq, 1), (hkv, tk), (hkv, tk)))


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v with K/V repeated per query group, in the dtype of the inputs."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def check_case(case, scale: float | None = None) -> None:
    q, k, v = make_inputs(case)
    out = decode.decode_attention(q, k, v, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected = reference(q.double(), k.double(), v.double(), scale)
    assert_matches_reference([out], [reference(q, k, v, scale)], [expected], q.dtype)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case):
    check_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SWEEP, ids=case_id)
def test_sweep(case):
    check_case(case)


def test_custom_scale():
    check_case((2, 8, 2, 100, 64, torch.float32), scale=0.3)


@pytest.mark.parametrize("kv_len", [1, 100])  # one split, and two merged ones
def test_every_output_written(kv_len, poison_empty):
    out = decode.decode_attention(*make_inputs((2, 8, 2, kv_len, 80, torch.float32)))
    check_outputs_finite([out])


def test_reads_the_model_cache_in_place():
    """q a strided view of one fused projection, k/v the filled part of a preallocated cache whose tail is NaN."""
    batch, n_heads, n_kv_heads, head_dim, length = 2, 8, 2, 64, 100
    q, k, v = make_inputs((batch, n_heads, n_kv_heads, length, head_dim, torch.float32))
    fused = torch.randn(batch, 1, (n_heads + 2 * n_kv_heads) * head_dim)
    q_view = fused[..., : n_heads * head_dim].view(batch, 1, n_heads, head_dim).transpose(1, 2)
    q_view.copy_(q)
    cache = torch.full((2, 2, batch, n_kv_heads, 160, head_dim), float("nan"))  # [k/v, layers, B, Hkv, max_len, D]
    cache[:, 1, :, :, :length] = torch.stack([k, v])
    k_view, v_view = cache[0, 1, :, :, :length], cache[1, 1, :, :, :length]
    assert not (q_view.is_contiguous() or k_view.is_contiguous())
    assert torch.equal(decode.decode_attention(q_view, k_view, v_view), decode.decode_attention(q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_key_lengths_read_each_row_its_own_keys(dtype):
    """Rows of a static cache hold 1, 70 and 300 of its 300 keys: with several splits per row, a row's later splits
    see no key at all, and the keys past each length (poisoned with NaN) are never read."""
    q, k, v = make_inputs((3, 8, 2, 300, 64, dtype))
    lengths = torch.tensor([1, 70, 300])
    assert decode.num_splits(3 * 2, 300, 64, decode._target_programs(q.device))[0] > 1
    poisoned_k, poisoned_v = k.clone(), v.clone()
    for row, length in enumerate(lengths.tolist()):
        poisoned_k[row, :, length:] = poisoned_v[row, :, length:] = float("nan")
    out = decode.decode_attention(q, poisoned_k, poisoned_v, key_lengths=lengths)
    for row, length in enumerate(lengths.tolist()):
        keys, values = k[row : row + 1, :, :length], v[row : row + 1, :, :length]
        expected = reference(q[row : row + 1].double(), keys.double(), values.double())
        assert_matches_reference([out[row : row + 1]], [reference(q[row : row + 1], keys, values)], [expected], dtype)
    # The same through functional.attention, whose PyTorch path masks instead.
    torch.testing.assert_close(attention(q, k, v, backend="torch", key_lengths=lengths), out, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(("window", "dtype"), [(1, torch.float32), (13, torch.float32), (40, torch.bfloat16)])
def test_a_ring_cache_shows_each_row_its_last_window_positions(window, dtype):
    """A ring of 40 slots (position p in slot p % 40) whose rows hold 1, 5, 39, 70 and 300 tokens: the query at each
    row's last position sees the slots of its last `window` positions, gathered here one by one; the ring's other
    slots are poisoned with NaN."""
    q, k, v = make_inputs((5, 8, 2, 40, 64, dtype), seed=3)
    lengths = [1, 5, 39, 70, 300]
    seen = [[p % 40 for p in range(max(0, length - window), length)] for length in lengths]
    poisoned_k, poisoned_v = k.clone(), v.clone()
    for row, slots in enumerate(seen):
        unseen = [slot for slot in range(40) if slot not in slots]
        poisoned_k[row, :, unseen] = poisoned_v[row, :, unseen] = float("nan")
    key_lengths = torch.tensor(lengths)
    out = decode.decode_attention(q, poisoned_k, poisoned_v, key_lengths=key_lengths, window=window)
    for row, slots in enumerate(seen):
        keys, values = k[row : row + 1, :, slots], v[row : row + 1, :, slots]
        expected = reference(q[row : row + 1].double(), keys.double(), values.double())
        assert_matches_reference([out[row : row + 1]], [reference(q[row : row + 1], keys, values)], [expected], dtype)
    torch.testing.assert_close(
        attention(q, k, v, backend="torch", key_lengths=key_lengths, window=window), out, rtol=2e-2, atol=2e-2
    )


def test_a_ring_cache_shows_several_queries_their_own_windows():
    """The PyTorch path's ring mask for 3 queries per row: query j of a row of L tokens sits at L - 3 + j."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(3, 4, 3, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(3, 2, 9, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    lengths, window = [3, 9, 25], 6
    out = attention(q, k, v, key_lengths=torch.tensor(lengths), window=window, backend="torch")
    for row, length in enumerate(lengths):
        for j in range(3):
            position = length - 3 + j
            slots = [p % 9 for p in range(max(0, position - window + 1), position + 1)]
            expected = reference(q[row : row + 1, :, j : j + 1], k[row : row + 1, :, slots], v[row : row + 1, :, slots])
            torch.testing.assert_close(out[row : row + 1, :, j : j + 1], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kv_rows, kv_len, target, expected",
    [
        (1, 1, 264, (1, 64)),
        (2, 100, 264, (2, 64)),  # no more splits than key blocks
        (2, 4096, 264, (64, 64)),
        (8, 4096, 264, (32, 128)),  # 33 wanted; two-block chunks leave 32
        (264, 4096, 264, (1, 4096)),  # the batch alone fills the GPU
        (1, 65536, 264, (128, 512)),  # capped at MAX_SPLITS
    ],
)
def test_num_splits(kv_rows, kv_len, target, expected):
    assert decode.num_splits(kv_rows, kv_len, 64, target) == expected


def test_num_splits_covers_every_key_with_no_empty_split():
    for kv_rows, kv_len, block, target in itertools.product([1, 3, 16, 300], range(1, 5000, 37), [16, 64], [132, 264]):
        splits, chunk = decode.num_splits(kv_rows, kv_len, block, target)
        assert chunk % block == 0 and 1 <= splits <= decode.MAX_SPLITS
        assert (splits - 1) * chunk < kv_len <= splits * chunk
        # Rounding chunks up to whole blocks keeps at least half of the splits wanted.
        wanted = min(math.ceil(target / kv_rows), math.ceil(kv_len / block), decode.MAX_SPLITS)
        assert 2 * splits >= wanted


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Record the k shape of every decode_attention launch."""
    calls, kernel = [], decode.decode_attention

    def counted(q, k, v, scale=None, key_lengths=None, window=None):
        calls.append(tuple(k.shape) if key_lengths is None else (*k.shape, key_lengths.tolist()))
        return kernel(q, k, v, scale=scale, key_lengths=key_lengths, window=window)

    monkeypatch.setattr(decode, "decode_attention", counted)
    return calls


@pytest.mark.parametrize("causal, window", [(True, None), (False, None), (True, 32), (False, 500)])
def test_functional_routes_a_single_query_to_decode(causal, window, decode_calls):
    q, k, v = make_inputs((2, 8, 2, 100, 64, torch.float32))
    out = attention(q, k, v, causal=causal, window=window, backend="triton")
    expected = attention(q, k, v, causal=causal, window=window, backend="torch")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert decode_calls == [(2, 2, min(100, window or 100), 64)]


def test_functional_keeps_flash_attention_for_gradients(decode_calls):
    q, k, v = (t.requires_grad_() for t in make_inputs((1, 4, 2, 17, 32, torch.float32)))
    attention(q, k, v, backend="triton").sum().backward()
    assert decode_calls == [] and q.grad is not None and k.grad is not None
    with torch.no_grad():
        attention(q, k, v, backend="triton")
    assert decode_calls == [(1, 2, 17, 32)]


def test_bad_inputs_raise():
    q, k, v = make_inputs((1, 4, 2, 17, 8, torch.float32))
    with pytest.raises(ValueError, match="head_dim=8"):
        decode.decode_attention(q, k, v)
    with pytest.raises(ValueError, match="float64"):
        decode.decode_attention(q.double(), k.double(), v.double())


def test_greedy_generation_matches_torch_backend(decode_calls):
    """A GQA 4:1 model with head dim 80 whose cache outgrows one key block: same tokens as the PyTorch path."""
    torch.manual_seed(0)
    overrides = {"dim": 320, "n_heads": 4, "n_kv_heads": 1, "head_dim": 80, "max_seq_len": 96, "backend": "torch"}
    config = ModelConfig.from_dict(ModelConfig.from_yaml("tiny").to_dict() | overrides)
    reference_model = MiniGrok(config).eval()
    triton_model = MiniGrok(ModelConfig.from_dict(config.to_dict() | {"backend": "triton"})).eval()
    triton_model.load_state_dict(reference_model.state_dict())
    prompt = torch.randint(0, config.vocab_size, (2, 60), generator=torch.Generator().manual_seed(1))
    new_tokens = 8
    expected = reference_model.generate(prompt, new_tokens, temperature=0)
    assert torch.equal(triton_model.generate(prompt, new_tokens, temperature=0), expected)
    # Every step after the prefill, in each of the two layers, reads the static cache through the decode kernel,
    # each row its own filled length.
    buffer = cache_length(60 + new_tokens, config.max_seq_len)
    expected_calls = [(2, 1, buffer, 80, [length] * 2) for length in range(61, 60 + new_tokens) for _ in range(2)]
    assert decode_calls == expected_calls
