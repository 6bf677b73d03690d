"""Post-training weight-only quantisation: int8 per output channel or int4 in groups, saved as packed safetensors.

A weight W [out, in] becomes integers q and scales s with W ~= q * s, symmetric (no zero point):
    int8: one scale per output row, q in [-127, 127], stored as int8 [out, in];
    int4: one scale per row and group of `group_size` inputs, q in [-7, 7], stored offset by 8 as uint8 [out, in / 2],
          column 2j in the low nibble and 2j + 1 in the high one.
Scales are stored in float16: 3 more significand bits than bfloat16 (a row's scale multiplies every weight of
it, so its rounding is a per-row gain error: 2^-11 instead of 2^-8), and the range of weight magnitudes fits it;
each scale is rounded up where float16 would round it down, so |q| never exceeds its maximum.

QuantizedLinear runs its matmul on the packed weight: for a few rows (decoding) on CPU through torch's weight-only
ops where they take the shape and dtype (_weight_int8pack_mm; _weight_int4pack_mm_for_cpu on the layout of
_convert_weight_to_int4pack_for_cpu, built from q on first use), otherwise through
minigrok.functional.quantized_matmul: the Triton kernel on a GPU (tiles dequantised in registers), else that one
weight dequantised at call time for the float GEMM. Nothing is dequantised up front.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import (
    QUANTIZATION_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    check_files,
    check_weights,
    read_config,
    read_json,
    read_manifest,
    read_tensors,
    save_weights,
    write_manifest,
)
from .config import ModelConfig
from .files import write_json
from .functional.quantized_matmul import dequantize, quantized_matmul, scale_values, unpack_int4
from .model import MiniGrok, block_shapes, outside_shapes, parameter_shapes

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
SCALE_DTYPE = torch.float16
# torch's CPU int4 matmul takes these group sizes and a multiple of 16 output rows.
CPU_INT4_GROUP_SIZES = (32, 64, 128, 256)
# Above this many rows per call the weight-only ops were slower than dequantise + float GEMM (AMD EPYC, 2 cores).
MAX_TORCH_OP_ROWS = 8


@dataclass(frozen=True)
class Quantization:
    """What a quantised model holds: the bits, the int4 group size (None for int8) and the float weights replaced."""

    bits: int
    group_size: int | None
    tensors: tuple[str, ...]
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits={self.bits!r} is not supported: choose 8 or 4")
        if self.bits == 8 and self.group_size is not None:
            raise ValueError(
                f"group_size={self.group_size!r} applies to 4 bits only: int8 has one scale per output channel; "
                "drop the group size"
            )
        if self.bits == 4 and self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size={self.group_size!r} is not supported for 4 bits: choose one of {GROUP_SIZES}")
        if self.scale_dtype != "float16":
            raise ValueError(f"scale_dtype={self.scale_dtype!r} is not supported: scales are stored as float16")

    @property
    def qmax(self) -> int:
        return 127 if self.bits == 8 else 7


def quantizable_names(config: ModelConfig, include_embedding: bool) -> list[str]:
    """The float weights quantisation replaces: every projection of every physical block (a shared block once) and
    of a factorised embedding (embed_dim) and, with `include_embedding`, the embedding (the tied head) and an untied
    head. Mixture-of-experts models are refused."""
    if config.n_experts:
        raise ValueError(
            f"n_experts={config.n_experts}: quantisation does not handle mixture-of-experts models (their experts "
            "are stacked 3-D weights); quantise or QAT-train a dense model (n_experts=0)"
        )
    names = [
        f"blocks.{index}.{name}"
        for index, kind in enumerate(config.block_kinds())
        for name in block_shapes(config, kind)
        if is_quantizable(name, include_embedding)
    ]
    return names + [name for name in outside_shapes(config) if is_quantizable(name, include_embedding)]


def is_quantizable(name: str, include_embedding: bool) -> bool:
    """Whether quantisation replaces the weight `name` (a block's own name, or the model's outside the blocks)."""
    return name.endswith("proj.weight") or (include_embedding and name in ("embed.weight", "lm_head.weight"))


def largest_group_size(in_features: int) -> int | None:
    """The largest of GROUP_SIZES that divides in_features (None: no int4 grouping fits, only int8 does)."""
    return next((size for size in reversed(GROUP_SIZES) if in_features % size == 0), None)


def check_group_size(name: str, in_features: int, quantization: Quantization) -> None:
    """Raise ValueError unless the int4 group size divides the weight's input features."""
    if quantization.bits == 4 and in_features % quantization.group_size:
        fits = largest_group_size(in_features)
        fix = f"choose --group-size {fits}" if fits else "quantise it to 8 bits"
        raise ValueError(
            f"group_size={quantization.group_size} does not divide the {in_features} input features of {name}: {fix}"
        )


