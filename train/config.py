"""TrainConfig: every knob of a training run, validated where it is made."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from minigrok.config import ConfigError, ModelConfig, check_fields, load_yaml, parse_overrides, show
from minigrok.functional.distillation import KINDS as DISTILL_KINDS
from minigrok.machine import TORCH_DTYPES
from minigrok.model import CHECKPOINTING
from minigrok.quantize import DEFAULT_GROUP_SIZE, GROUP_SIZES

from .curate import Curation
from .shards import SHARD_TOKENS
from .tracking import check_log_to

SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("auto", *TORCH_DTYPES)
PARALLEL = ("auto", "ddp", "fsdp", "none")
QAT = ("none", "int8", "int4")
OPTIMIZERS = ("adamw", "muon")
MUON_ADJUST_LR = ("match_rms_adamw", "original")


@dataclass
class TrainConfig:
    """Batch, budget, optimizer, precision and bookkeeping of a run.

    Each field's docstring is its meaning in `--help-config` (read by minigrok.config.field_docs).
    """

    batch_size: int = 16
    """sequences per micro-batch in each process (the global batch is world size x batch_size x grad_accum)"""
    seq_len: int = 256
    """tokens per training sequence"""
    grad_accum: int = 1
    """micro-batches accumulated into each optimizer step"""
    max_steps: int | None = None
    """budget in optimizer steps (the first budget reached ends the run; at least one is needed)"""
    max_tokens: int | None = None
    """budget in training tokens (of all processes together)"""
    max_minutes: float | None = None
    """budget in minutes of wall-clock time"""
    lr: float = 3e-3
    """peak learning rate"""
    min_lr_ratio: float = 0.1
    """final learning rate of cosine and wsd, as a fraction of lr"""
    warmup_steps: int = 50
    """steps of linear warmup up to lr"""
    schedule: str = "cosine"
    """cosine (decays to min_lr_ratio * lr), wsd (holds lr, then decays over decay_fraction) or constant"""
    decay_fraction: float = 0.2
    """share of the budget over which wsd decays, at its end"""
    weight_decay: float = 0.1
    """AdamW weight decay of the matrices (norm gains never decay; 0 turns it off)"""
    moe_aux_loss_weight: float = 0.01
    """with model.n_experts: weight of the MoE load-balancing loss added to the training loss (0 turns it off)"""
    moe_z_loss_weight: float = 0.001
    """with model.n_experts: weight of the MoE router z-loss added to the training loss (0 turns it off)"""
    beta1: float = 0.9
    """AdamW decay rate of the gradient's running mean"""
    beta2: float = 0.95
    """AdamW decay rate of the squared gradient's running mean"""
    optimizer: str = "adamw"
    """adamw, or muon (Muon on the blocks' 2-D matrices, AdamW on the rest; not fsdp: it needs whole matrices)"""
    muon_lr: float = 3e-3
    """with optimizer=muon: peak learning rate of the Muon matrices (the schedule scales it as it scales lr)"""
    muon_momentum: float = 0.95
    """with optimizer=muon: Muon's momentum (Nesterov), reached after muon_momentum_warmup_steps"""
    muon_momentum_start: float = 0.85
    """with optimizer=muon: Muon's momentum at step 0 when muon_momentum_warmup_steps > 0"""
    muon_momentum_warmup_steps: int = 0
    """with optimizer=muon: steps over which the momentum rises linearly from muon_momentum_start (0 = no warm-up)"""
    muon_weight_decay: float = 0.1
    """with optimizer=muon: decoupled weight decay of the Muon matrices (times their lr; 0 turns it off)"""
    muon_adjust_lr: str = "match_rms_adamw"
    """with optimizer=muon: match_rms_adamw (AdamW-sized steps: muon_lr reads like lr) or original (wants ~0.02)"""
    grad_clip: float = 1.0
    """largest global gradient norm (0 turns clipping off)"""
    dtype: str = "auto"
    """matmul precision: auto (the fastest here, timed at start in under a second), fp32, bf16 or fp16"""
    compile: bool = False
    """wrap the model in torch.compile"""
    activation_checkpointing: str = "none"
    """per-block recompute in backward to save memory: none, full (keeps each block's input) or selective (+ attention)"""
    eval_every: int = 100
    """steps between validation evaluations"""
    eval_tokens: int = 65536
    """validation tokens scored at each evaluation"""
    eval_tasks: list[str] | None = None
    """downstream tasks scored while training (builtin or JSONL paths, as minigrok eval --tasks; comma-separated)"""
    eval_tasks_every: int | None = None
    """steps between task evaluations (null: at the end only); their time counts in the run's like validation's"""
    log_every: int = 10
    """steps between lines of log.jsonl"""
    log_to: str = "jsonl"
    """metric writers, comma-separated: jsonl (log.jsonl, always written), tensorboard, wandb (honours WANDB_MODE)"""
    ckpt_every: int = 200
    """steps between checkpoints"""
    keep_last: int = 2
    """newest checkpoints kept in the run directory (the best one is kept too)"""
    seed: int = 0
    """seed of the initial weights and of the batch order"""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N"""
    tokenizer_vocab_size: int = 4096
    """vocabulary of the BPE tokenizer trained on the data (fixed once the run starts)"""
    val_fraction: float = 0.05
    """share of the corpus held out for validation when no --val-data is given (fixed once the run starts)"""
    peak_flops: float | None = None
    """matmul peak in FLOP/s behind MFU (null = measured on this machine)"""
    data_workers: int = 1
    """processes that tokenise the corpus (1: this process; the tokens are the same for any number)"""
    text_field: str = "text"
    """field of .jsonl records, Parquet column or dataset field that holds each document's text"""
    shard_tokens: int = SHARD_TOKENS
    """tokens per file of the encoded corpus (data/<split>/<name>/shard-*.bin)"""
    dedup: str = Curation.dedup
    """drop duplicate documents before encoding, across files and sources, validation against training too: none, exact (same text once NFKC-normalised, case-folded, whitespace collapsed) or near (MinHash LSH; the curate extra) (fixed once the run starts)"""
    near_dup_threshold: float = Curation.near_dup_threshold
    """with dedup=near: estimated Jaccard similarity of word 5-gram sets from which a document is a duplicate (fixed once the run starts)"""
    min_doc_chars: int = Curation.min_doc_chars
    """drop documents shorter than this many characters before encoding (0 keeps all; fixed once the run starts)"""
    max_repeated_line_fraction: float = Curation.max_repeated_line_fraction
    """drop documents whose share of non-blank lines repeating an earlier line exceeds this (1 keeps all; fixed once the run starts)"""
    max_non_text_fraction: float = Curation.max_non_text_fraction
    """drop documents whose share of control characters, U+FFFD and invalid UTF-8 bytes exceeds this (1 keeps all; fixed once the run starts)"""
    parallel: str = "auto"
    """under torchrun: ddp (replicated weights), fsdp (sharded weights, FSDP2) or none; auto = ddp when several processes"""
    dist_timeout_s: float = 600.0
    """seconds a collective waits for the other processes before failing (a rank that died or hung)"""
    qat: str = "none"
    """quantisation-aware training: none, int8 or int4 (the forward sees the weights minigrok quantize would pack)"""
    qat_group_size: int = DEFAULT_GROUP_SIZE
    """inputs per scale of train.qat=int4 (32, 64 or 128; it must divide every quantised weight's inputs)"""
    qat_start_step: int = 0
    """step from which QAT fake-quantises (e.g. 0.7 x max_steps: float training first, QAT for the rest)"""
    qat_include_embedding: bool = False
    """QAT also fake-quantises the embedding (the tied head) and an untied head, as quantize --include-embedding"""
    distill_alpha: float = 0.5
    """with --teacher: weight of the distillation KL (times T^2) against the cross-entropy's 1 - alpha"""
    distill_temperature: float = 1.0
    """with --teacher: softmax temperature T of both models' distributions in the KL"""
    distill_kind: str = "forward"
    """with --teacher: forward (KL(teacher || student)) or reverse (KL(student || teacher))"""
    distill_teacher_dtype: str = "fp32"
    """with --teacher: the teacher's weights in fp32, bf16 (half the memory) or int8 (its projections quantised)"""

    # Processes training together: not a field (nothing to --set); the trainer sets it from torchrun's WORLD_SIZE,
    # so the global batch, token counts and token budgets count every process.
    world_size = 1

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "grad_accum", "eval_every", "eval_tokens", "log_every", "ckpt_every"):
            self._check_int(name, minimum=1)
        for name in ("warmup_steps", "seed"):
            self._check_int(name, minimum=0)
        self._check_int("keep_last", minimum=1)
        self._check_int("data_workers", minimum=1)
        self._check_int("shard_tokens", minimum=1)
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ConfigError(f"train.text_field={show(self.text_field)} must be a field name, e.g. text")
        self._check_int("tokenizer_vocab_size", minimum=259)
        self._check_int("min_doc_chars", minimum=0)
        Curation.of(self)  # checks the curation fields
        for name in ("max_steps", "max_tokens", "eval_tasks_every"):
            if getattr(self, name) is not None:
                self._check_int(name, minimum=1)
        if isinstance(self.eval_tasks, str):  # --set train.eval_tasks=builtin,tasks/qa.jsonl
            self.eval_tasks = [task for task in self.eval_tasks.split(",") if task]
        tasks = self.eval_tasks
        if tasks is not None and not (isinstance(tasks, list) and all(isinstance(t, str) and t for t in tasks)):
            raise ConfigError(
                f"train.eval_tasks={show(tasks)} must be a list of task names or JSONL paths, e.g. [builtin]"
            )
        if self.eval_tasks_every is not None and not tasks:
            raise ConfigError(
                f"train.eval_tasks_every={self.eval_tasks_every} but train.eval_tasks is empty: name the tasks "
                "(e.g. train.eval_tasks=builtin) or drop eval_tasks_every"
            )
        if self.max_steps is None and self.max_tokens is None and self.max_minutes is None:
            raise ConfigError("no budget: set train.max_steps, train.max_tokens or train.max_minutes")
        for name in ("lr", "muon_lr", "max_minutes", "peak_flops", "dist_timeout_s"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"train.{name}={show(value)} must be a positive number")
        for name in ("min_lr_ratio", "decay_fraction", "val_fraction", "beta1", "beta2"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ConfigError(f"train.{name}={show(value)} must lie in [0, 1]")
        for name in ("weight_decay", "muon_weight_decay", "grad_clip", "moe_aux_loss_weight", "moe_z_loss_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ConfigError(f"train.{name}={show(value)} must be >= 0 (0 turns it off)")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule={show(self.schedule)} is unknown: choose one of {SCHEDULES}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"train.dtype={show(self.dtype)} is unknown: choose one of {DTYPES}")
        if self.parallel not in PARALLEL:
            raise ConfigError(f"train.parallel={show(self.parallel)} is unknown: choose one of {PARALLEL}")
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ConfigError(
                f"train.activation_checkpointing={show(self.activation_checkpointing)} is unknown: "
                f"choose one of {CHECKPOINTING}"
            )
        check_log_to(self.log_to)
        self._check_muon()
        self._check_qat()
        self._check_distillation()
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"train.device={show(self.device)} is unknown: use auto, cpu, cuda or cuda:N")

    def _check_muon(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train.optimizer={show(self.optimizer)} is unknown: choose one of {OPTIMIZERS}")
        for name in ("muon_momentum", "muon_momentum_start"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ConfigError(f"train.{name}={show(value)} must lie in [0, 1), e.g. 0.95")
        self._check_int("muon_momentum_warmup_steps", minimum=0)
        if self.muon_adjust_lr not in MUON_ADJUST_LR:
            raise ConfigError(
                f"train.muon_adjust_lr={show(self.muon_adjust_lr)} is unknown: choose one of {MUON_ADJUST_LR}"
            )
        if self.optimizer == "muon" and self.parallel == "fsdp":
            raise ConfigError(
                "train.optimizer=muon does not go with train.parallel=fsdp: Muon orthogonalises each whole matrix, "
                "and FSDP leaves each process a shard of it; use train.parallel=ddp, or train.optimizer=adamw"
            )

    def _check_qat(self) -> None:
        if self.qat not in QAT:
            raise ConfigError(f"train.qat={show(self.qat)} is unknown: choose one of {QAT}")
        if self.qat_group_size not in GROUP_SIZES or isinstance(self.qat_group_size, bool):
            raise ConfigError(
                f"train.qat_group_size={show(self.qat_group_size)} is unsupported: choose one of {GROUP_SIZES}"
            )
        self._check_int("qat_start_step", minimum=0)
        if not isinstance(self.qat_include_embedding, bool):
            raise ConfigError(f"train.qat_include_embedding={show(self.qat_include_embedding)} must be true or false")
        total = self.total_steps
        if self.qat != "none" and total is not None and self.qat_start_step >= total:
            raise ConfigError(
                f"train.qat_start_step={self.qat_start_step} is not before the last of the {total} steps: QAT would "
                f"never run; set it below {total}, e.g. {int(0.7 * total)}"
            )

    def _check_distillation(self) -> None:
        alpha, temperature = self.distill_alpha, self.distill_temperature
        if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
            raise ConfigError(f"train.distill_alpha={show(alpha)} must lie in [0, 1]")
        if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ConfigError(f"train.distill_temperature={show(temperature)} must be a positive number, e.g. 2")
        if self.distill_kind not in DISTILL_KINDS:
            raise ConfigError(f"train.distill_kind={show(self.distill_kind)} is unknown: choose one of {DISTILL_KINDS}")
        if self.distill_teacher_dtype not in ("fp32", "bf16", "int8"):
            raise ConfigError(
                f"train.distill_teacher_dtype={show(self.distill_teacher_dtype)} must be fp32, bf16 or int8"
            )

    def _check_int(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if isinstance(value, float) and value.is_integer():  # budgets read naturally as 1e6
            value = int(value)
            setattr(self, name, value)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(f"train.{name}={show(value)} must be an integer >= {minimum}")

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over every process: world size x batch_size x grad_accum."""
        return self.world_size * self.batch_size * self.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def total_steps(self) -> int | None:
        """Steps the budget allows when it is counted in steps or tokens; None for a time-only budget."""
        limits = [self.max_steps] if self.max_steps else []
        if self.max_tokens:
            limits.append(max(1, self.max_tokens // self.tokens_per_step))
        return min(limits) if limits else None

    def budget_spent(self, step: int, elapsed: float) -> bool:
        """Whether a run at `step` after `elapsed` seconds of training has reached the end of its budget."""
        return (self.total_steps is not None and step >= self.total_steps) or (
            self.max_minutes is not None and elapsed >= 60 * self.max_minutes
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        check_fields("TrainConfig", cls, values)
        return cls(**values)


RUN_SECTIONS = {"model": ModelConfig, "train": TrainConfig}
SOURCE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass
class DataSourceConfig:
    """One entry of a run config's `data:` list: a source of the training mixture, as --data name=path:weight."""

    name: str
    path: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not SOURCE_NAME.fullmatch(self.name):
            raise ConfigError(f"data[].name={show(self.name)} must be a word of letters, digits, _ . -, e.g. code")
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError(
                f"data[{self.name}].path={show(self.path)} must be a file, directory or glob, e.g. data/{self.name}"
            )
        weight = self.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (0 < weight < math.inf):
            raise ConfigError(f"data[{self.name}].weight={show(weight)} must be a positive number, e.g. 1")

    def spec(self) -> str:
        """The --data entry that names this source."""
        return f"{self.name}={self.path}:{self.weight}"


def data_specs(config: str, entries: Any) -> list[str] | None:
    """A run config's `data:` list of {name, path, weight} as --data entries (None when it has none)."""
    if entries is None:
        return None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(
            f"config {config!r}: data={show(entries)} must be a list of sources, e.g. [{{name: code, path: data/code, weight: 3}}]"
        )
    sources = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ConfigError(f"config {config!r}: data entry {show(entry)} must be a mapping of name, path and weight")
        check_fields("data", DataSourceConfig, entry)
        if missing := [name for name in ("name", "path") if name not in entry]:
            raise ConfigError(f"config {config!r}: data entry {show(entry)} has no {' or '.join(missing)}: add it")
        sources.append(DataSourceConfig(**entry))
    names = [source.name for source in sources]
    if twice := sorted({name for name in names if names.count(name) > 1}):
        raise ConfigError(f"config {config!r}: data names {twice[0]!r} twice: give each source its own name")
    return [source.spec() for source in sources]


def build_run_configs(
    config: str, overrides: list[str]
) -> tuple[dict[str, Any], TrainConfig, list[str] | None, dict[str, dict[str, Any]]]:
    """(model field values, TrainConfig, the data: section as --data entries, the --set overrides by section) from a
    preset or YAML path."""
    data = load_yaml(config)
    for section in data:
        if section not in (*RUN_SECTIONS, "data"):
            raise ConfigError(
                f"config {config!r} has an unknown section {section!r}: only 'model', 'train' and 'data' exist"
            )
    parsed = parse_overrides(overrides, RUN_SECTIONS)
    train_config = TrainConfig.from_dict(dict(data.get("train") or {}) | parsed["train"])
    return dict(data.get("model") or {}) | parsed["model"], train_config, data_specs(config, data.get("data")), parsed
