"""Gated short-convolution layers (layer_pattern C): the mixer against a float64 loop, decoding against the full
forward, batching, sharing, speculative decoding, the serve engine, save/load, the report and the HF refusal."""

import dataclasses

import pytest
import torch
from test_generate import check_ragged_decoding, greedy_alone, random_prompts

from minigrok import MiniGrok, ModelConfig
from minigrok.config import ConfigError
from minigrok.conv import ShortConv
from minigrok.hf import export_hf


def make_model(seed: int = 0, **overrides) -> MiniGrok:
    values = dict(vocab_size=101, dim=48, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=80, max_seq_len=96)
    values |= dict(layer_pattern="CCA", tie_embeddings=False, backend="torch")
    torch.manual_seed(seed)
    return MiniGrok(ModelConfig(**(values | overrides))).eval()


def reference_conv(module: ShortConv, x: torch.Tensor) -> torch.Tensor:
    """y = out(c * conv(b * x)) in float64, the causal depthwise convolution as an explicit loop over taps."""
    weight = module.weight.double()[:, 0]  # [dim, k]
    b, c, h = (x.double() @ module.in_proj.weight.double().T).chunk(3, dim=-1)
    u = b * h
    k, length = weight.shape[1], x.shape[1]
    mixed = torch.zeros_like(u)
    for t in range(length):
        for tap in range(k):  # tap k - 1 multiplies the current input, tap 0 the one k - 1 steps back
            source = t - (k - 1 - tap)
            if source >= 0:
                mixed[:, t] += weight[:, tap] * u[:, source]
    return (c * mixed) @ module.out_proj.weight.double().T


@pytest.mark.parametrize("kernel_size", [2, 3, 4, 8])
def test_short_conv_matches_a_float64_loop_with_its_gradients(kernel_size):
    config = ModelConfig(vocab_size=11, dim=24, n_layers=1, n_heads=2, layer_pattern="C", conv_kernel_size=kernel_size)
    torch.manual_seed(kernel_size)
    module = MiniGrok(config).blocks[0].conv  # initialised as the model initialises it
    x = torch.randn(3, 13, 24, requires_grad=True)
    out = module(x)
    expected = reference_conv(module, x)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    cotangent = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, module.weight, module.in_proj.weight], cotangent)
    reference = torch.autograd.grad(expected, [x, module.weight, module.in_proj.weight], cotangent.double())
    for grad, ref in zip(grads, reference, strict=True):
        torch.testing.assert_close(grad.double(), ref.double(), rtol=1e-5, atol=1e-6)


def test_a_token_never_sees_later_ones_nor_more_than_k_back():
    model = make_model(1, layer_pattern="C", n_layers=1, conv_kernel_size=3)
    conv = model.blocks[0].conv
    x = torch.randn(1, 10, 48)
    changed = x.clone()
    changed[0, 5] += 1.0
    moved = (conv(changed) - conv(x)).abs().amax(dim=-1)[0]
    assert moved[:5].max() == 0 and moved[5:8].min() > 0 and moved[8:].max() == 0


@pytest.mark.parametrize("kernel_size", [2, 3, 4])
@pytest.mark.parametrize(
    "pattern, share, n_layers", [("CCA", "none", 3), ("CA", "none", 4), ("C", "none", 2), ("CA", "cycle", 4)]
)
def test_decoding_step_by_step_equals_the_full_forward(kernel_size, pattern, share, n_layers):
    """Ragged right-padded prompts prefilled, then each row fed its own tokens one at a time: every row's logits
    are the full forward's of that row alone (GQA 4:2; with share cycle two blocks, one C and one A)."""
    model = make_model(kernel_size, layer_pattern=pattern, share=share, n_layers=n_layers, conv_kernel_size=kernel_size)
    cache = check_ragged_decoding(model, [3, 14, 1, 8], extra=6, seed=kernel_size)
    kinds = model.config.layer_kinds()
    assert cache.keys.shape[0] == kinds.count("A")
    # The conv state is a ring of k - 1 positions (+ 1 of rollback, + 1 for discarded writes), not max_len = 32.
    assert cache.conv_inputs.shape == (kinds.count("C"), 4, kernel_size + 1, 48)


