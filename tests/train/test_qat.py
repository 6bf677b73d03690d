"""Quantisation-aware training: the quantiser PTQ uses, straight-through gradients, shared and tied weights,
activation checkpointing and torch.compile."""

import copy

import pytest
import torch
import torch.nn.functional as F

from minigrok import ConfigError, MiniGrok, ModelConfig
from minigrok.quantize import dequantize, fake_quantize, quantize_model, quantize_weight
from minigrok.train import qat
from minigrok.train.config import TrainConfig

SETTINGS = [(8, None), (4, 32), (4, 64), (4, 128)]


def random_model(**overrides) -> MiniGrok:
    """A small model with weights of several magnitudes (not the init's), so that scales differ row to row."""
    config = dict(vocab_size=96, dim=128, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=256, max_seq_len=32)
    torch.manual_seed(1)
    model = MiniGrok(ModelConfig(**config | overrides))
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(torch.rand(param.shape[0], *[1] * (param.dim() - 1)) * 3 + 0.1)
    return model


def qat_config(bits: int, group_size: int | None, **overrides) -> TrainConfig:
    return TrainConfig(max_steps=10, qat=f"int{bits}", qat_group_size=group_size or 64, **overrides)


def with_qat(model: MiniGrok, config: TrainConfig) -> MiniGrok:
    """The model with its QAT parametrizations, switched on."""
    qat.add_fake_quantization(model, config).enabled = True
    return model


def batch(model: MiniGrok, rows: int = 3, length: int = 17):
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (rows, length + 1), generator=generator)
    return ids[:, :-1], ids[:, 1:]


@pytest.mark.parametrize("bits,group_size", SETTINGS)
def test_fake_quantize_is_exactly_ptq_dequantised(bits, group_size):
    weight = torch.randn(48, 384) * torch.rand(48, 1) * 2
    weight[3] = 0  # an all-zero row: any scale
    expected = dequantize(*quantize_weight(weight, bits, group_size), bits)
    assert torch.equal(fake_quantize(weight, bits, group_size), expected)
    assert not torch.equal(expected, weight)


@pytest.mark.parametrize("bits,group_size", SETTINGS)
def test_straight_through_gradient_is_the_gradient_at_the_fake_quantised_weight(bits, group_size):
    torch.manual_seed(3)
    weight = (torch.randn(40, 128) * 0.5).requires_grad_()
    x, target = torch.randn(7, 5, 128), torch.randn(7, 5, 40)
    F.mse_loss(F.linear(x, qat.FakeQuantize.apply(weight, bits, group_size)), target).backward()
    # float64 reference: the plain gradient with respect to the fake-quantised weight itself
    fake = fake_quantize(weight, bits, group_size).double().requires_grad_()
    F.mse_loss(F.linear(x.double(), fake), target.double()).backward()
    scale = fake.grad.abs().max().item()
    torch.testing.assert_close(weight.grad, fake.grad.float(), rtol=1e-5, atol=1e-5 * scale)
    assert weight.grad.abs().sum() > 0


@pytest.mark.parametrize("include_embedding", [False, True])
@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_qat_forward_is_the_forward_of_the_ptq_model(include_embedding, tie_embeddings):
    model = random_model(tie_embeddings=tie_embeddings)
    ids, _ = batch(model)
    config = qat_config(4, 64, qat_include_embedding=include_embedding)
    with torch.no_grad():
        quantized = quantize_model(copy.deepcopy(model), 4, 64, include_embedding)
        plain = model(ids).logits
        logits = with_qat(model, config)(ids).logits
        for module in quantized.modules():
            module.use_torch_ops = False  # the dequantise-then-matmul path for every row count
        reference = quantized(ids).logits
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert (logits - plain).abs().max() > 1e-3  # the fake quantisation changed something


def fake_quantized_copy(model: MiniGrok, names: list[str], bits: int, group_size: int | None) -> MiniGrok:
    """The model with the named weights replaced by their fake-quantised values (a plain reference)."""
    reference = copy.deepcopy(model)
    state = reference.state_dict()
    with torch.no_grad():
        for name in names:
            state[name].copy_(fake_quantize(state[name], bits, group_size))
    return reference


@pytest.mark.parametrize("share", ["all", "cycle"])
@pytest.mark.parametrize("checkpointing", ["none", "full", "selective"])
def test_shared_and_tied_weights_are_fake_quantised_once_and_get_their_plain_gradient(
    share, checkpointing, monkeypatch
):
    model = random_model(n_layers=4, share=share, **({"n_unique_layers": 2} if share == "cycle" else {}))
    model.activation_checkpointing = checkpointing
    config = qat_config(4, 32, qat_include_embedding=True)
    names = qat.qat_names(model, config)
    assert "embed.weight" in names and len(names) == 4 * model.config.n_unique_layers + 1
    reference = fake_quantized_copy(model, names, 4, 32)
    calls = []
    monkeypatch.setattr(qat, "fake_quantize", lambda *args: calls.append(args) or fake_quantize(*args))
    ids, targets = batch(model)
    loss = with_qat(model, config)(ids, targets=targets).loss
    assert len(calls) == 4 * model.config.n_layers + 2  # each depth's read of a shared weight; lookup and tied head
    loss.backward()
    expected = reference(ids, targets=targets).loss
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    gradients = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        plain = name.replace(qat.PARAMETRIZED, ".weight")
        torch.testing.assert_close(param.grad, gradients[plain].grad, rtol=1e-4, atol=1e-7, msg=name)


def test_compiled_qat_forward_matches_eager():
    model = random_model(dim=64, ffn_dim=128, n_layers=2)
    config = qat_config(4, 32)
    ids, targets = batch(model)
    eager = with_qat(model, config)(ids, targets=targets).loss
    eager.backward()
    eager_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model)(ids, targets=targets).loss
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    assert list(model.state_dict()) == list(random_model(dim=64, ffn_dim=128, n_layers=2).state_dict())


def test_a_group_size_that_does_not_divide_the_inputs_is_named():
    model = random_model(dim=96, ffn_dim=192, n_heads=3, n_kv_heads=1)
    with pytest.raises(ValueError, match=r"train.qat_group_size=64 does not divide the 96 input features of blocks.0"):
        qat.qat_names(model, qat_config(4, 64))
    assert qat.qat_names(model, qat_config(4, 32))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"qat": "int2"}, "train.qat='int2' is unknown"),
        ({"qat": "int4", "qat_group_size": 48}, "train.qat_group_size=48 is unsupported"),
        ({"qat": "int4", "qat_start_step": -1}, "train.qat_start_step=-1 must be an integer >= 0"),
        ({"qat": "int4", "qat_start_step": 10}, "train.qat_start_step=10 is not before the last of the 10 steps"),
        ({"qat": "int4", "qat_include_embedding": "yes"}, "train.qat_include_embedding='yes' must be true or false"),
    ],
)
def test_qat_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(max_steps=10, **overrides)
