"""Quantisation-aware training: from train.qat_start_step on, every weight that `minigrok quantize` packs is read
fake-quantised (quantised, then dequantised, by the same code), and its gradient passes straight through to the
float32 weight, which stays the trained parameter.

Each weight gets a torch.nn.utils.parametrize parametrization, so every read of it (a shared block at each depth it
runs, the tied head, the recompute of activation checkpointing) sees the fake-quantised value. The state dict keeps
the plain names (`...proj.weight`) both ways, so checkpoints hold the float32 weights as plain training writes them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from minigrok.model import MiniGrok, parameter_shapes
from minigrok.quantize import fake_quantize, largest_group_size, quantizable_names

from .config import TrainConfig

QAT_BITS = {"int8": 8, "int4": 4}
PARAMETRIZED = ".parametrizations.weight.original"


class FakeQuantize(torch.autograd.Function):
    """fake_quantize(weight) forward; the straight-through estimator backward (the gradient passes unchanged)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
        return fake_quantize(weight, bits, group_size).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


class FakeQuantizer(nn.Module):
    """The parametrization: the weight fake-quantised while `enabled`, else unchanged."""

    def __init__(self, bits: int, group_size: int | None):
        super().__init__()
        self.bits, self.group_size, self.enabled = bits, group_size, False
        # Run eagerly under torch.compile: inductor keeps a fused float16 cast in float32 (and steps float16 wrongly
        # with nextafter), which would change the scales from those minigrok quantize writes. Wrapped here rather
        # than at import, since torch.compiler.disable imports dynamo, and with it triton, before the CLI has
        # chosen whether triton interprets.
        self.fake_quantize = torch.compiler.disable(FakeQuantize.apply)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.fake_quantize(weight, self.bits, self.group_size) if self.enabled else weight


def qat_names(model: MiniGrok, config: TrainConfig) -> list[str]:
    """The weights QAT fake-quantises (those `minigrok quantize` packs), the group size checked against each."""
    names = quantizable_names(model.config, config.qat_include_embedding)
    shapes = parameter_shapes(model.config)
    for name in names:
        in_features = shapes[name][1]
        if config.qat == "int4" and in_features % config.qat_group_size:
            fits = largest_group_size(in_features)
            fix = f"set train.qat_group_size={fits}" if fits else "use train.qat=int8"
            raise ValueError(
                f"train.qat_group_size={config.qat_group_size} does not divide the {in_features} input features of "
                f"{name}: {fix}"
            )
    return names


def plain_names(module: nn.Module, state: dict, prefix: str, metadata) -> None:
    """State-dict hook: `x.parametrizations.weight.original` saved as `x.weight`, in place and in order."""
    items = list(state.items())
    state.clear()
    state.update((key.replace(PARAMETRIZED, ".weight"), value) for key, value in items)


def add_fake_quantization(model: MiniGrok, config: TrainConfig) -> FakeQuantizer | None:
    """Parametrize the weights train.qat names with one FakeQuantizer (returned, disabled: the trainer switches it
    on at train.qat_start_step); None when train.qat=none."""
    if config.qat == "none":
        return None
    names = qat_names(model, config)
    bits = QAT_BITS[config.qat]
    quantizer = FakeQuantizer(bits, config.qat_group_size if bits == 4 else None)
    for name in names:
        parametrize.register_parametrization(model.get_submodule(name.removesuffix(".weight")), "weight", quantizer)
    parametrized = {name.removesuffix(".weight") + PARAMETRIZED: name for name in names}

    def parametrized_names(module, state, prefix, *args) -> None:
        for key, name in parametrized.items():
            if prefix + name in state:
                state[prefix + key] = state.pop(prefix + name)

    model.register_state_dict_post_hook(plain_names)
    model.register_load_state_dict_pre_hook(parametrized_names)
    return quantizer