def test_ragged_batch_generates_what_each_prompt_gives_alone():
    model = make_model(2, n_layers=6, share="cycle", n_unique_layers=3)
    prompts = random_prompts([5, 1, 17, 9], 101, seed=3)
    budgets = [7, 12, 3, 9]
    assert model.generate_batch(prompts, budgets, temperature=0) == greedy_alone(model, prompts, budgets)
    sampled = model.generate_batch(prompts, 8, temperature=0.8, top_k=20, seed=5)
    assert sampled[2] == model.generate_batch([prompts[2]], 8, temperature=0.8, top_k=20, seed=7)[0]


def test_a_pattern_that_splits_a_shared_block_is_refused():
    base = dict(vocab_size=11, dim=16, n_layers=6, n_heads=2)
    assert ModelConfig(**base, layer_pattern="CCA", share="cycle", n_unique_layers=3).block_kinds() == "CCA"
    assert ModelConfig(**base, layer_pattern="CCA", share="cycle", n_unique_layers=6).block_kinds() == "CCACCA"
    assert ModelConfig(**base, layer_pattern="CCCCAA", share="immediate").block_kinds() == "CCA"
    assert ModelConfig(**base, layer_pattern="C", share="all").block_kinds() == "C"
    with pytest.raises(ConfigError, match=r"share='immediate' runs block 1 at layers 2 and 3 as both"):
        ModelConfig(**base, layer_pattern="CCA", share="immediate")
    with pytest.raises(ConfigError, match="share='all' runs block 0"):
        ModelConfig(**base, layer_pattern="CA", share="all")
    with pytest.raises(ConfigError, match="share='cycle' runs block 0"):
        ModelConfig(**base, layer_pattern="CCA", share="cycle", n_unique_layers=2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"layer_pattern": "CXA"}, "layer_pattern='CXA' must be a string of the letters A, C"),
        ({"layer_pattern": ""}, "layer_pattern='' must be a string"),
        ({"layer_pattern": "cca"}, "layer_pattern='cca' must be a string"),
        ({"layer_pattern": 3}, "layer_pattern=3 must be a string"),
        ({"layer_pattern": "CCACA"}, "layer_pattern='CCACA' is longer than n_layers=4"),
        ({"conv_kernel_size": 1}, "conv_kernel_size=1 must be an integer from 2 to 8"),
        ({"conv_kernel_size": 9}, "conv_kernel_size=9 must be an integer from 2 to 8"),
        ({"conv_kernel_size": 3.0}, "conv_kernel_size=3.0 must be an integer"),
    ],
)
def test_bad_pattern_or_kernel_size_names_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        ModelConfig(vocab_size=11, dim=16, n_layers=4, n_heads=2, **overrides)


def test_compiled_decode_matches_eager_and_compiles_once():
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = make_model(6)
    prompt = torch.tensor(random_prompts([9], 101, seed=6))
    torch._dynamo.reset()
    counters.clear()
    eager = model.generate(prompt, 12, temperature=0)
    assert torch.equal(model.generate(prompt, 12, temperature=0, compile=True), eager)
    # Positions advance and a new cache of the same rounded length comes: neither recompiles.
    with torch._dynamo.config.patch(error_on_recompile=True):
        longer = random_prompts([13], 101, seed=7)
        compiled = model.generate_batch(longer, 10, temperature=0, compile=True)
    assert counters["stats"]["unique_graphs"] == 1
    assert compiled == model.generate_batch(longer, 10, temperature=0)


def test_save_load_round_trip_and_the_checked_shapes(tmp_path):
    model = make_model(4, n_layers=6, share="cycle", n_unique_layers=3, conv_kernel_size=4)
    model.save_pretrained(tmp_path / "m")
    loaded = MiniGrok.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    ids = torch.tensor(random_prompts([11], 101, seed=4))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded.blocks[0].conv.weight.shape == (48, 1, 4) and loaded.blocks[2].attn is not None


