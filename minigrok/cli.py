"""The `minigrok` command. Each subcommand imports what it needs when it runs, so start-up stays light."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from .config import ConfigError, ModelConfig, check_fields, load_yaml


def parse_overrides(pairs: list[str], sections: dict[str, type]) -> dict[str, dict[str, Any]]:
    """Turn ["model.dim=128", "train.seed=3", "n_layers=4"] into {"model": {"dim": 128}, "train": {"seed": 3}, ...}.

    A key without a section belongs to the first section. Values are parsed as YAML scalars (4, 1e-3, true, null).
    """
    first = next(iter(sections))
    overrides: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r} is not key=value: write e.g. --set {first}.dim=128")
        section, dot, field = key.rpartition(".")
        section = section if dot else first
        if section not in sections:
            raise ConfigError(f"--set {pair!r}: unknown section {section!r}; use one of {list(sections)}")
        check_fields(sections[section].__name__, sections[section], {field: None})
        overrides[section][field] = yaml.safe_load(value)
    return overrides


def build_model_config(config: str, overrides: list[str]) -> ModelConfig:
    """ModelConfig from a preset or YAML path with --set overrides applied."""
    data = load_yaml(config)
    values = dict(data.get("model", data)) | parse_overrides(overrides, {"model": ModelConfig})["model"]
    return ModelConfig.from_dict(values)


def cmd_info(args: argparse.Namespace) -> None:
    from .model import MiniGrok

    config = build_model_config(args.config, args.set)
    import torch

    with torch.device("meta"):  # shapes only: nothing is allocated, so even large presets report instantly
        model = MiniGrok(config)
    print(f"config: {args.config}")
    for key, value in config.to_dict().items():
        print(f"  {key}: {value}")
    print(model.report(args.context))


def cmd_export_hf(args: argparse.Namespace) -> None:
    from .hf import export_hf
    from .model import MiniGrok

    export_hf(MiniGrok.from_pretrained(args.checkpoint), args.out)
    print(f"wrote a Llama checkpoint to {args.out}")


def cmd_import_hf(args: argparse.Namespace) -> None:
    from .hf import import_hf

    import_hf(args.hf_dir).save_pretrained(args.out)
    print(f"wrote a minigrok checkpoint to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minigrok", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="parameters, FLOPs, KV-cache and checkpoint sizes of a config")
    info.add_argument("--config", default="demo-cpu", help="preset name or YAML path (default: demo-cpu)")
    info.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model field")
    info.add_argument("--context", type=int, default=None, help="context length for FLOPs (default: max_seq_len)")
    info.set_defaults(run=cmd_info)

    export = commands.add_parser("export-hf", help="convert a minigrok checkpoint to the Hugging Face Llama layout")
    export.add_argument("--checkpoint", required=True, help="directory written by save_pretrained")
    export.add_argument("--out", required=True, help="output directory")
    export.set_defaults(run=cmd_export_hf)

    imp = commands.add_parser("import-hf", help="convert a Hugging Face Llama checkpoint to minigrok")
    imp.add_argument("hf_dir", help="directory with config.json and safetensors weights")
    imp.add_argument("--out", required=True, help="output directory")
    imp.set_defaults(run=cmd_import_hf)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:  # config, input and checkpoint errors carry their own fix
        print(f"minigrok {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
