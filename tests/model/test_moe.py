"""The mixture-of-experts MLP against a float64 loop over tokens and experts, and MoE models end to end."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from minigrok import ConfigError, KVCache, MiniGrok, ModelConfig, moe
from minigrok.hf import export_hf
from minigrok.model import parameter_shapes
from minigrok.quantize import quantize_model


def moe_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=97, dim=24, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40, max_seq_len=64)
    return ModelConfig(**(values | dict(n_experts=5, experts_per_token=2, moe_ffn_dim=12) | overrides))


def make_layer(config: ModelConfig, seed: int) -> moe.MoE:
    """The first block's MoE MLP of a fresh model, its weights drawn at a scale where routing is far from uniform."""
    torch.manual_seed(seed)
    layer = MiniGrok(config).blocks[0].mlp
    for param in layer.parameters():
        param.data.normal_(std=0.3)
    return layer


def float64_copy(layer: moe.MoE) -> moe.MoE:
    layer.losses.clear()  # tensors of a graph, which deepcopy refuses
    return copy.deepcopy(layer).double()


def reference(layer: moe.MoE, x: torch.Tensor, capacity: int | None = None):
    """Output, load-balancing and z loss in float64 (of a float64 layer), one token and one chosen expert at a time."""
    router, gate_up, down = layer.router.weight, layer.gate_up_proj, layer.down_proj
    experts, k = gate_up.shape[0], layer.k
    flat = x.double().reshape(-1, x.shape[-1])
    outputs, taken, probs_all, logsumexps = [], [0] * experts, [], []
    for token in flat:
        logits = router @ token
        probs = logits.softmax(dim=0)
        probs_all.append(probs)
        logsumexps.append(logits.logsumexp(dim=0))
        out = torch.zeros_like(token)
        for expert in sorted(range(experts), key=lambda e: -probs[e].item())[:k]:
            taken[expert] += 1
            if capacity is not None and taken[expert] > capacity:
                continue  # past the expert's capacity: dropped
            gate, up = (gate_up[expert] @ token).chunk(2)
            out = out + probs[expert] * (down[expert] @ (F.silu(gate) * up))
        if layer.shared is not None:
            gate, up = (layer.shared.gate_up_proj.weight @ token).chunk(2)
            out = out + layer.shared.down_proj.weight @ (F.silu(gate) * up)
        outputs.append(out)
    fraction = torch.tensor(taken, dtype=torch.float64) / (len(flat) * k)
    balance = experts * (fraction * torch.stack(probs_all).mean(dim=0)).sum()
    return torch.stack(outputs).view(x.shape), balance, torch.stack(logsumexps).square().mean()


def grads_of(layer: moe.MoE, x: torch.Tensor, output: torch.Tensor, upstream: torch.Tensor) -> list[torch.Tensor]:
    return torch.autograd.grad(output, [x, *layer.parameters()], upstream)


