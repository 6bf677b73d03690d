"""Weight-only quantisation: the integers and scales against a plain reference, each matmul path against float64
math on the dequantised weight, packed checkpoints and every way loading one can fail."""

import json

import pytest
import torch
from safetensors import safe_open

from minigrok import MiniGrok, ModelConfig
from minigrok.checkpoint import CheckpointError, write_manifest
from minigrok.quantize import (
    QuantizedEmbedding,
    QuantizedLinear,
    dequantize,
    load_quantized,
    quantize_model,
    quantize_weight,
    save_quantized,
)

CONFIG = dict(vocab_size=96, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=32)


def random_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with rows of very different magnitudes, one all-zero row and one outlier."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    weight *= torch.logspace(-3, 1, out_features)[torch.randperm(out_features, generator=generator)][:, None]
    weight[1] = 0
    weight[2, 3] = 40.0
    return weight


def plain_quantize(weight: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """round(w / s) in float64 with each element's own scale: the integers quantize_weight must produce."""
    per_element = (
        scales.double()
        .reshape(weight.shape[0], -1)
        .repeat_interleave(weight.shape[1] // scales.reshape(weight.shape[0], -1).shape[1], dim=1)
    )
    qmax = 127 if bits == 8 else 7
    return torch.round(weight.double() / per_element).clamp(-qmax, qmax), per_element


@pytest.mark.parametrize(
    "bits,group_size,shape", [(8, None, (37, 83)), (8, None, (16, 7)), (4, 32, (20, 96)), (4, 64, (33, 128))]
)
def test_quantize_weight_matches_a_plain_reference_within_half_a_scale(bits, group_size, shape):
    weight = random_weight(*shape)
    q, scales = quantize_weight(weight, bits, group_size)
    assert scales.dtype == torch.float16
    groups = 1 if bits == 8 else shape[1] // group_size
    assert scales.shape == ((shape[0],) if bits == 8 else (shape[0], groups))
    assert q.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert q.shape == (shape if bits == 8 else (shape[0], shape[1] // 2))
    # the scale: the group's max |w| over qmax, float16 rounded up (never down; by one step of 2^-24 at most where
    # it is subnormal), 1 for an all-zero group
    amax = weight.double().abs().reshape(shape[0], groups, -1).amax(dim=-1)
    qmax = 127 if bits == 8 else 7
    ideal = (amax / qmax).reshape(scales.shape)
    real = ideal > 0
    assert torch.all(scales.double()[real] >= ideal[real])
    assert torch.all(scales.double()[real] <= ideal[real] * (1 + 2**-10) + 2**-24)
    assert torch.all(scales.double()[~real] == 1)
    values = q if bits == 8 else torch.stack([q & 0xF, q >> 4], dim=-1).flatten(1).to(torch.int8) - 8
    reference, per_element = plain_quantize(weight, scales, bits)
    assert torch.equal(values.double(), reference)
    assert values.abs().max() <= qmax
    # the dequantised weight is within half a scale of the weight, element by element
    restored = dequantize(q, scales, bits, torch.float64)
    assert torch.equal(restored, values.double() * per_element)
    assert torch.all((restored - weight.double()).abs() <= per_element / 2 * (1 + 1e-6))


@pytest.mark.parametrize("bits,group_size,in_features,fix", [(4, 64, 96, "--group-size 32"), (4, 32, 48, "8 bits")])
def test_a_group_size_that_does_not_divide_the_inputs_is_refused(bits, group_size, in_features, fix):
    with pytest.raises(ValueError, match=f"group_size={group_size} does not divide the {in_features} input.*{fix}"):
        quantize_weight(torch.randn(16, in_features), bits, group_size)


@pytest.mark.parametrize(
    "bits,group_size,message",
    [(3, None, "bits=3 is not supported"), (8, 64, "group_size=64 applies to 4 bits only"), (4, 48, "group_size=48")],
)
def test_bad_bits_and_group_sizes_name_the_field(bits, group_size, message):
    with pytest.raises(ValueError, match=message):
        quantize_weight(torch.randn(16, 96), bits, group_size)


# (bits, group_size, out, in, dtype, torch ops on, the kernel expected)
PATHS = [
    (8, None, 37, 83, torch.float32, True, "int8pack_mm"),
    (8, None, 48, 160, torch.bfloat16, True, "int8pack_mm"),
    (8, None, 40, 200, torch.bfloat16, True, "dequantize"),  # torch's bf16 int8 op mishandles in % 16 != 0
    (8, None, 37, 83, torch.float32, False, "dequantize"),
    (4, 64, 48, 192, torch.float32, True, "int4pack_mm"),
    (4, 32, 32, 96, torch.bfloat16, True, "int4pack_mm"),
    (4, 128, 40, 128, torch.float32, True, "dequantize"),  # torch's int4 op wants a multiple of 16 output rows
    (4, 64, 48, 192, torch.float32, False, "dequantize"),
]


@pytest.mark.parametrize("bits,group_size,out_features,in_features,dtype,ops,kernel", PATHS)
def test_each_matmul_path_matches_float64_math_on_the_dequantised_weight(
    bits, group_size, out_features, in_features, dtype, ops, kernel
):
    layer = QuantizedLinear(
        *quantize_weight(random_weight(out_features, in_features, seed=1), bits, group_size), bits, group_size
    )
    layer.use_torch_ops = ops
    assert layer.kernel("cpu", dtype, rows=8) == kernel
    assert layer.kernel("cpu", dtype, rows=9) == "dequantize"  # many rows: the float GEMM on the dequantised weight
    x = torch.randn(2, 4, in_features, generator=torch.Generator().manual_seed(2)).to(dtype)
    out = layer(x)
    assert out.shape == (2, 4, out_features) and out.dtype == dtype
    reference = x.double() @ dequantize(layer.qweight, layer.scales, bits, torch.float64).to(dtype).double().T
    tolerance = (1e-5 if dtype == torch.float32 else 1e-2) * reference.abs().max().item()
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=tolerance)


@pytest.mark.parametrize("rows", [1, 4, 7])
def test_a_weight_at_any_address_runs_the_bf16_int8_matmul(rows):
    q, scales = quantize_weight(random_weight(128, 64), 8)
    buffer = torch.empty(q.numel() + 8, dtype=torch.int8)
    buffer[8:] = q.flatten()
    misaligned = buffer[8:].view(q.shape)  # as safetensors may hand a tensor back: 8 bytes past an aligned start
    x = torch.randn(rows, 64).bfloat16()
    reference = x.double() @ dequantize(q, scales, 8, torch.bfloat16).double().T
    for weight, kernel in [(misaligned, "dequantize"), (q, "int8pack_mm")]:
        layer = QuantizedLinear(weight, scales, 8, None)
        assert layer.kernel("cpu", torch.bfloat16, rows) == kernel
        torch.testing.assert_close(layer(x).double(), reference, rtol=0, atol=1e-2 * reference.abs().max().item())


def test_autocast_runs_the_matmul_in_its_dtype():
    layer = QuantizedLinear(*quantize_weight(random_weight(32, 64), 8), 8, None)
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, layer(x.bfloat16()))


def float_copy(model: MiniGrok) -> MiniGrok:
    copy = MiniGrok(model.config)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


@pytest.mark.parametrize(
    "bits,group_size,include_embedding,share,tied",
    [
        (8, None, False, "none", True),
        (4, 32, True, "all", True),
        (8, None, True, "cycle", False),
        (4, 64, False, "immediate", True),
    ],
)
def test_quantize_model_equals_the_model_with_dequantised_weights(bits, group_size, include_embedding, share, tied):
    torch.manual_seed(0)
    n_unique = {"none": 4, "all": 1, "cycle": 2, "immediate": 2}[share]
    model = MiniGrok(ModelConfig(**CONFIG, share=share, n_unique_layers=n_unique, tie_embeddings=tied)).eval()
    quantized = quantize_model(float_copy(model), bits, group_size, include_embedding)
    layers = [m for m in quantized.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 4 * n_unique + (include_embedding * (1 if tied else 2))  # a shared block once
    assert isinstance(quantized.embed, QuantizedEmbedding) == include_embedding
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    # the reference: the float model holding the dequantised weights, in float64
    reference = float_copy(model).double()
    state = reference.state_dict()
    for name in quantized.quantization.tensors:
        state[name].copy_(quantized.get_submodule(name.removesuffix(".weight")).weight)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 11))
    torch.testing.assert_close(quantized(ids).logits.double(), reference(ids).logits, rtol=0, atol=2e-5)
    loss = quantized(ids, targets=ids).loss
    torch.testing.assert_close(loss.double(), reference(ids, targets=ids).loss.double(), rtol=1e-5, atol=0)
    # decoding against the KV cache: the reference's greedy tokens
    assert torch.equal(
        quantized.generate(ids[:, :3], 8, temperature=0), reference.generate(ids[:, :3], 8, temperature=0)
    )
    with pytest.raises(ValueError, match="already quantised"):
        quantize_model(quantized, bits, group_size)


def test_int4_refuses_a_model_whose_inputs_the_group_does_not_divide():
    model = MiniGrok(ModelConfig(**(CONFIG | {"ffn_dim": 80})))
    with pytest.raises(
        ValueError, match="group_size=64 does not divide the 80 input features of blocks.0.mlp.down_proj"
    ):
        quantize_model(model, 4, 64)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())  # nothing half-swapped


