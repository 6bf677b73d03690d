"""Sliding-window layers: config checks, the window in the full forward, and decoding through bounded ring caches."""

import re

import pytest
import torch
from test_generate import check_ragged_decoding

from minigrok import ConfigError, KVCache, MiniGrok, ModelConfig


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> MiniGrok:
    values = dict(vocab_size=103, dim=48, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=80, max_seq_len=160)
    torch.manual_seed(seed)
    return MiniGrok(ModelConfig(**(values | {"backend": "torch"} | overrides))).to(dtype).eval()


def random_ids(lengths: list[int], vocab: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator) for n in lengths]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"window": 8, "window_pattern": "SXL"}, "window_pattern='SXL' must be a non-empty string of S"),
        ({"window": 8, "window_pattern": ""}, "window_pattern='' must be"),
        ({"window": 0}, "window=0 must be a positive integer"),
        ({"window": True}, "window=True must be a positive integer"),
        ({"window_pattern": "SSSL"}, "window_pattern='SSSL' has windowed .S. layers but window is null: set window"),
        ({"window": 8, "window_pattern": "LL"}, "window=8 with window_pattern='LL' windows no layer"),
        (
            {"window": 8, "window_pattern": "SSL", "layer_pattern": "CCA"},
            "window_pattern='SSL' and layer_pattern='CCA' windows only convolution layers .* put an S where",
        ),
    ],
)
def test_bad_window_fields_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(vocab_size=10, dim=8, n_layers=4, n_heads=2, **overrides)


def test_the_pattern_repeats_over_logical_depth_whatever_the_sharing():
    config = ModelConfig(vocab_size=10, dim=8, n_layers=6, n_heads=2, window=5, window_pattern="SSL", share="cycle")
    assert config.layer_windows() == [5, 5, None, 5, 5, None]
    assert config.layer_blocks() == [0, 1, 2, 0, 1, 2]
    assert ModelConfig(vocab_size=10, dim=8, n_layers=3, n_heads=2).layer_windows() == [None] * 3
    assert ModelConfig(vocab_size=10, dim=8, n_layers=3, n_heads=2, window=2).layer_windows() == [2] * 3


@pytest.mark.parametrize(("window", "n_layers"), [(1, 1), (3, 2), (6, 3)])
def test_a_windowed_model_sees_only_its_receptive_field(window, n_layers):
    """Each windowed layer reaches window - 1 tokens further back, and RoPE is relative: the logits at t are those
    of the input cut to its last n_layers * (window - 1) + 1 tokens, and differ from the full-attention model's."""
    model = make_model(1, torch.float64, n_layers=n_layers, window=window)
    (ids,) = random_ids([40], 103, seed=1)
    logits = model(ids[None]).logits[0]
    field = n_layers * (window - 1) + 1
    for t in (field, 23, 39):
        cut = model(ids[None, t + 1 - field : t + 1]).logits[0, -1]
        torch.testing.assert_close(logits[t], cut, rtol=1e-5, atol=1e-7)  # RoPE tables are fp32
    full = make_model(1, torch.float64, n_layers=n_layers)
    assert not torch.allclose(full(ids[None]).logits[0, -1], logits[-1], atol=1e-4)


