"""Static KV cache, ragged batched generation, per-row sampling and the compiled decode step."""

import pytest
import torch

from minigrok import KVCache, MiniGrok, ModelConfig
from minigrok.generate import prefill


def make_model(seed: int = 0, **overrides) -> MiniGrok:
    values = dict(vocab_size=101, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=96)
    torch.manual_seed(seed)
    return MiniGrok(ModelConfig(**(values | overrides))).eval()


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


@torch.no_grad()
def greedy_alone(model: MiniGrok, prompts: list[list[int]], budgets: list[int]) -> list[list[int]]:
    """Each prompt's greedy new tokens, generated on its own: what a ragged batch must reproduce row by row."""
    return [
        model.generate(torch.tensor([prompt]), budget, temperature=0)[0, len(prompt) :].tolist()
        for prompt, budget in zip(prompts, budgets, strict=True)
    ]


def check_ragged_decoding(model: MiniGrok, lengths: list[int], extra: int, seed: int, max_len: int = 32) -> KVCache:
    """Prefill right-padded prompts of `lengths`, then feed each row its own next `extra` tokens one at a time:
    assert every row's logits are the full forward's of that row alone; return the cache."""
    vocab = model.config.vocab_size
    sequences = [torch.tensor(s) for s in random_prompts([n + extra for n in lengths], vocab, seed=seed)]
    first, cache = prefill(model, [s[:n] for s, n in zip(sequences, lengths, strict=True)], max_len=max_len)
    steps = [first]
    for t in range(extra):
        tokens = torch.stack([s[n + t] for s, n in zip(sequences, lengths, strict=True)])
        steps.append(model(tokens[:, None], cache=cache).logits[:, 0])
    for row, (sequence, n) in enumerate(zip(sequences, lengths, strict=True)):
        full = model(sequence[None]).logits[0, n - 1 :]
        torch.testing.assert_close(torch.stack([s[row] for s in steps]), full, rtol=1e-5, atol=1e-5)
    return cache