@pytest.mark.parametrize(
    "overrides,tokens",
    [
        (dict(experts_per_token=1), (1, 13)),
        (dict(experts_per_token=2), (3, 7)),
        (dict(experts_per_token=2, moe_shared_expert=True), (2, 9)),
        (dict(experts_per_token=3, n_experts=3), (1, 5)),
    ],
)
def test_layer_and_gradients_match_a_float64_loop_over_tokens_and_experts(overrides, tokens):
    layer = make_layer(moe_config(**overrides), seed=sum(tokens))
    x = torch.randn(*tokens, layer.router.in_features, requires_grad=True)
    upstream = torch.randn(*tokens, layer.router.in_features)
    out = layer(x)
    (balance, z_loss) = layer.losses[-1]
    x64, layer64 = x.detach().double().requires_grad_(), float64_copy(layer)
    ref, ref_balance, ref_z = reference(layer64, x64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(balance.double(), ref_balance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_loss.double(), ref_z, rtol=1e-5, atol=1e-6)
    ref_grads = torch.autograd.grad(ref, [x64, *layer64.parameters()], upstream.double())
    for got, want in zip(grads_of(layer, x, out, upstream), ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["grouped", "gather"])
def test_the_grouped_mm_and_gathered_paths_match_the_reference(monkeypatch, how):
    """torch._grouped_mm (the CUDA path) also runs on CPU in fp32 with 16-byte aligned rows: check its math here,
    and that of the gathered weights torch.compile runs."""
    if how == "grouped" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    monkeypatch.setattr(moe, "matmul_kind", lambda x, hidden: how)
    layer = make_layer(moe_config(dim=32, moe_ffn_dim=16, n_heads=4, moe_shared_expert=True), seed=3)
    x = torch.randn(3, 11, 32, requires_grad=True)
    upstream = torch.randn(3, 11, 32)
    out = layer(x)
    x64, layer64 = x.detach().double().requires_grad_(), float64_copy(layer)
    ref = reference(layer64, x64)[0]
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    ref_grads = torch.autograd.grad(ref, [x64, *layer64.parameters()], upstream.double())
    for got, want in zip(grads_of(layer, x, out, upstream), ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_capacity_drops_the_later_tokens_in_training_only(factor):
    layer = make_layer(moe_config(moe_capacity_factor=factor), seed=7)
    x = torch.randn(2, 15, layer.router.in_features)
    capacity = math.ceil(factor * 30 * 2 / 5)
    with torch.no_grad():
        trained = layer.train()(x)
        evaluated = layer.eval()(x)
    layer64, x64 = float64_copy(layer), x.double()
    torch.testing.assert_close(trained.double(), reference(layer64, x64, capacity)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(evaluated.double(), reference(layer64, x64)[0], rtol=1e-5, atol=1e-5)
    assert (trained - evaluated).abs().max() > 1e-3  # some tokens were dropped


def test_routing_is_deterministic():
    layer = make_layer(moe_config(experts_per_token=2), seed=11)
    x = torch.randn(4, 17, layer.router.in_features)
    assert torch.equal(layer(x), layer(x))


def model_config(**overrides) -> ModelConfig:
    values = dict(n_layers=4, share="cycle", n_unique_layers=2, moe_layers="DM", moe_shared_expert=True)
    return moe_config(**(values | overrides))


def test_a_model_with_moe_gqa_and_a_shared_cycle_decodes_like_its_full_forward(tmp_path):
    torch.manual_seed(5)
    config = model_config()
    model = MiniGrok(config).eval()
    assert [type(block.mlp).__name__ for block in model.blocks] == ["MLP", "MoE"]
    assert {name: tuple(t.shape) for name, t in model.state_dict().items()} == parameter_shapes(config)
    ids = torch.randint(0, config.vocab_size, (2, 21))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(config, batch_size=2, max_len=21, dtype=torch.float32, device=torch.device("cpu"))
        pieces = [model(ids[:, :8], cache=cache).logits]
        pieces += [model(ids[:, i : i + 1], cache=cache).logits for i in range(8, 21)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    balance, z_loss = model.router_losses()  # of the last step, one token per row
    assert balance > 0 and z_loss > 0
    model.save_pretrained(tmp_path / "ckpt")
    loaded = MiniGrok.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == config
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, full)


@pytest.mark.parametrize("checkpointing", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_gradients_and_router_losses(checkpointing):
    torch.manual_seed(2)
    model = MiniGrok(model_config(moe_capacity_factor=1.0)).train()
    ids = torch.randint(0, 97, (2, 19))

    def gradients(mode: str) -> list[torch.Tensor]:
        model.activation_checkpointing = mode
        loss = model(ids, targets=ids).loss
        balance, z_loss = model.router_losses()
        return torch.autograd.grad(loss + 0.1 * balance + 0.01 * z_loss, list(model.parameters()))

    for got, want in zip(gradients(checkpointing), gradients("none"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_report_counts_total_and_active_parameters_and_flops():
    config = model_config()
    report = MiniGrok(config).report(context=32)
    unique = sum(p.numel() for p in MiniGrok(config).parameters())
    assert report.unique_params == unique
    experts = config.n_experts * 3 * config.dim * config.moe_ffn_dim  # one MoE block's stacked experts
    positions = 2  # the MoE block runs at two of the four positions
    idle = positions * experts * (config.n_experts - config.experts_per_token) // config.n_experts
    assert report.active_params == report.total_params - idle
    dense = MiniGrok(ModelConfig(**(config.to_dict() | dict(n_experts=0)))).report(context=32)
    per_moe_position = (
        config.dim * config.n_experts  # router
        + (config.experts_per_token + 1) * 3 * config.dim * config.moe_ffn_dim  # chosen experts and the shared one
        - 3 * config.dim * config.ffn_dim  # the dense MLP it replaces
    )
    assert report.forward_flops_per_token == dense.forward_flops_per_token + 2 * positions * per_moe_position
    assert f"active parameters / token      {report.active_params:,}" in str(report)
    assert "active" not in str(dense)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(n_experts=-1), "n_experts=-1 must be 0"),
        (dict(experts_per_token=6), "experts_per_token=6 exceeds n_experts=5"),
        (dict(moe_layers="DX"), "moe_layers='DX' must be a string of D"),
        (dict(moe_layers="DMD"), "length divides n_unique_layers=2"),
        (dict(moe_capacity_factor=0), "moe_capacity_factor=0 must be a positive number"),
        (dict(moe_ffn_dim=0), "moe_ffn_dim=0 must be a positive integer"),
    ],
)
def test_bad_moe_fields_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        moe_config(**overrides)


def test_export_and_quantisation_refuse_moe_models(tmp_path):
    model = MiniGrok(moe_config())
    with pytest.raises(ValueError, match="n_experts=5: the Llama layout has dense MLPs only"):
        export_hf(model, tmp_path / "hf")
    with pytest.raises(ValueError, match="n_experts=5: quantisation does not handle mixture-of-experts"):
        quantize_model(model, bits=8)
    assert not (tmp_path / "hf").exists()


def test_compiled_decoding_and_training_match_eager():
    """generate(compile=True) traces one static decode graph (the gathered experts); compiled training breaks its
    graph at the per-expert matmuls and still sees the router losses."""
    torch.manual_seed(4)
    config = moe_config(n_experts=4, dim=32, moe_ffn_dim=24)
    model = MiniGrok(config).eval()
    prompt = torch.randint(0, config.vocab_size, (2, 7))
    assert torch.equal(model.generate(prompt, 6, temperature=0, compile=True), model.generate(prompt, 6, temperature=0))

    def gradients(forward) -> list[torch.Tensor]:
        loss = forward(prompt, targets=prompt).loss
        balance, z_loss = model.router_losses()
        return torch.autograd.grad(loss + 0.1 * balance + 0.01 * z_loss, list(model.parameters()))

    compiled = torch.compile(model.train(), backend="aot_eager")
    for got, want in zip(gradients(compiled), gradients(model), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_triton_backend_matches_the_torch_one():
    torch.manual_seed(6)
    shape = dict(dim=32, n_heads=2, n_kv_heads=1)  # the attention kernel takes head_dim >= 16
    torch_model = MiniGrok(model_config(backend="torch", **shape)).eval()
    triton_model = MiniGrok(model_config(backend="triton", **shape)).eval()
    triton_model.load_state_dict(torch_model.state_dict())
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(triton_model(ids).logits, torch_model(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_ragged_batch_generates_what_each_prompt_generates_alone():
    """Padding and the other rows never change a row's routing: generation is dropless."""
    torch.manual_seed(8)
    model = MiniGrok(model_config(moe_capacity_factor=0.5)).eval()
    for param in model.blocks[1].mlp.parameters():  # large enough to decide the greedy tokens
        param.data.normal_(std=0.5)
    prompts = [torch.randint(0, 97, (length,)).tolist() for length in (3, 11, 6)]
    batch = model.generate_batch(prompts, max_new_tokens=7, temperature=0)
    assert batch == [model.generate_batch([prompt], max_new_tokens=7, temperature=0)[0] for prompt in prompts]


def test_the_grouped_mm_path_runs_in_the_autocast_dtype(monkeypatch):
    """Autocast leaves torch._grouped_mm in fp32: the layer casts to bf16 itself, and matches the per-expert path."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    rows, weight = torch.randn(9, 32), torch.randn(3, 16, 32)
    experts, counts = torch.tensor([0, 0, 0, 0, 2, 2, 2, 2, 2]), torch.tensor([4, 0, 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        product = moe.expert_matmul(rows, weight, experts, counts, "grouped")
    assert product.dtype == torch.bfloat16
    torch.testing.assert_close(
        product, torch.cat([rows[:4].bfloat16() @ weight[0].bfloat16().T, rows[4:].bfloat16() @ weight[2].bfloat16().T])
    )
    layer = make_layer(moe_config(dim=32, moe_ffn_dim=16, n_heads=4), seed=9)
    x = torch.randn(2, 13, 32)
    outputs = {}
    for how in ("grouped", "loop"):
        monkeypatch.setattr(moe, "matmul_kind", lambda x, hidden, how=how: how)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[how] = layer(x).float()
    torch.testing.assert_close(outputs["grouped"], outputs["loop"], rtol=0, atol=1e-2)