@pytest.mark.parametrize("window", [1, 3, 7, 12])
@pytest.mark.parametrize(("heads", "share", "pattern"), [((4, 2), "none", "S"), ((8, 1), "cycle", "SSL")])
def test_decoding_through_ring_caches_matches_the_full_forward(window, heads, share, pattern):
    """Right-padded ragged prompts (some longer than the window), then each row's own tokens far past the window:
    every step's logits are the full forward's of that row alone, while windowed layers hold `window` slots."""
    n_heads, n_kv_heads = heads
    model = make_model(2, n_heads=n_heads, n_kv_heads=n_kv_heads, share=share, window=window, window_pattern=pattern)
    lengths, extra = [17, 2, 1, 9], 30
    cache = check_ragged_decoding(model, lengths, extra, seed=window, max_len=64)
    n_windowed = sum(w is not None for w in model.config.layer_windows())
    assert cache.ring_keys.shape == (n_windowed, 4, n_kv_heads, window, 48 // n_heads)
    assert cache.keys.shape == (4 - n_windowed, 4, n_kv_heads, 64, 48 // n_heads)


def greedy_alone(model: MiniGrok, prompt: torch.Tensor, steps: int) -> list[int]:
    """Greedy tokens by the plain path: the whole sequence through the model again at every step, no cache."""
    sequence = prompt.tolist()
    for _ in range(steps):
        sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[len(prompt) :]


def test_batched_generation_far_past_the_window_is_each_rows_plain_greedy():
    model = make_model(3, window=5, window_pattern="SSSL")
    prompts = random_ids([11, 3, 6], 103, seed=3)
    with torch.no_grad():
        new = model.generate_batch(prompts, 40, temperature=0)
        assert new == [greedy_alone(model, prompt, 40) for prompt in prompts]


def test_compiled_decode_through_rings_matches_eager_and_compiles_once():
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = make_model(4, n_layers=2, window=6, window_pattern="SL")
    (prompt,) = random_ids([9], 103, seed=4)
    torch._dynamo.reset()
    counters.clear()
    eager = model.generate(prompt[None], 24, temperature=0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(model.generate(prompt[None], 24, temperature=0, compile=True), eager)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_decoding_of_windowed_models_gives_the_targets_tokens(k):
    """A round writes k + 1 positions and rolls back: the rings' rollback keeps every key the next round needs."""
    target = make_model(5, window=4, window_pattern="SSL", n_layers=3)
    draft = make_model(6, window=3, n_layers=1)
    prompts = random_ids([10, 2, 5], 103, seed=5)
    with torch.no_grad():
        speculative = target.generate_batch(prompts, 25, temperature=0, draft_model=draft, num_draft_tokens=k)
        assert speculative == target.generate_batch(prompts, 25, temperature=0)


def test_a_multi_token_continuation_needs_rollback_in_the_rings():
    model = make_model(7, window=4)
    (ids,) = random_ids([20], 103, seed=7)
    with torch.no_grad():
        cache = KVCache(model.config, 1, 32, torch.float32, torch.device("cpu"), rollback=6)
        model(ids[None, :9], cache=cache)
        chunk = model(ids[None, 9:15], cache=cache).logits[0]
        torch.testing.assert_close(chunk, model(ids[None, :15]).logits[0, 9:], rtol=1e-5, atol=1e-5)
        assert cache.ring_keys.shape[3] == 9
        short = KVCache(model.config, 1, 32, torch.float32, torch.device("cpu"))
        model(ids[None, :9], cache=short)
        with pytest.raises(ValueError, match="a forward of 6 tokens continuing the cache needs rollback >= 6"):
            model(ids[None, 9:15], cache=short)


@pytest.mark.parametrize("context", [5, 32, 100])
def test_the_report_counts_what_a_cache_holds_and_the_keys_each_query_sees(context):
    """KV bytes / token: a KVCache of `context` positions, all its buffers, over context; attention FLOPs: those of
    full attention less the keys each window hides (the causal mask's entries the windowed mask drops)."""
    from minigrok.functional import attention_mask

    config = make_model(8, window=24, window_pattern="SSL", n_layers=5).config
    report = MiniGrok.report(MiniGrok(config), context)
    cache = KVCache(config, 1, context, torch.float32, torch.device("cpu"))
    held = sum(t.numel() * t.element_size() for t in (cache.keys, cache.values, cache.ring_keys, cache.ring_values))
    assert report.kv_cache_bytes_per_token["fp32"] == round(held / context)
    full = make_model(8, n_layers=5).report(context)
    hidden = sum(
        int(
            attention_mask(context, context, True, None, "cpu").sum()
            - attention_mask(context, context, True, w, "cpu").sum()
        )
        for w in config.layer_windows()
    )
    attention_flops = 2 * 2 * config.n_heads * config.head_dim * hidden / context  # QK^T and AV of each hidden key
    assert full.forward_flops_per_token - report.forward_flops_per_token == pytest.approx(attention_flops, abs=1)
    assert ("windowed layers" in str(report)) and f"KV cache bytes / token @ {context} (fp32)" in str(report)


def test_info_takes_the_window_fields_from_the_command_line():
    import subprocess
    import sys

    argv = ["info", "--config", "tiny", "--set", "model.window=32", "--set", "model.window_pattern=SL"]
    run = subprocess.run([sys.executable, "-m", "minigrok.cli", *argv], capture_output=True, text=True, check=True)
    # tiny: 2 layers, 2 KV heads of 16 channels; at its max_seq_len of 128 the S layer holds 32 tokens.
    assert "window: 32" in run.stdout and "windowed layers" in run.stdout
    assert re.search(r"KV cache bytes / token @ 128 \(fp32\) +320\n", run.stdout)  # (1 + 32/128) * 2 * 2 * 16 * 4
    bad = subprocess.run(
        [sys.executable, "-m", "minigrok.cli", *argv[:3], "--set", "model.window=0"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "window=0 must be a positive integer" in bad.stderr


def test_windowed_attention_between_conv_layers_decodes_as_the_full_forward_and_speculates_exactly():
    """layer_pattern CA, window 5, window_pattern SSSL: layers C, windowed A, C, full A, so one cache holds conv
    input rings, key rings and full keys. Decoding far past the window gives each row's full forward; greedy
    speculative decoding (a round goes on by k + 1 tokens, then rolls back both kinds of ring) the target's tokens."""
    target = make_model(9, layer_pattern="CA", window=5, window_pattern="SSSL")
    cache = check_ragged_decoding(target, [12, 2, 7], extra=20, seed=9, max_len=64)
    assert [len(cache.conv_inputs), len(cache.ring_keys), len(cache.keys)] == [2, 1, 1]
    draft = make_model(10, n_layers=2, layer_pattern="CA", window=3)
    prompts = random_ids([10, 2, 5], 103, seed=9)
    with torch.no_grad():
        alone = target.generate_batch(prompts, 20, temperature=0)
        for k in (1, 3):
            assert target.generate_batch(prompts, 20, temperature=0, draft_model=draft, num_draft_tokens=k) == alone


def test_the_report_counts_kv_bytes_of_attention_layers_alone_beside_conv_layers():
    config = make_model(11, n_layers=6, layer_pattern="CA", window=5, window_pattern="SSSL").config
    report = MiniGrok.report(MiniGrok(config), 40)
    cache = KVCache(config, 1, 40, torch.float32, torch.device("cpu"))
    held = sum(t.numel() * t.element_size() for t in (cache.keys, cache.values, cache.ring_keys, cache.ring_values))
    assert report.kv_cache_bytes_per_token["fp32"] == round(held / 40)
    assert report.windowed_layers == 2 and "windowed layers" in str(report)  # layers 1 and 5; 3 is full
    assert report.conv_state_bytes["fp32"] == 3 * (config.conv_kernel_size - 1) * config.dim * 4