@pytest.mark.parametrize("heads", [(4, 2), (8, 1)])
@pytest.mark.parametrize("share", ["none", "cycle"])
def test_static_cache_of_ragged_rows_matches_each_full_forward(heads, share):
    """Prefill right-padded prompts, then feed each row its own next tokens: every row's logits are the full
    forward's of that row alone."""
    n_heads, n_kv_heads = heads
    model = make_model(1, dim=64, n_heads=n_heads, n_kv_heads=n_kv_heads, share=share)
    lengths, extra = [3, 19, 1, 11], 7
    cache = check_ragged_decoding(model, lengths, extra, seed=1)
    assert cache.lengths.tolist() == [n + extra for n in lengths]
    assert cache.keys.shape == (4, 4, n_kv_heads, 32, 64 // n_heads)  # one buffer per logical layer, KV heads only


def test_reset_rows_start_again_while_the_others_go_on():
    model = make_model(2)
    a, b, c = (torch.tensor(s) for s in random_prompts([12, 12, 6], 101, seed=2))
    cache = KVCache(model.config, 2, 16, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        model(torch.stack([a[:6], b[:6]]), cache=cache)
        cache.reset([1])  # row 1 becomes a free slot: it now holds c from position 0
        logits = [model(torch.stack([a[t], c[t - 6]])[:, None], cache=cache).logits[:, 0] for t in range(6, 12)]
        logits = torch.stack(logits, dim=1)
        torch.testing.assert_close(logits[0], model(a[None]).logits[0, 6:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[1], model(c[None]).logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [(4, 2), (8, 1)])
@pytest.mark.parametrize("share", ["none", "immediate"])
def test_batch_of_ragged_prompts_generates_what_each_would_alone(heads, share):
    n_heads, n_kv_heads = heads
    model = make_model(3, n_heads=n_heads, n_kv_heads=n_kv_heads, share=share)
    prompts = random_prompts([1, 40, 7, 23], 101, seed=3)
    budgets = [9, 4, 12, 0]
    alone = greedy_alone(model, prompts, budgets)
    assert model.generate_batch(prompts, budgets, temperature=0) == alone
    assert [len(tokens) for tokens in alone] == budgets
    # Per-row stop tokens: each row ends at (and keeps) the first of its own stop tokens.
    stops = [[alone[0][2]], [alone[1][1], 5], [], [7]]
    expected = [a[: a.index(s[0]) + 1] if s and s[0] in a else a for a, s in zip(alone, stops, strict=True)]
    assert model.generate_batch(prompts, budgets, temperature=0, stop_tokens=stops) == expected
    assert len(expected[0]) <= 3 and len(expected[1]) <= 2


def test_a_row_done_early_stays_inside_the_cache_while_a_long_one_goes_on():
    """A long prompt with a short budget beside a short prompt with a long one: the done row must not grow past
    the cache sized for each row's own prompt + budget."""
    model = make_model(3)
    prompts = random_prompts([3, 20, 1, 2], 101, seed=5)
    budgets = [10, 3, 17, 0]
    alone = greedy_alone(model, prompts, budgets)
    assert model.generate_batch(prompts, budgets, temperature=0) == alone


def test_sampling_is_reproducible_per_row_whatever_shares_the_batch():
    model = make_model(4)
    prompts = random_prompts([5, 17, 9], 101, seed=4)
    settings = dict(temperature=[0.8, 1.3, 0.0], top_k=[5, None, None], top_p=[None, 0.9, None], seed=[7, 8, None])
    together = model.generate_batch(prompts, [16, 12, 10], **settings)
    for row, prompt in enumerate(prompts):
        single = {name: [values[row]] for name, values in settings.items()}
        assert model.generate_batch([prompt], [[16, 12, 10][row]], **single) == [together[row]]
    assert together[2] == model.generate(torch.tensor([prompts[2]]), 10, temperature=0)[0, 9:].tolist()
    other_seeds = model.generate_batch(prompts, [16, 12, 10], **(settings | dict(seed=[70, 80, None])))
    assert other_seeds[0] != together[0] and other_seeds[1] != together[1]
    # Row 0 only ever draws among the 5 most likely tokens at its step.
    sequence = torch.tensor([prompts[0] + together[0]])
    top5 = model(sequence).logits[0, len(prompts[0]) - 1 : -1].topk(5, dim=-1).indices
    assert (top5 == torch.tensor(together[0])[:, None]).any(-1).all()


def test_batch_arguments_are_checked():
    model = make_model(5)
    prompts = random_prompts([3, 4], 101)
    with pytest.raises(ValueError, match="temperature has 3 values for 2 prompts"):
        model.generate_batch(prompts, 4, temperature=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="top_k=0 must be an integer >= 1"):
        model.generate_batch(prompts, 4, top_k=[3, 0])
    with pytest.raises(ValueError, match="a prompt is empty"):
        model.generate_batch([[1, 2], []], 4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate_batch([[1, 200]], 4)
    with pytest.raises(ValueError, match="max_new_tokens to at most 92"):
        model.generate_batch(prompts, [2, 93])


def test_compiled_decode_step_matches_eager_and_compiles_once():
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = make_model(6, n_layers=2)
    prompt = torch.tensor(random_prompts([9], 101, seed=6))
    torch._dynamo.reset()
    counters.clear()
    eager = model.generate(prompt, 14, temperature=0)
    assert torch.equal(model.generate(prompt, 14, temperature=0, compile=True), eager)
    assert counters["stats"]["unique_graphs"] == 1
    # Positions advance and a new cache of the same rounded length comes: neither recompiles.
    with torch._dynamo.config.patch(error_on_recompile=True):
        longer = torch.tensor(random_prompts([13], 101, seed=7))
        compiled = model.generate_batch(longer.tolist(), 12, temperature=0, compile=True)
    assert compiled == model.generate_batch(longer.tolist(), 12, temperature=0)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("layer_pattern", ["A", "CCA"])
def test_generation_under_bf16_autocast_keeps_its_cache_in_bf16(layer_pattern):
    """Under autocast k and v (and conv inputs) come out in bf16: the cache holds them so, and a decode step is the
    full forward's."""
    model = make_model(2, layer_pattern=layer_pattern)
    prompts = random_prompts([5, 12], 101, seed=3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first, cache = prefill(model, [torch.tensor(p) for p in prompts], max_len=32)
        tokens = first.argmax(-1)
        step = model(tokens[:, None], cache=cache).logits[:, 0]
        assert cache.keys.dtype == cache.conv_inputs.dtype == torch.bfloat16
        for row, prompt in enumerate(prompts):
            full = model(torch.tensor([prompt + [int(tokens[row])]])).logits[0, -1]
            torch.testing.assert_close(step[row].float(), full.float(), rtol=0.05, atol=0.05)
        new = model.generate_batch(prompts, max_new_tokens=6, temperature=0)
    assert [len(row) for row in new] == [6, 6] and all(0 <= t < 101 for row in new for t in row)
