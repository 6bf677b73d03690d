"""TrainConfig: every knob of a training run, validated where it is made."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from minigrok.config import ConfigError, check_fields, show
from minigrok.machine import TORCH_DTYPES

SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("auto", *TORCH_DTYPES)


@dataclass
class TrainConfig:
    """Batch, budget, optimizer, precision and bookkeeping of a run.

    The budget is max_steps, max_tokens or max_minutes (the first reached ends the run; at least one is needed).
    schedule: "cosine" decays to min_lr_ratio * lr after warmup; "wsd" (warmup-stable-decay) holds lr and decays
    linearly over the last decay_fraction of the budget; "constant" holds it.
    dtype: "auto" times fp32 against bf16 autocast (and fp16 on CUDA) on the model's matmuls at start, in under a
    second, and trains in the fastest; fp32 / bf16 / fp16 force one.
    """

    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    max_steps: int | None = None
    max_tokens: int | None = None
    max_minutes: float | None = None
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "auto"
    compile: bool = False
    eval_every: int = 100
    eval_tokens: int = 65536
    log_every: int = 10
    ckpt_every: int = 200
    keep_last: int = 2
    seed: int = 0
    device: str = "auto"
    tokenizer_vocab_size: int = 4096
    val_fraction: float = 0.05
    peak_flops: float | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "grad_accum", "eval_every", "eval_tokens", "log_every", "ckpt_every"):
            self._check_int(name, minimum=1)
        for name in ("warmup_steps", "seed"):
            self._check_int(name, minimum=0)
        self._check_int("keep_last", minimum=1)
        self._check_int("tokenizer_vocab_size", minimum=259)
        for name in ("max_steps", "max_tokens"):
            if getattr(self, name) is not None:
                self._check_int(name, minimum=1)
        if self.max_steps is None and self.max_tokens is None and self.max_minutes is None:
            raise ConfigError("no budget: set train.max_steps, train.max_tokens or train.max_minutes")
        for name in ("lr", "max_minutes", "peak_flops"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"train.{name}={show(value)} must be a positive number")
        for name in ("min_lr_ratio", "decay_fraction", "val_fraction", "beta1", "beta2"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ConfigError(f"train.{name}={show(value)} must lie in [0, 1]")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ConfigError(f"train.{name}={show(value)} must be >= 0 (0 turns it off)")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule={show(self.schedule)} is unknown: choose one of {SCHEDULES}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"train.dtype={show(self.dtype)} is unknown: choose one of {DTYPES}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"train.device={show(self.device)} is unknown: use auto, cpu, cuda or cuda:N")

    def _check_int(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if isinstance(value, float) and value.is_integer():  # budgets read naturally as 1e6
            value = int(value)
            setattr(self, name, value)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(f"train.{name}={show(value)} must be an integer >= {minimum}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    @property
    def total_steps(self) -> int | None:
        """Steps the budget allows when it is counted in steps or tokens; None for a time-only budget."""
        limits = [self.max_steps] if self.max_steps else []
        if self.max_tokens:
            limits.append(max(1, self.max_tokens // self.tokens_per_step))
        return min(limits) if limits else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        check_fields("TrainConfig", cls, values)
        return cls(**values)
