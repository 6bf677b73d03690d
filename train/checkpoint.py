"""Training checkpoints: RUN/ckpt-<step>/ with model, tokenizer, optimizer and trainer state, written atomically.

A checkpoint is assembled in a hidden temporary directory, its manifest (file sizes and sha256) written last, and
renamed into place, so a crash mid-save leaves the earlier checkpoints untouched and no half-written ckpt-<step>;
deleting goes the same way in reverse.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from minigrok.checkpoint import (
    CONFIG_NAME,
    SHARDS_NAME,
    CheckpointError,
    check_files,
    load_model,
    read_json,
    read_manifest,
    read_tensors,
    save_weights,
    write_json,
    write_manifest,
    write_tensors,
)

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng.safetensors"
STATE_KEYS = ("step", "tokens_seen", "elapsed", "best_val", "best_step", "model_config", "train_config")
STATE_KEYS += ("tokenizer_fingerprint", "optimizer_param_groups", "optimizer_scalars")


def is_complete(ckpt: Path) -> bool:
    """A real directory (not a link) holding its manifest and every file the manifest lists; a checkpoint from
    before manifests counts when its trainer_state.json is there. (Damage to a file present, a wrong size or
    sha256, is an error when the checkpoint is loaded, not a reason to pass it over.)"""
    if ckpt.is_symlink() or not ckpt.is_dir():
        return False
    try:
        manifest = read_manifest(ckpt)
    except CheckpointError:
        return True  # present but unreadable: loading it says so
    if manifest is None:
        return (ckpt / STATE_NAME).is_file()
    return all((ckpt / name).is_file() for name in manifest["files"])


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    found = [p for p in run_dir.glob("ckpt-*") if p.name[5:].isdigit() and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run, saying which newer ckpt-<step> it passes over as incomplete;
    FileNotFoundError naming the directory when there is none."""
    found = checkpoint_dirs(run_dir) if run_dir.is_dir() else []
    newest = int(found[-1].name[5:]) if found else -1
    for skipped in sorted(p for p in run_dir.glob("ckpt-*") if p.name[5:].isdigit() and int(p.name[5:]) > newest):
        print(f"{skipped} is incomplete (a file missing, or a link): passed over", file=sys.stderr)
    if not found:
        raise FileNotFoundError(f"--resume: {run_dir} has no checkpoint to resume from; drop --resume to start")
    return found[-1]


def _discard(path: Path) -> None:
    """Remove a checkpoint directory: renamed out of the ckpt-* names first (atomic), so a kill halfway through
    deleting never leaves a half-deleted ckpt-<step> that looks complete. A link is unlinked, its target kept."""
    if path.is_symlink():
        path.unlink()
        return
    doomed = path.with_name(f".{path.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    shutil.rmtree(doomed)


def clear_leftovers(run_dir: Path) -> None:
    """Remove what saves and deletions that crashed left behind."""
    for leftover in [*run_dir.glob(".ckpt-*.tmp"), *run_dir.glob(".ckpt-*.deleting")]:
        shutil.rmtree(leftover, ignore_errors=True)


def staging_dir(run_dir: Path, step: int) -> Path:
    """The hidden directory ckpt-<step> is assembled in before it is renamed into place."""
    return run_dir / f".ckpt-{step}.tmp"


def is_sharded(ckpt: Path) -> bool:
    """A checkpoint of an FSDP run: weights and optimizer moments in shards/, one file per process."""
    return (ckpt / SHARDS_NAME).is_dir()


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], tokenizer, staged: bool = False) -> Path:
    """Write a trainer's state_dict() as RUN/ckpt-<step>/ atomically and return its path.

    Tensors go to safetensors files (model, optimizer moments, RNG states), everything else to trainer_state.json,
    and manifest.json (sizes and sha256 of them all) last, inside a hidden directory renamed into place. `staged`:
    the processes of an FSDP run already wrote their shards into that directory (state["model"] is then None).
    """
    if not staged:
        clear_leftovers(run_dir)
    final, tmp = run_dir / f"ckpt-{step}", staging_dir(run_dir, step)
    try:
        _write_checkpoint(tmp, state, tokenizer)
    except BaseException as error:  # a full disk or a kill: the half-written copy goes, the earlier checkpoints stay
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError):
            kept = checkpoint_dirs(run_dir)
            kept_note = f"{kept[-1].name} is the newest checkpoint kept" if kept else "no checkpoint was saved yet"
            raise OSError(
                f"saving {final} failed ({error}); {kept_note}: free space and resume with --resume"
            ) from error
        raise
    if final.exists() or final.is_symlink():  # the same step saved again (e.g. at the end of a run)
        _discard(final)
    tmp.rename(final)
    return final


