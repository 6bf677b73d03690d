"""Saving and loading models as config.json + model.safetensors: atomic writes, and loads that never run code."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ConfigError, ModelConfig
from .files import atomic_write, write_json

if TYPE_CHECKING:
    from .model import MiniGrok

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "manifest.json"
QUANTIZATION_NAME = "quantization.json"  # a quantised checkpoint's record (minigrok.quantize)
SHARDS_NAME = "shards"  # a sharded (FSDP) training checkpoint's weights, one safetensors file per process
WEIGHT_DTYPES = {"F32", "BF16", "F16"}


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt or disagrees with its config."""


class ConfigChangedWarning(UserWarning):
    """config.json was edited after the weights were saved (a shape-neutral change such as rope_theta)."""


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

    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as error:  # safetensors reports a full disk as its own error, not an OSError
            raise OSError(f"could not write {path}: {error}") from error

    atomic_write(path, write)


def read_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file (never runs code); a missing, truncated or corrupt one is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; re-save it")
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({error}): restore it from a good copy or re-save"
        ) from error


def read_header(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, safetensors dtype)} from a safetensors file's header alone: nothing is loaded or allocated."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; re-save it")
    try:
        with safe_open(path, framework="pt") as file:
            return {
                name: (tuple(file.get_slice(name).get_shape()), file.get_slice(name).get_dtype())
                for name in file.keys()
            }
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({error}): restore it from a good copy or re-save"
        ) from error


def check_weights(path: Path, expected: dict[str, tuple[int, ...]], fixed_dtypes: dict[str, str] | None = None) -> None:
    """Raise CheckpointError unless the file's header holds exactly `expected` names and shapes, the tensors named
    in `fixed_dtypes` in their safetensors dtype (a quantised model's integers and scales) and the rest in one
    floating dtype (float32, bfloat16 or float16, which the model takes as it is)."""
    header = read_header(path)
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, shape in expected.items():
        if header[name][0] != tuple(shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {header[name][0]} but the config implies {tuple(shape)}: "
                "the weights and config.json come from different models"
            )
    fixed_dtypes = fixed_dtypes or {}
    for name, dtype in fixed_dtypes.items():
        if header[name][1] != dtype:
            raise CheckpointError(
                f"{path}: tensor {name!r} is {header[name][1]} but its record implies {dtype}: the weights and the "
                "JSON beside them come from different saves; save the model again"
            )
    floats = {name: entry for name, entry in header.items() if name not in fixed_dtypes}
    dtypes = [dtype for _, dtype in floats.values()]
    usual = max(set(dtypes), key=dtypes.count)
    odd = [n for n, (_, dtype) in floats.items() if dtype not in WEIGHT_DTYPES or dtype != usual]
    if odd or usual not in WEIGHT_DTYPES:
        name = (odd or list(floats))[0]
        raise CheckpointError(
            f"{path}: tensor {name!r} is {header[name][1]} among {sorted(set(dtypes))}; weights must all be one of "
            f"{sorted(WEIGHT_DTYPES)}: convert the file (e.g. tensors.float()) and save it again"
        )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: str | Path, config: dict) -> None:
    """manifest.json: the size and sha256 of every other file (and of the shards/ of a sharded checkpoint) and the
    config they were saved with. Written last, so a directory whose manifest matches its files is complete, and a
    flipped bit is caught on load."""
    directory = Path(directory)
    files = {
        p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted([*directory.iterdir(), *directory.glob(f"{SHARDS_NAME}/*")])
        if p.is_file() and p.name not in (MANIFEST_NAME, CONFIG_NAME) and not p.name.startswith(".")
    }
    write_json(directory / MANIFEST_NAME, {"format": 1, "config": config, "files": files})


