"""Run tracking beside log.jsonl (train.log_to): TensorBoard and Weights & Biases writers fed the same records.

Each writer gets every record the trainer logs, its numbers as scalars under log.jsonl's own field names at the
record's step. tensorboard and wandb are optional extras, imported only when train.log_to names them.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from minigrok.checkpoint import CheckpointError, read_json
from minigrok.config import ConfigError, show
from minigrok.files import write_json

LOG_TARGETS = ("jsonl", "tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"
WANDB_RUN_NAME = "wandb.json"  # the wandb run id, so that --resume continues the same wandb run


def check_log_to(log_to: str) -> list[str]:
    """The writer names of train.log_to ("jsonl,tensorboard"), or ConfigError naming the bad one."""
    names = log_to.split(",") if isinstance(log_to, str) else [log_to]
    for name in names:
        if name not in LOG_TARGETS:
            raise ConfigError(
                f"train.log_to={show(log_to)}: {show(name)} is not a writer; "
                f"give comma-separated names from {LOG_TARGETS}, e.g. jsonl,tensorboard"
            )
    return names


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a log record but its step (text, lists and dicts stay in log.jsonl alone)."""
    return {
        name: value
        for name, value in record.items()
        if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class TensorBoardWriter:
    """Event files in <run>/tensorboard. Events at or past `purge_step` that an earlier stretch of the run wrote are
    dropped by TensorBoard's reader, as a resume drops log.jsonl's lines past its checkpoint."""

    def __init__(self, run_dir: Path, purge_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(run_dir / TENSORBOARD_DIR, purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    """A wandb run under <run>/wandb, at log.jsonl's steps. A fresh run gets a new id, kept in <run>/wandb.json; a
    resumed one continues that id. wandb's own settings apply: WANDB_MODE=offline writes without a network (upload
    later with `wandb sync <run>/wandb/offline-run-*`), WANDB_PROJECT names the project (default minigrok)."""

    def __init__(self, run_dir: Path, resumed: bool, config: dict[str, Any]):
        import wandb

        id_path = run_dir / WANDB_RUN_NAME
        if resumed and id_path.is_file():
            run_id = read_json(id_path).get("id") if isinstance(read_json(id_path), dict) else None
            if not isinstance(run_id, str):
                raise CheckpointError(f"{id_path} holds no wandb run id: delete it to continue in a new wandb run")
        else:
            run_id = secrets.token_hex(4)  # wandb's own ids are 8 lowercase letters and digits too
            write_json(id_path, {"id": run_id})
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "minigrok"),
            name=run_dir.resolve().name,
            id=run_id,
            resume="allow",
            dir=run_dir,
            config=config,
        )

    def write(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


class Tracking:
    """The open writers; write() hands each record to all of them. Empty until open_tracking makes them."""

    def __init__(self, writers: list | None = None):
        self.writers = writers or []

    def write(self, record: dict[str, Any]) -> None:
        for writer in self.writers:
            writer.write(record)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []


def open_tracking(log_to: str, run_dir: Path, step: int, config: dict[str, Any]) -> Tracking:
    """The writers train.log_to names besides jsonl, for a stretch of the run starting at `step` (0: a fresh run,
    which also drops any events an earlier attempt left; else a resume, which keeps those up to `step`)."""
    names = check_log_to(log_to)
    writers: list = []
    if "tensorboard" in names:
        writers.append(TensorBoardWriter(run_dir, purge_step=step + 1 if step else 0))
    if "wandb" in names:
        writers.append(WandbWriter(run_dir, resumed=step > 0, config=config))
    return Tracking(writers)
