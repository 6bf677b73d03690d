"""The decoder: causality, KV-cache decoding, shared layers, generation and input errors."""

import pytest
import torch

from minigrok import KVCache, MiniGrok, ModelConfig


def small_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=97, dim=48, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=80, max_seq_len=64) | overrides
    return ModelConfig(**values)


def random_ids(config: ModelConfig, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_future_tokens_never_change_earlier_logits(n_kv_heads):
    torch.manual_seed(0)
    config = small_config(n_kv_heads=n_kv_heads)
    model = MiniGrok(config).eval()
    ids = random_ids(config, 2, 20)
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % config.vocab_size
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


@pytest.mark.parametrize("share", ["none", "immediate"])
@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_kv_cache_decoding_matches_full_forward(share, n_kv_heads):
    torch.manual_seed(1)
    config = small_config(n_kv_heads=n_kv_heads, share=share)
    model = MiniGrok(config).eval()
    ids = random_ids(config, 2, 23, seed=1)
    full = model(ids).logits
    cache = KVCache(config, batch_size=2, max_len=23, dtype=torch.float32, device=torch.device("cpu"))
    pieces = [model(ids[:, :9], cache=cache).logits]  # a prefill, then one token at a time
    pieces += [model(ids[:, t : t + 1], cache=cache).logits for t in range(9, 23)]
    assert cache.lengths.tolist() == [23, 23]
    assert cache.keys.shape[2] == n_kv_heads  # the cache holds only the key/value heads
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "share,n_unique,layer_blocks",
    [
        ("none", 6, [0, 1, 2, 3, 4, 5]),
        ("all", 1, [0, 0, 0, 0, 0, 0]),
        ("immediate", 3, [0, 0, 1, 1, 2, 2]),
        ("cycle", 2, [0, 1, 0, 1, 0, 1]),
    ],
)
def test_shared_layers_count_unique_parameters(share, n_unique, layer_blocks):
    config = small_config(
        n_layers=6, share=share, n_unique_layers=n_unique if share in ("immediate", "cycle") else None
    )
    model = MiniGrok(config)
    assert model.layer_blocks == layer_blocks and len(model.blocks) == n_unique
    block = sum(p.numel() for p in model.blocks[0].parameters())
    outside = config.vocab_size * config.dim + config.dim  # tied embedding/head and the final norm
    report = model.report()
    assert sum(p.numel() for p in model.parameters()) == report.unique_params == n_unique * block + outside
    assert report.total_params == 6 * block + outside


@pytest.mark.parametrize("share", ["all", "immediate", "cycle"])
def test_shared_block_gradient_is_the_sum_over_its_positions(share):
    """Unroll the shared model into an unshared copy; a shared block's gradient is the sum of its copies' gradients."""
    torch.manual_seed(2)
    shared = MiniGrok(small_config(share=share))
    unrolled = MiniGrok(small_config())
    unrolled.load_state_dict(
        {name: tensor for name, tensor in shared.state_dict().items() if not name.startswith("blocks.")}, strict=False
    )
    for layer, block in enumerate(shared.layer_blocks):
        unrolled.blocks[layer].load_state_dict(shared.blocks[block].state_dict())
    ids = random_ids(shared.config, 2, 16, seed=2)
    shared(ids, targets=ids).loss.backward()
    unrolled(ids, targets=ids).loss.backward()
    for block_index, block in enumerate(shared.blocks):
        positions = [layer for layer, b in enumerate(shared.layer_blocks) if b == block_index]
        assert len(positions) > 1
        for name, param in block.named_parameters():
            expected = sum(dict(unrolled.blocks[p].named_parameters())[name].grad for p in positions)
            torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-7)


def test_loss_is_mean_token_cross_entropy_with_ignore_index():
    torch.manual_seed(3)
    model = MiniGrok(small_config())
    ids = random_ids(model.config, 2, 10, seed=3)
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    out = model(ids, targets=targets)
    logits = model(ids).logits.double()
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert abs(out.loss.item() - expected.item()) < 1e-5
    with pytest.raises(AttributeError, match="not materialised when targets are given"):
        _ = out.logits
    with pytest.raises(ValueError, match="must have the shape of input_ids"):
        model(ids, targets=targets[:, :5])


