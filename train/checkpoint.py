"""Training checkpoints: RUN/ckpt-<step>/ with model, tokenizer, optimizer and trainer state, written atomically.

A checkpoint is assembled in a hidden temporary directory and renamed into place, so a crash mid-save leaves
the earlier checkpoints untouched and no half-written ckpt-<step>.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from minigrok.checkpoint import CheckpointError, read_json, read_tensors, save_model, write_json, write_tensors

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng.safetensors"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    found = [p for p in run_dir.glob("ckpt-*") if p.name[5:].isdigit() and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(
    run_dir: Path, step: int, model, tokenizer, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> Path:
    """Write RUN/ckpt-<step>/ atomically and return its path."""
    final = run_dir / f"ckpt-{step}"
    tmp = run_dir / f".ckpt-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that crashed earlier
    save_model(model, tmp)
    tokenizer.save(tmp / "tokenizer.json")
    tensors, param_state = {}, {}
    for index, values in optimizer.state_dict()["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                param_state[f"{index}.{key}"] = value
    write_tensors(tmp / OPTIMIZER_NAME, tensors)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    write_tensors(tmp / RNG_NAME, rng)
    groups = optimizer.state_dict()["param_groups"]
    write_json(tmp / STATE_NAME, state | {"optimizer_param_groups": groups, "optimizer_scalars": param_state})
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


def restore_optimizer(ckpt: Path, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load optimizer moments and step counts saved by save_checkpoint into `optimizer`."""
    template = optimizer.state_dict()
    params = [i for group in template["param_groups"] for i in group["params"]]
    tensors = read_tensors(ckpt / OPTIMIZER_NAME)
    per_param: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(state["optimizer_scalars"].items()):
        index, key = name.split(".", 1)
        if int(index) not in params:
            raise CheckpointError(
                f"{ckpt / OPTIMIZER_NAME}: state for parameter {index} does not fit this model's optimizer"
            )
        per_param.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer_param_groups"]})


def restore_rng(ckpt: Path) -> None:
    rng = read_tensors(ckpt / RNG_NAME)
    torch.set_rng_state(rng["torch"])
    cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)


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