@pytest.mark.parametrize("bits,group_size,include_embedding", [(8, None, True), (4, 32, False)])
def test_save_and_load_round_trip_a_packed_file(tmp_path, bits, group_size, include_embedding):
    torch.manual_seed(0)
    model = quantize_model(
        MiniGrok(ModelConfig(**CONFIG, share="cycle", n_unique_layers=2)).eval(), bits, group_size, include_embedding
    )
    save_quantized(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "manifest.json",
        "model.safetensors",
        "quantization.json",
    ]
    record = json.loads((tmp_path / "quantization.json").read_text())
    assert record == {
        "bits": bits,
        "group_size": group_size,
        "tensors": list(model.quantization.tensors),
        "scale_dtype": "float16",
    }
    with safe_open(tmp_path / "model.safetensors", framework="pt") as file:
        dtypes = {name: file.get_slice(name).get_dtype() for name in file.keys()}
    assert dtypes["blocks.1.mlp.down_proj.qweight"] == ("I8" if bits == 8 else "U8")
    assert dtypes["blocks.1.mlp.down_proj.scales"] == "F16" and "blocks.2.mlp.down_proj.qweight" not in dtypes
    assert dtypes["embed." + ("qweight" if include_embedding else "weight")] == ("I8" if include_embedding else "F32")
    loaded = load_quantized(tmp_path)
    assert loaded.quantization == model.quantization
    layers = [m for m in loaded.modules() if isinstance(m, QuantizedLinear)]
    assert all(m.qweight.data_ptr() % 64 == 0 for m in layers)  # aligned as torch's ops want, wherever the file put it
    assert {m.kernel("cpu", torch.bfloat16) for m in layers} == {f"int{bits}pack_mm"}
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    with pytest.raises(CheckpointError, match="is a quantised checkpoint.*load_quantized"):
        MiniGrok.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "bits,group_size,include_embedding,limit",
    [(8, None, True, 0.30), (4, 64, True, 0.18), (8, None, False, 1), (4, 64, False, 1)],
)
def test_checkpoint_size_of_a_demo_cpu_model(tmp_path, bits, group_size, include_embedding, limit):
    model = MiniGrok(ModelConfig.from_yaml("demo-cpu"))
    fp32_bytes = model.report().checkpoint_bytes["fp32"]
    save_quantized(quantize_model(model, bits, group_size, include_embedding), tmp_path)
    ratio = (tmp_path / "model.safetensors").stat().st_size / fp32_bytes
    assert ratio <= limit
    packed_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert (tmp_path / "model.safetensors").stat().st_size < packed_bytes * 1.01  # the file is the packed tensors


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    save_quantized(quantize_model(MiniGrok(ModelConfig(**CONFIG)), 4, 32), tmp_path)
    return tmp_path