def read_manifest(directory: Path) -> dict | None:
    """manifest.json's content, checked for shape; None where there is none (a directory saved before manifests)."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return None
    manifest = read_json(path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
        for v in files.values()
    ):
        raise CheckpointError(f"{path} is not a manifest (files with bytes and sha256): restore it or re-save")
    return manifest


def check_files(directory: Path, manifest: dict, names: list[str] | None = None, hashes: bool = True) -> None:
    """Raise CheckpointError unless each listed file (default: all) is present with its recorded size and, with
    `hashes`, its sha256 (reading every byte: about a second per GB)."""
    for name in manifest["files"] if names is None else names:
        path, entry = directory / name, manifest["files"].get(name)
        if entry is None:
            raise CheckpointError(f"{directory / MANIFEST_NAME} does not list {name}: the checkpoint is incomplete")
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{path} is missing or not the {entry['bytes']} bytes it was saved with: restore it")
        if hashes and file_sha256(path) != entry["sha256"]:
            raise CheckpointError(
                f"{path} does not match its sha256 in {MANIFEST_NAME}: the file is damaged (a flipped bit or a partial "
                "copy); restore it from a good copy (or load with verification off to use it anyway)"
            )


def save_weights(directory: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """config.json + model.safetensors from a config dict and a state dict."""
    directory = Path(directory)
    write_tensors(directory / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    write_json(directory / CONFIG_NAME, config)


def save_model(model: MiniGrok, directory: str | Path) -> None:
    save_weights(directory, model.config.to_dict(), model.state_dict())
    write_manifest(directory, model.config.to_dict())


def read_config(directory: Path) -> ModelConfig:
    """The ModelConfig in directory/config.json, checked: a JSON object of known fields with valid values."""
    path = directory / CONFIG_NAME
    values = read_json(path)
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} holds a JSON {type(values).__name__}, not an object of config fields: re-save")
    try:
        return ModelConfig.from_dict(values)
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}") from error


def load_model(directory: str | Path, map_location: str | torch.device = "cpu", verify: bool = True) -> MiniGrok:
    """The model saved in `directory`, checked before anything is allocated: config.json's fields, the weights'
    names, shapes and dtypes against it (from the safetensors header), and, with `verify` and a manifest, the
    weights' sha256. A config edited since saving loads, with a warning naming the changed fields."""
    from .model import MiniGrok, parameter_shapes

    directory = Path(directory)
    config = read_config(directory)
    if (directory / QUANTIZATION_NAME).is_file():
        raise CheckpointError(
            f"{directory} is a quantised checkpoint ({QUANTIZATION_NAME}): load it with "
            "minigrok.quantize.load_quantized; generate and eval read it as it is"
        )
    if (directory / SHARDS_NAME).is_dir() and not (directory / WEIGHTS_NAME).exists():
        raise CheckpointError(
            f"{directory} holds its weights in shards (an FSDP training checkpoint): "
            f"write its {WEIGHTS_NAME} with `minigrok consolidate {directory}` first"
        )
    manifest = read_manifest(directory)
    if manifest is not None:
        saved = manifest.get("config") or {}
        try:  # fields added to ModelConfig since saving take their defaults here, as they do in config.json
            saved = ModelConfig.from_dict(saved).to_dict()
        except ConfigError:
            pass  # compared as it was written
        if changed := sorted(k for k in set(saved) | set(config.to_dict()) if saved.get(k) != config.to_dict().get(k)):
            warnings.warn(
                f"{directory / CONFIG_NAME} differs from the config the weights were saved with in "
                + ", ".join(f"{k} ({saved.get(k)!r} -> {config.to_dict().get(k)!r})" for k in changed[:5])
                + ": outputs will differ from the saved model's",
                ConfigChangedWarning,
                stacklevel=2,
            )
        check_files(directory, manifest, [WEIGHTS_NAME], hashes=verify)
    check_weights(directory / WEIGHTS_NAME, parameter_shapes(config))
    with torch.device("meta"):
        model = MiniGrok(config)
    model.load_state_dict(read_tensors(directory / WEIGHTS_NAME, map_location), assign=True)
    return model