def test_untied_head_and_residual_init_scale():
    model = MiniGrok(small_config(tie_embeddings=False, n_layers=8, init_std=0.02))
    assert model.lm_head is not None and model.lm_head.weight is not model.embed.weight
    assert model.report().non_embedding_params == sum(p.numel() for p in model.blocks.parameters()) + 48
    o_proj_std = model.blocks[0].attn.o_proj.weight.std().item()
    assert 0.02 / 4 * 0.8 < o_proj_std < 0.02 / 4 * 1.2  # 0.02 / sqrt(2 * 8)


def test_generate_greedy_equals_argmax_of_full_forward():
    torch.manual_seed(4)
    model = MiniGrok(small_config()).eval()
    prompt = random_ids(model.config, 2, 5, seed=4)
    out = model.generate(prompt, max_new_tokens=8, temperature=0)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], prompt)
    expected = prompt
    for _ in range(8):
        expected = torch.cat([expected, model(expected).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


def test_generate_sampling_is_reproducible_and_respects_top_k():
    torch.manual_seed(5)
    model = MiniGrok(small_config()).eval()
    prompt = random_ids(model.config, 3, 4, seed=5)
    a = model.generate(prompt, 12, temperature=1.5, top_k=3, seed=11)
    b = model.generate(prompt, 12, temperature=1.5, top_k=3, seed=11)
    c = model.generate(prompt, 12, temperature=1.5, top_k=3, seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Every sampled token is among the 3 most likely at its step.
    logits = model(a[:, :-1]).logits[:, 3:]
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == a[:, 4:, None]).any(-1).all()


def test_top_p_keeps_only_the_nucleus():
    from minigrok.generate import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    tokens = sample_next(logits, 1.0, None, 0.7, torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1}  # 0.5 alone is below 0.7; 0.5 + 0.3 reaches it


def test_generate_stops_at_stop_tokens_and_streams():
    torch.manual_seed(6)
    model = MiniGrok(small_config()).eval()
    prompt = random_ids(model.config, 1, 4, seed=6)
    free = model.generate(prompt, 10, temperature=0)
    stop = free[0, 6].item()  # the third generated token
    first_stop = (free[0, 4:] == stop).nonzero()[0].item()
    stopped = model.generate(prompt, 10, temperature=0, stop_tokens=[stop])
    assert torch.equal(stopped, free[:, : 4 + first_stop + 1])
    streamed = [t.item() for t in model.generate_stream(prompt, 10, temperature=0)]
    assert streamed == free[0, 4:].tolist()


def test_forward_reads_ids_back_only_where_that_is_free(monkeypatch):
    """On a GPU the forward pass must not wait on the device to check ids; generate() still checks each prompt."""
    import minigrok.model

    model = MiniGrok(small_config())
    monkeypatch.setattr(minigrok.model, "reading_back_is_free", lambda t: False)
    with pytest.raises(IndexError):  # the embedding's own error: no value check ran first
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 97\)"):
        model.generate(torch.tensor([[1, 97]]), 2)


def test_input_errors_name_the_problem():
    model = MiniGrok(small_config())
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 97\)"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens to at most 4"):
        model.generate(torch.ones(1, 60, dtype=torch.long), max_new_tokens=5)
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="top_p"):
        model.generate(torch.ones(1, 2, dtype=torch.long), 2, top_p=1.5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=float("nan")), "temperature=nan must be a finite number"),
        (dict(temperature=float("inf")), "temperature=inf must be a finite number"),
        (dict(top_k=2.5), "top_k=2.5 must be an integer"),
        (dict(max_new_tokens=2.5), "max_new_tokens=2.5 must be an integer"),
        (dict(top_p=float("nan")), "top_p=nan must lie in"),
    ],
)
def test_nonsense_sampling_arguments_are_clear_errors(kwargs, message):
    model = MiniGrok(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match=message):
        model.generate(torch.randint(0, 64, (1, 4)), **(dict(max_new_tokens=3) | kwargs))


def test_empty_batches_float_targets_and_nan_weights_are_clear_errors():
    model = MiniGrok(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2))
    ids = torch.randint(0, 64, (2, 4))
    with pytest.raises(ValueError, match="input_ids has 0 rows"):
        model.generate(ids[:0], max_new_tokens=3)
    with pytest.raises(ValueError, match="targets must be integer token ids"):
        model(ids, targets=ids.float())
    with torch.no_grad():
        model.norm.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="logits are NaN or infinite at generated token 0"):
        model.generate(ids, max_new_tokens=3, temperature=0)  # greedy would emit token 0 forever