def edit_record(directory, **changes):
    """Change quantization.json and record it in the manifest: a whole save whose content is wrong."""
    path = directory / "quantization.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))
    write_manifest(directory, json.loads((directory / "config.json").read_text()))


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"bits": 3}, "bits=3 is not supported: choose 8 or 4"),
        ({"bits": "4"}, "bits='4' must be an integer"),
        ({"group_size": 48}, "group_size=48 is not supported"),
        ({"bits": 8}, "group_size=32 applies to 4 bits only"),
        ({"scale_dtype": "bfloat16"}, "scale_dtype='bfloat16' is not supported"),
        ({"tensors": ["blocks.7.attn.o_proj.weight"]}, "not quantisable weights of this config"),
        ({"extra": 1}, "must be a JSON object of"),
    ],
)
def test_a_bad_quantization_record_is_refused_before_loading(saved, changes, message):
    edit_record(saved, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_quantized(saved, verify=False)


def test_a_record_that_disagrees_with_the_tensors_names_the_tensor(saved):
    edit_record(saved, group_size=64)
    with pytest.raises(CheckpointError, match=r"scales' has shape \(128, 2\) but the config implies \(128, 1\)"):
        load_quantized(saved, verify=False)
    edit_record(saved, group_size=32, tensors=["blocks.0.attn.o_proj.weight"])
    with pytest.raises(CheckpointError, match="does not match its config: missing.*unexpected"):
        load_quantized(saved, verify=False)


def test_a_group_size_not_dividing_the_config_is_refused(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(config | {"ffn_dim": 80}))
    with pytest.raises(CheckpointError, match="group_size=32 does not divide the 80 input features"):
        load_quantized(saved, verify=False)


def test_damaged_files_are_caught(saved):
    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in a tensor: only the hash sees it
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        load_quantized(saved)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="missing or not the"):
        load_quantized(saved, verify=False)
    (saved / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_quantized(saved, verify=False)
    (saved / "quantization.json").write_text("{bits: 4")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_quantized(saved, verify=False)


def test_a_tensor_of_the_wrong_dtype_is_refused(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / "model.safetensors")
    tensors["blocks.0.attn.o_proj.qweight"] = tensors["blocks.0.attn.o_proj.qweight"].to(torch.int8)
    save_file(tensors, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="'blocks.0.attn.o_proj.qweight' is I8 but its record implies U8"):
        load_quantized(saved, verify=False)


@pytest.mark.parametrize(
    "scheme,share,tied",
    [
        ("fp32", "none", True),
        ("bf16", "cycle", False),
        ("int8", "none", True),
        ("int8 + embedding", "cycle", False),
        ("int4 g64", "all", True),
        ("int4 g64 + embedding", "none", False),
    ],
)
def test_the_reported_size_of_each_scheme_is_its_saved_checkpoint(tmp_path, scheme, share, tied):
    n_unique = {"none": 4, "all": 1, "cycle": 2}[share]
    config = ModelConfig(**CONFIG, share=share, n_unique_layers=n_unique, tie_embeddings=tied)
    size = MiniGrok(config).report().schemes[scheme]
    model = MiniGrok(config).eval()
    if scheme == "bf16":
        model.bfloat16().save_pretrained(tmp_path)
    elif scheme == "fp32":
        model.save_pretrained(tmp_path)
    else:
        bits, group_size = (8, None) if scheme.startswith("int8") else (4, 64)
        save_quantized(quantize_model(model, bits, group_size, scheme.endswith("embedding")), tmp_path)
    held = sum(t.nbytes for t in model.state_dict().values())
    assert size.resident_bytes == size.disk_bytes == held
    file_bytes = (tmp_path / "model.safetensors").stat().st_size
    assert 0 < file_bytes - size.disk_bytes < 4096  # the safetensors header
    kv_dtype_bytes = 4 if scheme == "fp32" else 2
    assert size.kv_bytes_per_token == 2 * config.n_layers * config.n_kv_heads * config.head_dim * kv_dtype_bytes


def test_a_scheme_whose_groups_do_not_divide_the_inputs_says_so():
    report = MiniGrok(ModelConfig(**(CONFIG | {"ffn_dim": 96}))).report()
    assert report.schemes["int4 g64"] == "group_size=64 does not divide the 96 input features of mlp.down_proj.weight"
    assert report.schemes["int8"].disk_bytes > 0


@pytest.mark.parametrize("tied", [True, False])
def test_a_quantised_head_decodes_on_its_packed_weight(monkeypatch, tied):
    torch.manual_seed(0)
    model = MiniGrok(ModelConfig(**CONFIG, tie_embeddings=tied)).eval()
    quantized = quantize_model(model, 8, include_embedding=True)
    head = quantized.embed if tied else quantized.lm_head
    assert head.kernel("cpu", torch.float32, rows=2) == "int8pack_mm"
    hidden = torch.randn(2, 1, CONFIG["dim"])
    expected = hidden.double() @ head.weight.double().T
    torch.testing.assert_close(quantized.logits(hidden).double(), expected, rtol=0, atol=1e-5 * expected.abs().max())
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 5))
    dequantised = []  # generate reads the head's device and dtype once a call; no decoded token dequantises it
    weight = QuantizedLinear.weight
    monkeypatch.setattr(QuantizedLinear, "weight", property(lambda self: dequantised.append(self) or weight.fget(self)))
    quantized.generate(ids, 1, temperature=0)
    once = len(dequantised)
    quantized.generate(ids, 8, temperature=0)
    assert len(dequantised) == 2 * once