def quantize_values(weight: torch.Tensor, qmax: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales) of a float weight [out, in], unpacked: int8 q in [-qmax, qmax] [out, in] and float16 scales
    [out, in / group_size] (one group of all inputs for None), each scale rounded up where float16 would round down."""
    out_features, in_features = weight.shape
    groups = weight.detach().float().reshape(out_features, -1, group_size or in_features)
    amax = groups.abs().amax(dim=-1)
    scales = (amax / qmax).to(SCALE_DTYPE)
    too_small = scales.float() * qmax < amax  # float16 rounded the scale down: round it up instead
    scales = torch.where(too_small, torch.nextafter(scales, torch.full_like(scales, torch.inf)), scales)
    scales = torch.where(amax == 0, torch.ones_like(scales), scales)  # an all-zero row or group: any scale
    q = torch.round(groups / scales.float()[..., None]).clamp(-qmax, qmax)
    return q.reshape(out_features, in_features).to(torch.int8), scales


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """The float32 weight [out, in] that quantize_weight then dequantize give back: quantise, then dequantise."""
    return scale_values(*quantize_values(weight, Quantization(bits, group_size, ()).qmax, group_size), torch.float32)


def quantize_weight(
    weight: torch.Tensor, bits: int, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales) of a float weight [out, in]: int8 [out, in] and float16 [out], or packed uint8 [out, in / 2] and
    float16 [out, in / group_size]; every element within scale / 2 of its dequantised value."""
    quantization = Quantization(bits, group_size, ())
    check_group_size("the weight", weight.shape[1], quantization)
    q, scales = quantize_values(weight, quantization.qmax, group_size)
    if not torch.isfinite(scales).all():
        amax = weight.detach().float().abs().max().item()
        raise ValueError(
            f"a weight of magnitude {amax:.3g} overflows a float16 scale (or is not finite): "
            "check the checkpoint's weights"
        )
    if bits == 8:
        return q, scales[:, 0]
    offset = (q + 8).to(torch.uint8)
    return offset[:, 0::2] | (offset[:, 1::2] << 4), scales


