"""Saving and loading models as config.json + model.safetensors: atomic writes, and loads that never run code."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from .model import MiniGrok

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt or disagrees with its config."""


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, then rename it over `path`.

    A crash at any point leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: point at a directory written by save_pretrained")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}): the file is corrupt; re-save the model") from error


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors to safetensors atomically (contiguous copies where needed)."""
    tensors = {name: t.detach().contiguous() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_tensors(
    path: str | Path, expected: dict[str, tuple[int, ...]] | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Load a safetensors file; with `expected`, check it holds exactly those names and shapes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; re-save it")
    try:
        tensors = load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({error}): restore it from a good copy or re-save"
        ) from error
    if expected is None:
        return tensors
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)} but the config implies {tuple(shape)}: "
                "the weights and config.json come from different models"
            )
    return tensors


def save_weights(directory: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """config.json + model.safetensors from a config dict and a state dict."""
    directory = Path(directory)
    write_tensors(directory / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    write_json(directory / CONFIG_NAME, config)


def save_model(model: MiniGrok, directory: str | Path) -> None:
    save_weights(directory, model.config.to_dict(), model.state_dict())


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> MiniGrok:
    from .model import MiniGrok

    directory = Path(directory)
    try:
        config = ModelConfig.from_dict(read_json(directory / CONFIG_NAME))
    except ConfigError as error:
        raise CheckpointError(f"{directory / CONFIG_NAME}: {error}") from error
    with torch.device("meta"):
        model = MiniGrok(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tensors = read_tensors(directory / WEIGHTS_NAME, expected, map_location)
    model.load_state_dict(tensors, assign=True)
    return model
