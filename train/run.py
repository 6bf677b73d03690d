"""A run directory from start to resume: its record (run.json: the corpus it trains on), its lock, and the two ways
to open it, start_run and resume_run, which hand back a Trainer ready to train.

`--resume` continues the same run or refuses: it reuses the recorded corpus and stops when that corpus is gone or
changed, or when --data names another one, unless the caller says the data is new on purpose; every changed
train.* field is applied for real and logged, and the fields that define the data cannot change.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO, Any

import torch

from minigrok.checkpoint import CheckpointError, read_json
from minigrok.config import ConfigError, ModelConfig
from minigrok.files import write_json
from minigrok.model import MiniGrok

from . import checkpoint
from .config import TrainConfig
from .corpus import DataError, canonical_data, mixture_fingerprint, parse_data, split_mixture
from .curate import CURATION_FIELDS, Curation, curate
from .data import TokenFiles, prepare_data
from .distill import Teacher
from .distributed import current_world, main_first
from .tokenizer import Tokenizer, check_vocab, load_or_train_tokenizer, padded_vocab_size
from .trainer import LOG_NAME, Trainer

RUN_NAME = "run.json"
LOCK_NAME = ".lock"
# the run's tokenizer and data, made once (--new-data may change the data's fields)
FIXED_ON_RESUME = ("tokenizer_vocab_size", "val_fraction", "text_field", *CURATION_FIELDS)


def _absolute(specs: list[str] | None) -> list[str] | None:
    """Corpus paths and globs made absolute, so a run resumes from any working directory."""
    return [os.path.abspath(spec) for spec in specs] if specs else None


def _describe(specs: list[str] | None) -> str:
    return "the built-in corpus" if specs is None else " ".join(specs)


def _splits(data: list[str] | None, val_data: list[str] | None, config: TrainConfig) -> dict:
    """{split: {source name: CorpusSplit}} of the run's corpus (a mixture's sources, or the one corpus)."""
    return split_mixture(parse_data(data), val_data, config.val_fraction, config.text_field)


def _record_data(run_dir: Path, data: list[str] | None, val_data: list[str] | None, config: TrainConfig) -> None:
    """run.json: the corpus (None: the built-in one), the validation corpus and each split's fingerprint."""
    splits = _splits(data, val_data, config)
    fingerprints = {name: mixture_fingerprint(parts) for name, parts in splits.items()}
    teacher = (_read_record(run_dir) or {}).get("teacher")  # a resumed distillation keeps its teacher
    record = {"data": data, "val_data": val_data, "corpus_fingerprints": fingerprints}
    write_json(run_dir / RUN_NAME, record | ({"teacher": teacher} if teacher else {}))


def _record_teacher(run_dir: Path, teacher: Teacher) -> None:
    """run.json's `teacher`: the path and weights' sha256 of the model a new run distils from."""
    record = _read_record(run_dir) or {}
    write_json(run_dir / RUN_NAME, record | {"teacher": {"path": teacher.path, "sha256": teacher.sha256}})


def _check_teacher(run_dir: Path, teacher: Teacher | None) -> None:
    """--resume continues with the teacher run.json records (the same weights), or without one if it records none."""
    recorded = (_read_record(run_dir) or {}).get("teacher")
    if recorded is None and teacher is not None:
        raise CheckpointError(
            f"--resume: {run_dir} was trained without a teacher: drop --teacher, or distil in a new run (--out)"
        )
    if recorded is not None and teacher is None:
        raise CheckpointError(
            f"--resume: {run_dir} is distilled from {recorded['path']}: pass --teacher {recorded['path']}"
        )
    if recorded is not None and recorded["sha256"] != teacher.sha256:
        raise CheckpointError(
            f"--resume: {run_dir} is distilled from {recorded['path']} (weights sha256 {recorded['sha256'][:12]}), "
            f"but --teacher {teacher.path} holds weights {teacher.sha256[:12]}: pass the run's teacher, or distil "
            "into a new run (--out)"
        )


def _read_record(run_dir: Path) -> dict[str, Any] | None:
    """run.json's content, checked; None for a run written before run.json existed."""
    path = run_dir / RUN_NAME
    if not path.exists():
        return None
    record = read_json(path)
    if not isinstance(record, dict) or not {"data", "val_data", "corpus_fingerprints"} <= set(record):
        raise CheckpointError(f"{path} is not a run record (data, val_data, corpus_fingerprints): restore it")
    return record


