"""Triton weight-only int8 / int4 matmul against float64 x @ dequant(W).T, on weights the quantiser writes, odd shapes;
and a quantised model on the kernel against the same model on the PyTorch path."""

from __future__ import annotations

import pytest
import torch
from checks import BF16_TRUNCATES, DEVICE, check_outputs_finite, max_err

from minigrok import MiniGrok, ModelConfig, functional
from minigrok.kernels.quantized_matmul import quantized_matmul
from minigrok.quantize import QuantizedLinear, dequantize, quantize_model, quantize_weight

# (rows, out features, in features): odd rows and outputs; the inputs a multiple of 128 (every group), odd for int8.
INT4_SHAPES = [(1, 37, 128), (7, 83, 384), (45, 130, 256)]
INT8_SHAPES = [(1, 37, 83), (9, 50, 301), (70, 129, 64)]
# fp16's output rounding is 2^-11 of a value; bf16's 2^-8, and the interpreter truncates instead of rounding (2^-7).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2**-7 if BF16_TRUNCATES else 2**-8}


def make_inputs(rows: int, out_features: int, in_features: int, bits: int, group_size: int | None, dtype, seed: int):
    """x of `dtype` and the packed weight of a Gaussian with rows of very different magnitudes, on DEVICE."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    weight *= torch.logspace(-2, 1, out_features)[torch.randperm(out_features, generator=generator)][:, None]
    q, scales = quantize_weight(weight, bits, group_size)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    return x.to(DEVICE), q.to(DEVICE), scales.to(DEVICE)


def check(rows, out_features, in_features, bits, group_size, dtype):
    x, q, scales = make_inputs(rows, out_features, in_features, bits, group_size, dtype, seed=rows + in_features)
    out = quantized_matmul(x, q, scales, bits)
    reference = x.double() @ dequantize(q, scales, bits, torch.float64).T
    check_outputs_finite([out])
    assert out.shape == (rows, out_features) and out.dtype == dtype
    assert reference.abs().max() > 0
    assert max_err(out, reference) / reference.abs().max().item() < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows, out_features, in_features", INT4_SHAPES)
def test_int4_matches_float64_on_the_dequantised_weight(
    rows, out_features, in_features, group_size, dtype, poison_empty
):
    check(rows, out_features, in_features, 4, group_size, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows, out_features, in_features", INT8_SHAPES)
def test_int8_matches_float64_on_the_dequantised_weight(rows, out_features, in_features, dtype, poison_empty):
    check(rows, out_features, in_features, 8, None, dtype)


def test_functional_dispatch_reads_batched_inputs_and_keeps_gradients_on_the_torch_path():
    x, q, scales = make_inputs(6, 40, 128, 4, 32, torch.float32, seed=3)
    batched = x.view(2, 3, 128)
    out = functional.quantized_matmul(batched, q, scales, 4, backend="triton")
    torch.testing.assert_close(out, quantized_matmul(x, q, scales, 4).view(2, 3, 40), rtol=0, atol=0)
    plain = functional.quantized_matmul(batched, q, scales, 4, backend="torch")
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())
    leaf = batched.clone().requires_grad_()  # the kernel has no backward: a gradient takes the PyTorch path
    functional.quantized_matmul(leaf, q, scales, 4, backend="triton").sum().backward()
    torch.testing.assert_close(leaf.grad, dequantize(q, scales, 4).sum(0).expand(2, 3, 128), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="x's last dim 64 must be the weight's 128 inputs"):
        functional.quantized_matmul(x[:, :64], q, scales, 4, backend="triton")


@pytest.mark.parametrize("bits, group_size", [(8, None), (4, 32)])
def test_a_quantised_model_on_the_kernel_matches_its_pytorch_path(bits, group_size):
    torch.manual_seed(0)
    config = ModelConfig.from_dict(ModelConfig.from_yaml("tiny").to_dict() | {"backend": "torch"})
    weights = MiniGrok(config).state_dict()
    models = {}
    for backend in ("torch", "triton"):
        model = MiniGrok(ModelConfig.from_dict(config.to_dict() | {"backend": backend})).eval()
        model.load_state_dict(weights)
        models[backend] = quantize_model(model, bits, group_size, include_embedding=True)
    layer = next(m for m in models["triton"].modules() if type(m) is QuantizedLinear)
    assert layer.kernel("cpu", torch.float32, rows=1) == "dequantize"  # not torch's CPU ops: the kernel
    ids = torch.randint(0, config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = {backend: model(ids).logits for backend, model in models.items()}
    torch.testing.assert_close(logits["triton"], logits["torch"], rtol=0, atol=1e-5 * logits["torch"].abs().max())
    prompt = ids[:1, :4]
    assert torch.equal(
        models["triton"].generate(prompt, 6, temperature=0), models["torch"].generate(prompt, 6, temperature=0)
    )