@pytest.mark.parametrize("share", ["none", "cycle"])
def test_report_counts_conv_layers(share):
    model = make_model(0, n_layers=6, share=share, n_unique_layers=None if share == "none" else 3)
    config, report = model.config, model.report(context=64)
    assert report.unique_params == sum(p.numel() for p in model.parameters())
    dim, k = config.dim, config.conv_kernel_size
    conv_block = 3 * dim * dim + dim * k + dim * dim + 2 * dim + 3 * dim * config.ffn_dim
    attention_block = sum(p.numel() for p in model.blocks[2].parameters())
    assert report.total_params == 2 * config.vocab_size * dim + dim + 4 * conv_block + 2 * attention_block
    matmul = 4 * (4 * dim * dim + 3 * dim * config.ffn_dim) + 2 * (
        (config.n_heads + 2 * config.n_kv_heads) * config.head_dim * dim + dim * dim + 3 * dim * config.ffn_dim
    )
    attention = 2 * 2 * 2 * 64 * config.n_heads * config.head_dim // 2
    assert report.forward_flops_per_token == 2 * (matmul + config.vocab_size * dim) + attention + 2 * 4 * k * dim
    assert report.kv_cache_bytes_per_token["fp32"] == 4 * 2 * 2 * config.n_kv_heads * config.head_dim  # 2 A layers
    assert report.conv_state_bytes["bf16"] == 2 * 4 * (k - 1) * dim  # 4 C layers, k - 1 inputs each
    assert "conv state bytes / sequence (bf16)" in str(report)


def test_hf_export_is_refused_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match="layer_pattern='CCA' has convolution"):
        export_hf(make_model(0), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_speculative_greedy_tokens_are_the_targets_alone():
    """A conv/attention target with a shallower draft: the caches roll back by lengths, conv inputs included."""
    target = make_model(7, n_layers=6, init_std=0.05)
    draft = MiniGrok(dataclasses.replace(target.config, n_layers=3, n_unique_layers=None, layer_pattern="CA")).eval()
    prompts = random_prompts([1, 7, 12], 101, seed=8)
    for k in (1, 3, 5):
        got = target.generate_batch(prompts, [9, 15, 4], temperature=0, draft_model=draft, num_draft_tokens=k)
        assert got == target.generate_batch(prompts, [9, 15, 4], temperature=0)


def test_serve_engine_rows_give_what_each_prompt_gives_alone():
    """Prompts joining a running batch at different steps, rows moved into freed ones: each equals generate alone."""
    from minigrok.generate import RowSampling
    from minigrok.serve.engine import Engine
    from minigrok.train.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    model = make_model(9, vocab_size=tokenizer.vocab_size, init_std=0.05)
    engine = Engine(model, tokenizer, max_batch=2, max_queue=8)
    prompts, budgets = [list(b"def f(x):"), list(b"ret"), list(b"class Name:\n    pass")], [9, 3, 7]
    outputs: dict[int, list] = {}
    for key, (prompt, budget) in enumerate(zip(prompts, budgets, strict=True)):
        emit = lambda output, key=key: outputs.setdefault(key, []).append(output)  # noqa: E731
        engine.submit([prompt], RowSampling(budget, temperature=0), emit)
        engine.step()
    while engine.rows or engine.waiting:
        engine.step()
    for key, (budget, expected) in enumerate(zip(budgets, greedy_alone(model, prompts, budgets), strict=True)):
        assert "".join(output.text for output in outputs[key]) == tokenizer.decode([t for t in expected if t < 256])
        assert outputs[key][-1].tokens == budget


def test_int8_quantised_conv_model_saves_loads_and_stays_close(tmp_path):
    from minigrok.quantize import load_quantized, quantize_model, save_quantized

    model = make_model(10)
    ids = torch.tensor(random_prompts([12], 101, seed=10))
    expected = model(ids).logits
    quantized = quantize_model(model, bits=8)
    assert quantized.blocks[0].conv.in_proj.__class__.__name__ != "Linear"  # the conv's projections are packed
    save_quantized(quantized, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q").eval()
    torch.testing.assert_close(loaded(ids).logits, quantized(ids).logits, rtol=0, atol=0)
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0.02)


def test_train_generate_and_export_through_the_cli(tmp_path, capsys):
    """A C/A model trained a few steps by `minigrok train`, sampled by `minigrok generate`, refused by export-hf."""
    from minigrok.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("".join(f"def f_{n}(x):\n    return x * {n}\n\n" for n in range(300)))
    run = tmp_path / "run"
    args = ["train", "--config", "tiny", "--data", str(corpus), "--tokenizer", "byte", "--out", str(run)]
    overrides = ["model.layer_pattern=CA", "model.conv_kernel_size=4", "train.max_steps=6", "train.dtype=fp32"]
    assert main(args + [flag for o in overrides for flag in ("--set", o)] + ["--samples", "0"]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "def f", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["export-hf", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 2
    assert "layer_pattern='CA' has convolution (C) layers" in capsys.readouterr().err
