"""The optimizer and its learning-rate schedule: AdamW (weight decay on matrices only), or Muon for the blocks'
matrices beside AdamW for the rest, with warmup then cosine, WSD or constant, and the check that a saved optimizer
state fits the model before it is loaded."""

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


def muon_momentum_at(config: TrainConfig, step: int) -> float:
    """Muon's momentum at `step`: linear from muon_momentum_start to muon_momentum over muon_momentum_warmup_steps."""
    if step >= config.muon_momentum_warmup_steps:
        return config.muon_momentum
    fraction = step / config.muon_momentum_warmup_steps
    return config.muon_momentum_start + (config.muon_momentum - config.muon_momentum_start) * fraction


def is_muon_group(group: dict) -> bool:
    """A parameter group of Muon (torch's and MuonUpdate's groups alone have Newton-Schulz steps), not of AdamW."""
    return "ns_steps" in group


def set_learning_rates(optimizer: torch.optim.Optimizer, config: TrainConfig, step: int, progress: float) -> float:
    """Every group's learning rate at `step`: AdamW's lr_at, and Muon's muon_lr scaled by the same schedule (with
    its momentum warm-up). Returns AdamW's."""
    lr = lr_at(config, step, progress)
    for group in optimizer.param_groups:
        if is_muon_group(group):
            group["lr"], group["momentum"] = lr * config.muon_lr / config.lr, muon_momentum_at(config, step)
        else:
            group["lr"] = lr
    return lr


def set_hyperparameters(optimizer: torch.optim.Optimizer, config: TrainConfig) -> None:
    """Betas and weight decay from `config`: AdamW's first group (matrices) decays, its second (norm gains) does not;
    Muon's group takes muon_weight_decay and muon_adjust_lr.

    Called when the optimizer is built and again after a resume loads its saved groups, so a changed
    train.beta1 / beta2 / weight_decay / muon_* takes effect for real."""
    adamw_groups = [group for group in optimizer.param_groups if not is_muon_group(group)]
    for index, group in enumerate(adamw_groups):
        group["betas"] = (config.beta1, config.beta2)
        group["weight_decay"] = config.weight_decay if index == 0 else 0.0
    for group in optimizer.param_groups:
        if is_muon_group(group):
            group["weight_decay"], group["adjust_lr_fn"] = config.muon_weight_decay, config.muon_adjust_lr


def orthogonalise(matrix: torch.Tensor, steps: int) -> torch.Tensor:
    """About U V^T of `matrix` = U S V^T: Muon's quintic Newton-Schulz iteration in bf16 (Keller Jordan's
    coefficients), on the wide orientation so the Gram matrices are the small ones."""
    tall = matrix.size(0) > matrix.size(1)
    x = matrix.bfloat16().mT if tall else matrix.bfloat16()
    x = x / x.norm().clamp(min=1e-7)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=-4.7750, alpha=2.0315), x, beta=3.4445)
    return x.mT if tall else x


class MuonUpdate(torch.optim.Optimizer):
    """The update torch.optim.Muon makes, with its group keys, for a torch that lacks it: Nesterov momentum, the
    orthogonalised step scaled by the matrix's shape (adjust_lr_fn), decoupled weight decay."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float, adjust_lr_fn: str):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True, ns_steps=5)
        super().__init__(params, defaults | {"adjust_lr_fn": adjust_lr_fn})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for param in (p for p in group["params"] if p.grad is not None):
                buffer = self.state[param].setdefault("momentum_buffer", torch.zeros_like(param))
                buffer.lerp_(param.grad, 1 - momentum)
                update = orthogonalise(param.grad.lerp(buffer, momentum), group["ns_steps"])
                rows, cols = param.shape
                original = group["adjust_lr_fn"] == "original"
                scale = math.sqrt(max(1, rows / cols)) if original else 0.2 * math.sqrt(max(rows, cols))
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-lr * scale)


Muon = getattr(torch.optim, "Muon", MuonUpdate)


class MuonWithAdamW:
    """Muon for the blocks' matrices beside AdamW for everything else, stepped, saved and loaded as one optimizer:
    AdamW's groups first, then Muon's, parameters numbered across both as one torch optimizer numbers its own."""

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Optimizer):
        self.parts = (adamw, muon)

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts for group in part.param_groups]

    def step(self) -> None:
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for part in self.parts:
            saved = part.state_dict()
            state |= {offset + index: values for index, values in saved["state"].items()}
            groups += [group | {"params": [offset + i for i in group["params"]]} for group in saved["param_groups"]]
            offset += sum(len(group["params"]) for group in part.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict) -> None:
        offset, first = 0, 0
        for part in self.parts:
            groups = saved["param_groups"][first : first + len(part.param_groups)]
            count = sum(len(group["params"]) for group in groups)
            part.load_state_dict(
                {
                    "state": {i - offset: v for i, v in saved["state"].items() if offset <= i < offset + count},
                    "param_groups": [group | {"params": [i - offset for i in group["params"]]} for group in groups],
                }
            )
            offset, first = offset + count, first + len(groups)


def is_muon_matrix(name: str, param: torch.Tensor) -> bool:
    """Whether train.optimizer=muon trains `param` with Muon: the 2-D matrices inside the blocks (attention, MLP,
    conv projections, MoE routers). Embeddings, the head, norm gains, conv taps and the stacked 3-D expert weights
    stay with AdamW."""
    return name.startswith("blocks.") and param.dim() == 2


def build_optimizer(model: MiniGrok, config: TrainConfig) -> torch.optim.AdamW | MuonWithAdamW:
    """AdamW with weight decay on matrices (linears, embedding) only, not on norm gains; with train.optimizer=muon,
    Muon takes the blocks' matrices (a shared one is one parameter, updated once) and AdamW keeps the rest."""
    named = list(model.named_parameters())  # each shared parameter once
    with_muon = {name for name, p in named if config.optimizer == "muon" and is_muon_matrix(name, p)}
    matrices = [p for name, p in named if name in with_muon]
    rest = [p for name, p in named if name not in with_muon]
    groups = [{"params": [p for p in rest if p.dim() >= 2]}, {"params": [p for p in rest if p.dim() < 2]}]
    fused = all(p.device.type in ("cpu", "cuda") for p in rest)  # one kernel for the whole update
    optimizer = torch.optim.AdamW(groups, lr=config.lr, eps=1e-8, fused=fused)
    if matrices:
        muon = Muon(matrices, lr=config.muon_lr, momentum=config.muon_momentum, adjust_lr_fn=config.muon_adjust_lr,
                    weight_decay=config.muon_weight_decay)  # fmt: skip
        optimizer = MuonWithAdamW(optimizer, muon)
    set_hyperparameters(optimizer, config)
    return optimizer


