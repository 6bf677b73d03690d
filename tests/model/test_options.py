"""Architecture options qk_norm, mlp=relu2, zero_init_proj and embed_dim against a float64 re-implementation of the
forward, through the KV cache, in the report and in config validation."""

import math

import pytest
import torch
import torch.nn.functional as F

from minigrok import KVCache, MiniGrok, ModelConfig
from minigrok.cli import main
from minigrok.config import ConfigError
from minigrok.moe import MoE

BASE = dict(vocab_size=97, dim=48, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=80, max_seq_len=64)


def small_config(**overrides) -> ModelConfig:
    return ModelConfig(**(BASE | overrides))


def random_ids(config: ModelConfig, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def built(config: ModelConfig, seed: int = 0) -> MiniGrok:
    """A model of `config` in eval mode with every norm gain moved off 1.0, so that each gain's use is tested."""
    torch.manual_seed(seed)
    model = MiniGrok(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.uniform_(0.5, 1.5)
    return model


def rms(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    return gain * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def reference_logits(config: ModelConfig, state: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """The logits of an attention-only model, written out plainly in float64 from its state dict."""
    s = {name: tensor.double() for name, tensor in state.items()}
    heads, kv_heads, head_dim, eps = config.n_heads, config.n_kv_heads, config.head_dim, config.norm_eps
    length = ids.shape[1]
    angles = torch.arange(length, dtype=torch.float64)[:, None] * config.rope_theta ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    )

    def rope(t):  # [B, heads, T, head_dim], the halves rotated together
        first, second = t[..., : head_dim // 2], t[..., head_dim // 2 :]
        return torch.cat(
            [first * angles.cos() - second * angles.sin(), second * angles.cos() + first * angles.sin()], -1
        )

    x = s["embed.weight"][ids]
    if config.embed_dim:
        x = x @ s["embed_proj.weight"].T
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for block in config.layer_blocks():
        w = {name.removeprefix(f"blocks.{block}."): t for name, t in s.items() if name.startswith(f"blocks.{block}.")}
        h = rms(x, w["attn_norm.weight"], eps)
        q, k, v = (h @ w["attn.qkv_proj.weight"].T).split(
            [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1
        )
        q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in (q, k, v))
        if config.qk_norm:
            q, k = rms(q, w["attn.q_norm.weight"], eps), rms(k, w["attn.k_norm.weight"], eps)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = rope(q), rope(k)
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).masked_fill(~causal, float("-inf"))
        x = x + (scores.softmax(-1) @ v).transpose(1, 2).flatten(2) @ w["attn.o_proj.weight"].T
        h = rms(x, w["mlp_norm.weight"], eps)
        if config.mlp == "relu2":
            hidden = torch.relu(h @ w["mlp.up_proj.weight"].T) ** 2
        else:
            gate, up = (h @ w["mlp.gate_up_proj.weight"].T).chunk(2, -1)
            hidden = F.silu(gate) * up
        x = x + hidden @ w["mlp.down_proj.weight"].T
    x = rms(x, s["norm.weight"], eps)
    if config.embed_dim:
        x = x @ s["head_proj.weight"].T
    return x @ s.get("lm_head.weight", s["embed.weight"]).T


OPTIONS = [
    dict(qk_norm=True),
    dict(mlp="relu2"),
    dict(embed_dim=16),
    dict(embed_dim=20, tie_embeddings=False),
    dict(qk_norm=True, mlp="relu2", embed_dim=24, n_kv_heads=1, share="cycle", n_unique_layers=2, head_dim=10),
]


@pytest.mark.parametrize("overrides", OPTIONS)
def test_forward_and_loss_match_a_float64_reference(overrides):
    config = small_config(**overrides)
    model = built(config)
    ids = random_ids(config, 2, 19)
    expected = reference_logits(config, model.state_dict(), ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.double(), expected, rtol=1e-4, atol=1e-5)
        targets = ids.roll(-1, dims=1)
        loss = model(ids, targets=targets).loss  # the fused head + cross-entropy on the embed_dim-wide hidden states
    torch.testing.assert_close(
        loss.double(), F.cross_entropy(expected.flatten(0, 1), targets.flatten()), rtol=1e-5, atol=1e-6
    )


def test_qk_norm_normalises_each_head_before_rope():
    """q and k come out of project() with each head's RMS (before rotation, which keeps it) equal to its gain's."""
    config = small_config(qk_norm=True)
    attention = built(config).blocks[0].attn
    with torch.no_grad():
        attention.q_norm.weight.fill_(1.0)
        attention.k_norm.weight.fill_(2.0)
        x = 5 * torch.randn(2, 7, config.dim, dtype=torch.float32)
        positions = torch.arange(7)
        from minigrok import functional

        q, k, _ = attention.project(x, *functional.rope_cos_sin(positions, config.head_dim))
    torch.testing.assert_close(q.pow(2).mean(-1), torch.ones(2, 4, 7), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k.pow(2).mean(-1), torch.full((2, 2, 7), 4.0), rtol=1e-4, atol=1e-4)


def test_relu2_mlp_is_down_of_relu_up_squared():
    config = small_config(mlp="relu2")
    mlp = built(config).blocks[0].mlp
    assert not hasattr(mlp, "gate_up_proj")
    x = torch.randn(3, 5, config.dim, dtype=torch.float64)
    w1, w2 = mlp.up_proj.weight.double(), mlp.down_proj.weight.double()
    torch.testing.assert_close(mlp.double()(x), torch.relu(x @ w1.T).square() @ w2.T)


def test_relu2_experts_are_relu2_mlps():
    """Each token's MoE output is its top-k router weights times the ReLU² experts, plus the shared ReLU² MLP."""
    config = small_config(mlp="relu2", n_experts=4, experts_per_token=2, moe_shared_expert=True, moe_ffn_dim=40)
    moe = built(config).blocks[0].mlp.double()
    assert isinstance(moe, MoE) and moe.up_proj.shape == (4, 40, config.dim)
    x = torch.randn(2, 6, config.dim, dtype=torch.float64)
    flat = x.reshape(-1, config.dim)
    weights, chosen = (flat @ moe.router.weight.T).softmax(-1).topk(2, dim=-1)
    expected = torch.stack(
        [
            sum(
                weight * (torch.relu(moe.up_proj[e] @ token).square() @ moe.down_proj[e].T)
                for weight, e in zip(row_weights, row_experts, strict=True)
            )
            for token, row_weights, row_experts in zip(flat, weights, chosen, strict=True)
        ]
    )
    shared = moe.shared
    expected = expected + torch.relu(flat @ shared.up_proj.weight.T).square() @ shared.down_proj.weight.T
    torch.testing.assert_close(moe(x), expected.view_as(x))


@pytest.mark.parametrize("dim", [48, 64, 100, 384, 1000])
def test_relu2_default_width_matches_swiglu_parameters(dim):
    """Two matrices at 4 * dim against SwiGLU's three at 8/3 * dim, both rounded up to a multiple of 64."""
    swiglu, relu2 = (ModelConfig(vocab_size=8, dim=dim, n_layers=1, n_heads=2, mlp=mlp) for mlp in ("swiglu", "relu2"))
    assert relu2.ffn_dim == 64 * math.ceil(4 * dim / 64) and relu2.ffn_dim % 64 == 0
    assert swiglu.ffn_dim == 64 * math.ceil(8 * dim / 3 / 64)
    assert abs(2 * relu2.ffn_dim - 3 * swiglu.ffn_dim) * dim <= 3 * 64 * dim  # within one rounding step
    assert ModelConfig(vocab_size=8, dim=dim, n_layers=1, n_heads=2, mlp="relu2", ffn_dim=96).ffn_dim == 96


CACHED = [
    dict(qk_norm=True, embed_dim=16),
    dict(qk_norm=True, embed_dim=16, n_kv_heads=1, mlp="relu2", window=4, window_pattern="SL", share="immediate"),
    dict(qk_norm=True, embed_dim=24, tie_embeddings=False, layer_pattern="CA"),
]


@pytest.mark.parametrize("overrides", CACHED)
def test_kv_cache_decoding_matches_full_forward(overrides):
    """Keys are cached after their norm and rotation: a prefill then single steps give the full forward's logits."""
    config = small_config(**overrides)
    model = built(config, seed=1)
    ids = random_ids(config, 2, 23, seed=1)
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(config, batch_size=2, max_len=23, dtype=torch.float32, device=torch.device("cpu"))
        pieces = [model(ids[:, :9], cache=cache).logits]
        pieces += [model(ids[:, t : t + 1], cache=cache).logits for t in range(9, 23)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [*OPTIONS, *CACHED, dict(zero_init_proj=True, logit_softcap=15.0)])
def test_the_options_train_and_decode_in_bfloat16_autocast_as_the_trainer_runs_them(overrides):
    """Under bf16 autocast (train.dtype=bf16 on a CPU) the loss, its gradients and a cached decode run and stay near
    float32's; qk_norm once promoted q and k past v's dtype there, which attention refused."""
    from minigrok.machine import autocast

    config = small_config(**overrides)
    model = built(config, seed=3).train()
    ids = random_ids(config, 2, 21, seed=3)
    exact = model(ids, targets=ids.roll(-1, dims=1)).loss
    with autocast("bf16", torch.device("cpu")):
        loss = model(ids, targets=ids.roll(-1, dims=1)).loss
        loss.backward()
        model.eval().generate(ids[:, :6], max_new_tokens=8, temperature=0)
    torch.testing.assert_close(loss.float(), exact, rtol=3e-2, atol=0.0)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("overrides", CACHED[:2])
def test_greedy_generation_equals_argmax_of_full_forward(overrides):
    model = built(small_config(**overrides), seed=2)
    prompt = random_ids(model.config, 2, 5, seed=2)
    out = model.generate(prompt, max_new_tokens=10, temperature=0)
    expected = prompt
    with torch.no_grad():
        for _ in range(10):
            expected = torch.cat([expected, model(expected).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


RESIDUAL_OUTPUTS = ("o_proj.weight", "out_proj.weight", "down_proj.weight", "down_proj")


def test_zero_init_zeroes_every_residual_projection_and_the_model_still_trains():
    config = small_config(
        zero_init_proj=True, layer_pattern="CA", n_experts=4, moe_layers="DM", moe_shared_expert=True, mlp="relu2"
    )
    torch.manual_seed(3)
    model = MiniGrok(config)
    zeroed = {name: p for name, p in model.named_parameters() if name.endswith(RESIDUAL_OUTPUTS)}
    suffixes = {name.split(".", 2)[2] for name in zeroed}
    expected = {"conv.out_proj.weight", "attn.o_proj.weight", "mlp.down_proj.weight", "mlp.down_proj"}
    assert suffixes == expected | {"mlp.shared.down_proj.weight"}
    assert all(torch.count_nonzero(p) == 0 for p in zeroed.values())
    assert all(torch.count_nonzero(p) > 0 for name, p in model.named_parameters() if name not in zeroed)
    ids = random_ids(config, 4, 24, seed=3)
    targets = ids.roll(-1, dims=1)
    model(ids, targets=targets).loss.backward()
    for name, p in zeroed.items():  # each block starts as the identity, yet its output projection learns at once
        assert p.grad is not None and p.grad.abs().max() > 0, name
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = model(ids, targets=targets).loss
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert losses[-1] < losses[0] - 0.5
    assert all(p.grad.abs().max() > 0 for p in model.parameters())  # every weight gets a gradient once training
    assert all(torch.count_nonzero(p) > 0 for p in zeroed.values())


def test_residual_projections_are_random_by_default():
    model = MiniGrok(small_config(layer_pattern="CA"))
    assert all(p.std() > 0 for name, p in model.named_parameters() if name.endswith(RESIDUAL_OUTPUTS))


@pytest.mark.parametrize("tied", [True, False])
def test_report_counts_the_factorised_embedding_and_its_saving(tied):
    factorised_config = small_config(embed_dim=16, tie_embeddings=tied, qk_norm=True)
    factorised, full = MiniGrok(factorised_config), MiniGrok(small_config(tie_embeddings=tied, qk_norm=True))
    report, full_report = factorised.report(), full.report()
    count = sum(p.numel() for p in factorised.parameters())
    assert report.unique_params == report.total_params == count
    assert report.embedding_saving == sum(p.numel() for p in full.parameters()) - count > 0
    heads = 1 if tied else 2
    assert report.embedding_saving == heads * 97 * (48 - 16) - 2 * 48 * 16
    assert full_report.embedding_saving is None
    # The head multiplies 16-wide rows; the two projections multiply every token too.
    assert full_report.forward_flops_per_token - report.forward_flops_per_token == 2 * (97 * 32 - 2 * 48 * 16)
    assert report.non_embedding_params == full_report.non_embedding_params + 2 * 48 * 16
    assert "parameters saved by embed_dim" in str(report) and "embed_dim" not in str(full_report)


def test_report_counts_qk_norm_and_relu2_parameters():
    for overrides in (dict(qk_norm=True), dict(mlp="relu2"), dict(mlp="relu2", n_experts=4, moe_shared_expert=True)):
        model = MiniGrok(small_config(**overrides))
        assert model.report().unique_params == sum(p.numel() for p in model.parameters()), overrides
    plain, normed = MiniGrok(small_config()).report(), MiniGrok(small_config(qk_norm=True)).report()
    assert normed.unique_params - plain.unique_params == 4 * 2 * 12  # two head_dim gains per block
    assert normed.forward_flops_per_token == plain.forward_flops_per_token  # norms multiply nothing
    moe = MiniGrok(small_config(mlp="relu2", n_experts=4, experts_per_token=1)).report()
    experts = 4 * 4 * 2 * 48 * 80  # up and down of 4 experts, at each of 4 blocks
    assert moe.total_params - moe.active_params == experts * 3 // 4


def test_info_shows_the_options(capsys):
    args = ["info", "--config", "tiny", "--set", "qk_norm=true", "--set", "mlp=relu2", "--set", "zero_init_proj=true"]
    assert main([*args, "--set", "embed_dim=32"]) == 0
    out = capsys.readouterr().out
    assert "options" in out and "qk_norm, mlp=relu2, zero_init_proj, embed_dim=32" in out
    saving = 512 * (64 - 32) - 2 * 64 * 32
    assert f"parameters saved by embed_dim  {saving:,}" in out
    assert main(["info", "--config", "tiny"]) == 0
    assert "options" not in capsys.readouterr().out.split("embed_dim: None")[1]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(embed_dim=48), "embed_dim=48 must be below dim=48"),
        (dict(embed_dim=0), "embed_dim=0 must be a positive integer"),
        (dict(embed_dim=8.5), "embed_dim=8.5 must be a positive integer"),
        (dict(mlp="gelu"), "mlp='gelu' is unknown: choose one of"),
        (dict(qk_norm="yes"), "qk_norm='yes' must be true or false"),
        (dict(zero_init_proj=1), "zero_init_proj=1 must be true or false"),
    ],
)
def test_bad_option_values_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        small_config(**overrides)


def test_a_factorised_model_quantises_with_its_projections_and_reloads(tmp_path):
    """int8 packs embed_proj and head_proj like every projection; the reloaded model gives the same logits."""
    from minigrok.quantize import load_quantized, quantize_model, save_quantized

    config = small_config(embed_dim=32, qk_norm=True, mlp="relu2")
    model = built(config)
    ids = random_ids(config, 2, 11)
    with torch.no_grad():
        expected = model(ids).logits
    quantize_model(model, bits=8, include_embedding=True)
    assert {"embed.weight", "embed_proj.weight", "head_proj.weight"} <= set(model.quantization.tensors)
    assert model.report().schemes["int8 + embedding"].disk_bytes == sum(
        t.numel() * t.element_size() for t in model.state_dict().values()
    )
    save_quantized(model, tmp_path)
    with torch.no_grad():
        quantized = model(ids).logits
        torch.testing.assert_close(load_quantized(tmp_path)(ids).logits, quantized)
    assert (quantized - expected).abs().max() < 0.05 * expected.abs().max()