def _prepare(
    run_dir: Path, tokenizer: Tokenizer, data: list[str] | None, val_data: list[str] | None, config: TrainConfig
):
    """The run's token shards in run_dir/data, encoded as the config says (reused when fresh)."""
    return prepare_data(
        run_dir / "data",
        tokenizer,
        data,
        val_data,
        config.val_fraction,
        text_field=config.text_field,
        workers=config.data_workers,
        shard_tokens=config.shard_tokens,
        curation=Curation.of(config),
    )


class RunLock:
    """An exclusive lock on a run directory while a process trains into it. The kernel drops it when the holder
    exits or dies, so it is never stale; a second process is refused with the holder's pid.

    Taking it also checks --out before any long work: a path that is a file, or cannot be written, fails here."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.path = run_dir, run_dir / LOCK_NAME
        self.file: IO[str] | None = None

    def __enter__(self) -> RunLock:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ValueError(f"--out {self.run_dir} is a file, not a run directory: choose another --out")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            file = open(self.path, "a+")
        except OSError as error:
            raise ValueError(
                f"--out {self.run_dir} cannot be written ({error.strerror}): choose another --out"
            ) from error
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            raise ValueError(
                f"{self.run_dir} is in use: process {holder} is training into it; wait for it, stop it, "
                "or choose another --out"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        self.file = file
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()  # closing the file releases the lock
            self.file = None


def start_run(
    run_dir: Path,
    model_values: dict[str, Any],
    config: TrainConfig,
    data: list[str] | None,
    val_data: list[str] | None,
    tokenizer_spec: str,
    progress: bool = True,
    teacher: Teacher | None = None,
) -> Trainer:
    """A new run in `run_dir`: tokenizer (trained on the corpus, or loaded), token files, the model initialised
    from train.seed (vocab_size follows the tokenizer unless model_values sets it), and the record of its data.

    Under torchrun rank 0 makes the tokenizer, token files and record first; the other processes then read them."""
    data, val_data = canonical_data(data), _absolute(val_data)

    def prepare() -> tuple[Tokenizer, ModelConfig, TokenFiles]:
        if checkpoint.checkpoint_dirs(run_dir):
            raise ValueError(
                f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose another --out"
            )
        main = current_world().is_main
        if main:  # the log of an earlier start that died before its first checkpoint (a torchrun restart's)
            (run_dir / LOG_NAME).unlink(missing_ok=True)
            train_parts = curate(_splits(data, val_data, config), Curation.of(config))[0]["train"].values()

            def texts():  # every training source's curated text, for a BPE tokenizer to learn from
                return (text for part in train_parts for text in part.clean_documents())

            tokenizer = load_or_train_tokenizer(tokenizer_spec, texts, config.tokenizer_vocab_size)
        else:
            tokenizer = Tokenizer.load(run_dir / "tokenizer.json")  # rank 0 saved it
        model_config = ModelConfig.from_dict({"vocab_size": padded_vocab_size(tokenizer)} | model_values)
        check_vocab(tokenizer, model_config.vocab_size)
        if main:
            tokenizer.save(run_dir / "tokenizer.json")
        prepared = _prepare(run_dir, tokenizer, data, val_data, config)  # others: rank 0 wrote them, nothing to do
        if main:
            _record_data(run_dir, data, val_data, config)
            if teacher is not None:
                _record_teacher(run_dir, teacher)
        return tokenizer, model_config, prepared

    tokenizer, model_config, prepared = main_first(prepare)
    torch.manual_seed(config.seed)  # the seed fixes the initial weights as well as the batches
    return Trainer(MiniGrok(model_config), config, prepared, tokenizer, run_dir, progress=progress, teacher=teacher)


def resume_run(
    run_dir: Path,
    train_overrides: dict[str, Any],
    data: list[str] | None = None,
    val_data: list[str] | None = None,
    new_data: bool = False,
    progress: bool = True,
    teacher: Teacher | None = None,
) -> Trainer:
    """The run in `run_dir`, continued from its newest checkpoint: its model, tokenizer and corpus, its train config
    with `train_overrides` applied (each change logged when training starts). Under torchrun rank 0 checks the
    corpus and brings the token files and run.json up to date first."""
    _check_teacher(run_dir, teacher)
    state, config, changes, tokenizer, prepared = main_first(
        lambda: _open_resumed(run_dir, train_overrides, data, val_data, new_data)
    )
    model = MiniGrok(ModelConfig.from_dict(state["model_config"]))
    trainer = Trainer(model, config, prepared, tokenizer, run_dir, progress, teacher=teacher)
    trainer.load_state_dict(state)
    trainer.changes = changes + trainer.changes  # load_state_dict notes a change of world size
    return trainer


def _open_resumed(
    run_dir: Path, train_overrides: dict[str, Any], data: list[str] | None, val_data: list[str] | None, new_data: bool
) -> tuple[dict[str, Any], TrainConfig, list[str], Tokenizer, TokenFiles]:
    """(checkpoint state, train config, its changes, tokenizer, token files) of the run resume_run continues."""
    state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(run_dir))
    old_config = TrainConfig.from_dict(state["train_config"])
    config = TrainConfig.from_dict(state["train_config"] | train_overrides)
    changes = [
        f"train.{name}: {value!r} -> {getattr(config, name)!r}"
        for name, value in old_config.to_dict().items()
        if getattr(config, name) != value
    ]
    fixed = [name for name in FIXED_ON_RESUME if getattr(config, name) != getattr(old_config, name)]
    if fixed and not (new_data and "tokenizer_vocab_size" not in fixed):
        raise ConfigError(
            f"--resume: train.{fixed[0]} is fixed by the run's {'tokenizer' if fixed[0] == 'tokenizer_vocab_size' else 'data split'}; "
            f"drop the override (or start a new run{'' if fixed[0] == 'tokenizer_vocab_size' else ' or add --new-data'})"
        )
    tokenizer = Tokenizer.load(Path(state["path"]))
    data, val_data, data_change = _resume_data(run_dir, data, val_data, config, new_data)
    prepared = _prepare(run_dir, tokenizer, data, val_data, config)
    if data_change:
        if current_world().is_main:
            _record_data(run_dir, data, val_data, config)
        changes.append(data_change)
    return state, config, changes, tokenizer, prepared


def _record_from_token_files(run_dir: Path, data: list[str] | None, val_data: list[str] | None) -> dict[str, Any]:
    """The record of a run from before run.json: the corpus as given now, and the fingerprints its token files'
    meta.json kept (none, when they are gone: then only --new-data continues)."""
    meta_path = run_dir / "data" / "meta.json"
    splits = (read_json(meta_path) if meta_path.is_file() else {}).get("splits", {})
    fingerprints = {name: stats.get("corpus_fingerprint") for name, stats in splits.items() if isinstance(stats, dict)}
    return {"data": canonical_data(data), "val_data": _absolute(val_data), "corpus_fingerprints": fingerprints}


def _resume_data(
    run_dir: Path, data: list[str] | None, val_data: list[str] | None, config: TrainConfig, new_data: bool
) -> tuple[list[str] | None, list[str] | None, str | None]:
    """(data, val_data, what changed or None) to resume on: the recorded corpus unless --data / --val-data name
    another, which needs `new_data`. Refuses, naming the fix, when the corpus is gone or its files changed since
    the run recorded them."""
    record = _read_record(run_dir) or _record_from_token_files(run_dir, data, val_data)
    old = (record["data"], record["val_data"])
    asked = (canonical_data(data) or old[0], _absolute(val_data) or old[1])
    change = None
    if asked != old:
        if not new_data:
            raise DataError(
                f"--resume: {run_dir} trains on {_describe(old[0])} (validation: {_describe(old[1])}), but "
                f"--data/--val-data name {_describe(asked[0])} (validation: {_describe(asked[1])}): drop them to "
                "continue on the run's corpus, or add --new-data to continue on the new one on purpose"
            )
        change = f"corpus {_describe(old[0])} -> {_describe(asked[0])} (validation {_describe(asked[1])})"
    try:
        splits = _splits(asked[0], asked[1], config)
    except FileNotFoundError as error:
        raise DataError(
            f"--resume: the run's corpus {_describe(asked[0])} is gone ({error}): restore it, or continue on "
            "another corpus with --data PATH --new-data"
        ) from error
    recorded = record["corpus_fingerprints"]
    changed = [name for name, parts in splits.items() if mixture_fingerprint(parts) != recorded.get(name)]
    if changed and change is None:
        if not new_data:
            raise DataError(
                f"--resume: the {' and '.join(changed)} files of {_describe(asked[0])} changed since the run recorded "
                "them (paths, sizes or modification times differ): restore them, or add --new-data to continue on "
                "the corpus as it is now"
            )
        change = f"the {' and '.join(changed)} files of {_describe(asked[0])} changed"
    return asked[0], asked[1], change
