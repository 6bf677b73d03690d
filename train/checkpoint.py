"""Training checkpoints: RUN/ckpt-<step>/ with model, tokenizer, optimizer and trainer state, written atomically.

A checkpoint is assembled in a hidden temporary directory and renamed into place, so a crash mid-save leaves
the earlier checkpoints untouched and no half-written ckpt-<step>.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from minigrok.checkpoint import (
    CheckpointError,
    load_model,
    read_json,
    read_tensors,
    save_weights,
    write_json,
    write_tensors,
)

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng.safetensors"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    found = [p for p in run_dir.glob("ckpt-*") if p.name[5:].isdigit() and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run; FileNotFoundError naming the directory when there is none."""
    found = checkpoint_dirs(run_dir) if run_dir.is_dir() else []
    if not found:
        raise FileNotFoundError(f"--resume: {run_dir} has no checkpoint to resume from; drop --resume to start")
    return found[-1]


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], tokenizer) -> Path:
    """Write a trainer's state_dict() as RUN/ckpt-<step>/ atomically and return its path.

    Tensors go to safetensors files (model, optimizer moments, RNG states), everything else to trainer_state.json.
    """
    final = run_dir / f"ckpt-{step}"
    tmp = run_dir / f".ckpt-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that crashed earlier
    save_weights(tmp, state["model_config"], state["model"])
    tokenizer.save(tmp / "tokenizer.json")
    tensors, scalars = {}, {}
    for index, values in state["optimizer"]["state"].items():
        for key, value in values.items():
            (tensors if torch.is_tensor(value) else scalars)[f"{index}.{key}"] = value
    write_tensors(tmp / OPTIMIZER_NAME, tensors)
    write_tensors(tmp / RNG_NAME, state["rng"])
    plain = {key: value for key, value in state.items() if key not in ("model", "optimizer", "rng")}
    groups = state["optimizer"]["param_groups"]
    write_json(tmp / STATE_NAME, plain | {"optimizer_param_groups": groups, "optimizer_scalars": scalars})
    if final.exists():  # the same step saved again (e.g. at the end of a run): swap, never leave a gap
        old = run_dir / f".ckpt-{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return final


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    return read_json(ckpt / STATE_NAME)


def load_checkpoint(ckpt: Path) -> dict[str, Any]:
    """The state_dict() that save_checkpoint wrote to `ckpt`, plus "path": the checkpoint it came from."""
    state = load_trainer_state(ckpt)
    optimizer_state: dict[int, dict[str, Any]] = {}
    for name, value in list(read_tensors(ckpt / OPTIMIZER_NAME).items()) + list(state.pop("optimizer_scalars").items()):
        index, key = name.split(".", 1)
        if not index.isdigit():
            raise CheckpointError(f"{ckpt / OPTIMIZER_NAME}: tensor {name!r} is not named <parameter>.<key>")
        optimizer_state.setdefault(int(index), {})[key] = value
    return state | {
        "path": str(ckpt),
        "model": load_model(ckpt).state_dict(),
        "optimizer": {"state": optimizer_state, "param_groups": state.pop("optimizer_param_groups")},
        "rng": read_tensors(ckpt / RNG_NAME),
    }


def prune(run_dir: Path, keep_last: int, keep_step: int | None) -> None:
    """Delete all but the newest `keep_last` checkpoints, always keeping the one at `keep_step` (the best)."""
    for ckpt in checkpoint_dirs(run_dir)[:-keep_last]:
        if keep_step is None or int(ckpt.name[5:]) != keep_step:
            shutil.rmtree(ckpt)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or a run directory (its newest checkpoint)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    found = checkpoint_dirs(path) if path.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"{path} is neither a checkpoint (config.json + model.safetensors) nor a run directory with ckpt-<step>/"
        )
    return found[-1]