def _write_checkpoint(tmp: Path, state: dict[str, Any], tokenizer) -> None:
    tokenizer.save(tmp / "tokenizer.json")
    tensors, scalars = {}, {}
    if state["model"] is None:  # sharded: the weights and moments are in shards/ already
        write_json(tmp / CONFIG_NAME, state["model_config"])
    else:
        save_weights(tmp, state["model_config"], state["model"])
        for index, values in state["optimizer"]["state"].items():
            for key, value in values.items():
                (tensors if torch.is_tensor(value) else scalars)[f"{index}.{key}"] = value
        write_tensors(tmp / OPTIMIZER_NAME, tensors)
    write_tensors(tmp / RNG_NAME, state["rng"])
    plain = {key: value for key, value in state.items() if key not in ("model", "optimizer", "rng")}
    groups = state["optimizer"]["param_groups"]
    write_json(tmp / STATE_NAME, plain | {"optimizer_param_groups": groups, "optimizer_scalars": scalars})
    write_manifest(tmp, state["model_config"])


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """trainer_state.json, checked to be an object with every key a resume reads."""
    state = read_json(ckpt / STATE_NAME)
    if not isinstance(state, dict) or (missing := [key for key in STATE_KEYS if key not in state]):
        what = f"lacks {missing}" if isinstance(state, dict) else f"is a JSON {type(state).__name__}"
        raise CheckpointError(f"{ckpt / STATE_NAME} {what}: it is not a trainer state; resume from another checkpoint")
    return state


def load_checkpoint(ckpt: Path, verify: bool = True) -> dict[str, Any]:
    """The state_dict() that save_checkpoint wrote to `ckpt` (plus "path": where it came from), every file checked
    against the manifest's sizes and, with `verify`, sha256 first."""
    manifest = read_manifest(ckpt)
    if manifest is not None:
        check_files(ckpt, manifest, hashes=verify)
    state = load_trainer_state(ckpt)
    groups = state.pop("optimizer_param_groups")
    state["path"] = str(ckpt)
    state["rng"] = read_tensors(ckpt / RNG_NAME)
    if is_sharded(ckpt):  # the trainer reads the shards into its sharded model (distributed.load_sharded)
        state.pop("optimizer_scalars")
        return state | {"model": None, "optimizer": {"state": None, "param_groups": groups}}
    optimizer_state: dict[int, dict[str, Any]] = {}
    for name, value in [*read_tensors(ckpt / OPTIMIZER_NAME).items(), *state.pop("optimizer_scalars").items()]:
        index, _, key = name.partition(".")
        if not index.isdigit() or not key:
            raise CheckpointError(f"{ckpt / OPTIMIZER_NAME}: tensor {name!r} is not named <parameter>.<key>")
        optimizer_state.setdefault(int(index), {})[key] = value
    state["model"] = load_model(ckpt, verify=False).state_dict()  # already verified above
    state["optimizer"] = {"state": optimizer_state, "param_groups": groups}
    return state


def prune(run_dir: Path, keep_last: int, keep_step: int | None) -> None:
    """Delete all but the newest `keep_last` checkpoints, always keeping the one at `keep_step` (the best)."""
    for ckpt in checkpoint_dirs(run_dir)[:-keep_last]:
        if keep_step is None or int(ckpt.name[5:]) != keep_step:
            _discard(ckpt)


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