class QuantizedLinear(nn.Module):
    """A bias-free linear layer over a packed int8 or int4 weight (see the module docstring).

    `weight` dequantises the whole weight on demand (the tied head reads it so); `forward` never keeps it.
    `use_torch_ops=False` always takes functional.quantized_matmul, which `backend` dispatches (the model's).
    """

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int | None, backend: str = "auto"):
        super().__init__()
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales)
        self.bits, self.group_size, self.backend = bits, group_size, backend
        self.out_features, self.in_features = q.shape[0], q.shape[1] * (2 if bits == 4 else 1)
        self.use_torch_ops = True
        self._cpu_int4: torch.Tensor | None = None  # torch's CPU int4 layout of qweight, built on first use
        self._cpu_int4_scales: dict[torch.dtype, torch.Tensor] = {}

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.bits)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] @ W.T on the packed weight (a tied quantised embedding's head is this of its table)."""
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        rows = x.reshape(-1, self.in_features).to(dtype).contiguous()
        kernel = self.kernel(device, dtype, rows.shape[0])
        if kernel == "int8pack_mm":
            out = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales.to(dtype))
        elif kernel == "int4pack_mm":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows, self.cpu_int4_weight(), self.group_size, self.cpu_int4_scales(dtype)
            )
        else:
            out = quantized_matmul(rows, self.qweight, self.scales, self.bits, self.backend)
        return out.view(*x.shape[:-1], self.out_features)

    def kernel(self, device: str, dtype: torch.dtype, rows: int = 1) -> str:
        """The matmul forward runs for `rows` input rows of `dtype` on `device`: torch's CPU weight-only op where it
        takes the shape and dtype and the rows are few, as in decoding ("int8pack_mm", "int4pack_mm"), else
        "dequantize": functional.quantized_matmul, the Triton kernel where the backend picks it, else this weight
        alone dequantised at call time (for many rows the float GEMM is faster and dequantising one weight costs a
        small part of it)."""
        if rows > MAX_TORCH_OP_ROWS or not self.use_torch_ops or device != "cpu" or self.backend == "triton":
            return "dequantize"
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return "dequantize"
        if self.bits == 8:
            # With bfloat16 inputs it reads each weight row 16-byte aligned (else wrong results or a crash).
            aligned = self.in_features % 16 == 0 and self.qweight.data_ptr() % 16 == 0
            return "int8pack_mm" if dtype != torch.bfloat16 or aligned else "dequantize"
        fits = self.group_size in CPU_INT4_GROUP_SIZES and self.out_features % 16 == 0
        return "int4pack_mm" if fits else "dequantize"

    def cpu_int4_weight(self) -> torch.Tensor:
        """qweight in the layout of _convert_weight_to_int4pack_for_cpu (values offset by 8, as it takes them)."""
        if self._cpu_int4 is None:
            offset = unpack_int4(self.qweight).to(torch.int32) + 8
            self._cpu_int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(offset, 1)
        return self._cpu_int4

    def cpu_int4_scales(self, dtype: torch.dtype) -> torch.Tensor:
        """Scales and zero points [in / group_size, out, 2] in `dtype`, as _weight_int4pack_mm_for_cpu takes them."""
        if dtype not in self._cpu_int4_scales:
            scales = self.scales.t().to(dtype)
            self._cpu_int4_scales[dtype] = torch.stack([scales, torch.zeros_like(scales)], dim=-1).contiguous()
        return self._cpu_int4_scales[dtype]


class QuantizedEmbedding(QuantizedLinear):
    """The token embedding over a packed weight: a lookup dequantises only the rows it reads; `linear` is the tied
    head."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return dequantize(self.qweight[input_ids], self.scales[input_ids], self.bits)


def swap_modules(model: MiniGrok, quantization: Quantization, layers: dict[str, QuantizedLinear]) -> None:
    """Put each quantised layer where its float module was, and record `quantization` on the model."""
    for name, layer in layers.items():
        parent, _, attribute = name.removesuffix(".weight").rpartition(".")
        setattr(model.get_submodule(parent), attribute, layer)
    model.quantization = quantization


def layer_class(name: str) -> type[QuantizedLinear]:
    return QuantizedEmbedding if name == "embed.weight" else QuantizedLinear


def quantize_model(
    model: MiniGrok, bits: int = 8, group_size: int | None = None, include_embedding: bool = False
) -> MiniGrok:
    """Replace the model's projections (and with `include_embedding` its embedding and head) by packed int8 or int4
    layers, in place; returns the model. 4 bits default to groups of 64."""
    if getattr(model, "quantization", None) is not None:
        raise ValueError("the model is already quantised: quantise its float checkpoint instead")
    group_size = DEFAULT_GROUP_SIZE if bits == 4 and group_size is None else group_size
    names = quantizable_names(model.config, include_embedding)
    quantization = Quantization(bits, group_size, tuple(names))
    state = model.state_dict()
    for name in names:
        check_group_size(name, state[name].shape[1], quantization)
    layers = {
        name: layer_class(name)(*quantize_weight(state[name], bits, group_size), bits, group_size, model.config.backend)
        for name in names
    }
    swap_modules(model, quantization, layers)
    return model


def quantized_shapes(config: ModelConfig, quantization: Quantization) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, safetensors dtype) of the packed tensors of a quantised model of `config`."""
    shapes = parameter_shapes(config)
    return {
        key: value
        for name in quantization.tensors
        for key, value in packed_shapes(name, shapes[name], quantization).items()
    }