def describe_optimizer(optimizer: torch.optim.Optimizer, config: TrainConfig) -> str:
    """What trains which parameters, in one line for the console and log.jsonl."""
    adamw = f"AdamW (lr {config.lr:g}, betas {config.beta1:g}/{config.beta2:g}, weight decay {config.weight_decay:g})"
    muon_groups = [group for group in optimizer.param_groups if is_muon_group(group)]
    if not muon_groups:
        return f"{adamw} on every parameter"
    matrices = [p for group in muon_groups for p in group["params"]]
    momentum = f"{config.muon_momentum:g}"
    if config.muon_momentum_warmup_steps:
        momentum = f"{config.muon_momentum_start:g} -> {momentum} over {config.muon_momentum_warmup_steps} steps"
    return (
        f"Muon (lr {config.muon_lr:g}, momentum {momentum}, {config.muon_adjust_lr}, weight decay "
        f"{config.muon_weight_decay:g}) on {len(matrices)} block matrices ({sum(p.numel() for p in matrices):,} "
        f"parameters), {adamw} on the rest"
    )


def optimizer_name(groups: list) -> str:
    """train.optimizer that made these (saved) parameter groups: muon when one of them is Muon's."""
    return "muon" if any(isinstance(g, dict) and is_muon_group(g) for g in groups) else "adamw"


MOMENTS = {"adamw": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), "muon": ("momentum_buffer",)}


def check_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer, model: MiniGrok, source: str) -> None:
    """Raise CheckpointError unless `saved` (an optimizer state_dict) fits `optimizer`: the same optimizer
    (train.optimizer), the same groups of the same parameters, and every moment tensor (AdamW's moments, Muon's
    momentum buffer) of its parameter's shape and dtype. A wrong-shaped moment would otherwise reach the fused
    kernel, which reads past the end of it."""
    where = f"{source}/{OPTIMIZER_NAME}"
    template = optimizer.state_dict()["param_groups"]
    groups = saved.get("param_groups")
    if isinstance(groups, list) and (found := optimizer_name(groups)) != (wanted := optimizer_name(template)):
        raise CheckpointError(
            f"{where}: the run was trained with train.optimizer={found}, but this one uses train.optimizer={wanted}: "
            f"resume with --set train.optimizer={found} (an optimizer's state cannot continue another's)"
        )
    if not isinstance(groups, list) or [g.get("params") for g in groups if isinstance(g, dict)] != [
        g["params"] for g in template
    ]:
        raise CheckpointError(
            f"{where}: its parameter groups do not fit this model's optimizer; it belongs to another run"
        )
    names = {id(p): name for name, p in model.named_parameters()}
    params = [(p, optimizer_name([group])) for group in optimizer.param_groups for p in group["params"]]
    for index, values in saved.get("state", {}).items():
        if not 0 <= index < len(params):
            raise CheckpointError(f"{where}: state for parameter {index}, but the model has {len(params)}")
        param, kind = params[index]
        for key, value in values.items():
            expected = (param.shape, param.dtype) if key in MOMENTS[kind] else None
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
