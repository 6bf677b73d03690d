"""The optimizer and its learning-rate schedule: AdamW (weight decay on matrices only) with warmup then cosine, WSD
or constant, and the check that a saved optimizer state fits the model before it is loaded."""

from __future__ import annotations

import math

import torch

from minigrok.checkpoint import CheckpointError
from minigrok.model import MiniGrok

from .checkpoint import OPTIMIZER_NAME
from .config import TrainConfig


def lr_at(config: TrainConfig, step: int, progress: float) -> float:
    """Learning rate at `step`, with `progress` in [0, 1] the fraction of the budget spent."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    floor = config.lr * config.min_lr_ratio
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "wsd":
        decay_start = 1 - config.decay_fraction
        if progress <= decay_start:
            return config.lr
        return floor + (config.lr - floor) * max(0.0, 1 - progress) / config.decay_fraction
    total = config.total_steps
    if total is not None:  # cosine over the steps after warmup
        progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_hyperparameters(optimizer: torch.optim.AdamW, config: TrainConfig) -> None:
    """Betas and weight decay from `config`: the first group (matrices) decays, the second (norm gains) does not.

    Called when the optimizer is built and again after a resume loads its saved groups, so a changed
    train.beta1 / beta2 / weight_decay takes effect for real."""
    for index, group in enumerate(optimizer.param_groups):
        group["betas"] = (config.beta1, config.beta2)
        group["weight_decay"] = config.weight_decay if index == 0 else 0.0


def build_optimizer(model: MiniGrok, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linears, embedding) only, not on norm gains."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2]}, {"params": [p for p in params if p.dim() < 2]}]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)  # one kernel for the whole update
    optimizer = torch.optim.AdamW(groups, lr=config.lr, eps=1e-8, fused=fused)
    set_hyperparameters(optimizer, config)
    return optimizer


def check_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer, model: MiniGrok, source: str) -> None:
    """Raise CheckpointError unless `saved` (an optimizer state_dict) fits `optimizer`: the same groups of the same
    parameters, and every moment tensor of its parameter's shape and dtype. A wrong-shaped moment would otherwise
    reach the fused kernel, which reads past the end of it."""
    where = f"{source}/{OPTIMIZER_NAME}"
    template = optimizer.state_dict()["param_groups"]
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or [g.get("params") for g in groups if isinstance(g, dict)] != [
        g["params"] for g in template
    ]:
        raise CheckpointError(
            f"{where}: its parameter groups do not fit this model's optimizer; it belongs to another run"
        )
    names = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in saved.get("state", {}).items():
        if not 0 <= index < len(params):
            raise CheckpointError(f"{where}: state for parameter {index}, but the model has {len(params)}")
        param = params[index]
        for key, value in values.items():
            expected = (param.shape, param.dtype) if key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") else None
            if key == "step":
                ok = (torch.is_tensor(value) and value.numel() == 1) or isinstance(value, (int, float))
            else:
                ok = expected is not None and torch.is_tensor(value) and (value.shape, value.dtype) == expected
            if not ok:
                found = f"{tuple(value.shape)} {value.dtype}" if torch.is_tensor(value) else repr(value)[:80]
                wanted = (
                    "a scalar" if key == "step" else f"{tuple(expected[0])} {expected[1]}" if expected else "nothing"
                )
                raise CheckpointError(
                    f"{where}: tensor {index}.{key} is {found}, but {names[id(param)]} needs {wanted}: "
                    "the optimizer state is corrupt or from another model; restore the checkpoint or resume from an earlier one"
                )