def packed_shapes(
    name: str, shape: tuple[int, ...], quantization: Quantization
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, safetensors dtype) of the two tensors that replace the float weight `name` of `shape`."""
    out_features, in_features = shape
    check_group_size(name, in_features, quantization)
    base = name.removesuffix(".weight")
    if quantization.bits == 8:
        return {f"{base}.qweight": ((out_features, in_features), "I8"), f"{base}.scales": ((out_features,), "F16")}
    groups = in_features // quantization.group_size
    return {
        f"{base}.qweight": ((out_features, in_features // 2), "U8"),
        f"{base}.scales": ((out_features, groups), "F16"),
    }


def is_quantized(directory: str | Path) -> bool:
    """Whether `directory` holds a quantised checkpoint (its quantization.json)."""
    return (Path(directory) / QUANTIZATION_NAME).is_file()


def save_quantized(model: MiniGrok, directory: str | Path) -> None:
    """config.json, quantization.json and model.safetensors (integer weights + float16 scales), each atomically,
    then the manifest of every file in `directory` (a tokenizer.json put there first included)."""
    quantization = getattr(model, "quantization", None)
    if quantization is None:
        raise ValueError("the model is not quantised: call quantize_model first (or save it with save_pretrained)")
    save_weights(directory, model.config.to_dict(), model.state_dict())
    write_json(Path(directory) / QUANTIZATION_NAME, dataclasses.asdict(quantization))
    write_manifest(directory, model.config.to_dict())


def read_quantization(directory: Path, config: ModelConfig) -> Quantization:
    """The quantization record of `directory`, checked: known fields of the right types, tensors of the model."""
    path = directory / QUANTIZATION_NAME
    record = read_json(path)
    fields = {field.name for field in dataclasses.fields(Quantization)}
    if not isinstance(record, dict) or set(record) != fields:
        raise CheckpointError(f"{path} must be a JSON object of {sorted(fields)}: re-run minigrok quantize")
    tensors = record["tensors"]
    allowed = quantizable_names(config, include_embedding=True)
    if not isinstance(tensors, list) or not all(isinstance(name, str) for name in tensors):
        raise CheckpointError(f"{path}: tensors={tensors!r} must be a list of weight names: re-run minigrok quantize")
    if unknown := [name for name in tensors if name not in allowed]:
        raise CheckpointError(
            f"{path}: tensors lists {unknown[:3]}, not quantisable weights of this config ({allowed[0]}, ...): "
            "config.json and quantization.json come from different models; re-run minigrok quantize"
        )
    for field in ("bits", "group_size"):
        if record[field] is not None and type(record[field]) is not int:
            raise CheckpointError(f"{path}: {field}={record[field]!r} must be an integer: re-run minigrok quantize")
    try:
        quantization = Quantization(record["bits"], record["group_size"], tuple(tensors), record["scale_dtype"])
        quantized_shapes(config, quantization)
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from error
    return quantization


def load_quantized(directory: str | Path, map_location: str | torch.device = "cpu", verify: bool = True) -> MiniGrok:
    """The quantised model saved in `directory`, checked before anything is allocated: config.json, the
    quantization record against it, every tensor's name, shape and dtype (from the safetensors header) against
    both, and with `verify` the files' sha256 against the manifest."""
    directory = Path(directory)
    config = read_config(directory)
    quantization = read_quantization(directory, config)
    manifest = read_manifest(directory)
    if manifest is None:
        raise CheckpointError(f"{directory} has no manifest.json: the quantised checkpoint is incomplete; re-quantise")
    check_files(directory, manifest, [WEIGHTS_NAME, QUANTIZATION_NAME], hashes=verify)
    packed = quantized_shapes(config, quantization)
    floats = {name: shape for name, shape in parameter_shapes(config).items() if name not in quantization.tensors}
    expected = floats | {name: shape for name, (shape, _) in packed.items()}
    check_weights(directory / WEIGHTS_NAME, expected, {name: dtype for name, (_, dtype) in packed.items()})
    # A tensor read from the file may start at any byte; a copy starts where torch's allocator aligns it (64 bytes),
    # as torch's bf16 int8 op needs.
    tensors = {
        name: t if t.data_ptr() % 64 == 0 else t.clone()
        for name, t in read_tensors(directory / WEIGHTS_NAME, map_location).items()
    }
    with torch.device("meta"):
        model = MiniGrok(config)
    layers = {
        name: layer_class(name)(
            tensors[f"{name.removesuffix('.weight')}.qweight"],
            tensors[f"{name.removesuffix('.weight')}.scales"],
            quantization.bits,
            quantization.group_size,
            config.backend,
        )
        for name in quantization.tensors
    }
    swap_modules(model, quantization, layers)
    model.load_state_dict(tensors, assign=True)
    return model
