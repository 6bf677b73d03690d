"""Arguments that several commands take, each defined once: config and overrides, checkpoint, dtype, machine."""

from __future__ import annotations

import argparse
import re

NO_VERIFY_HELP = "skip the sha256 check of the checkpoint's files against its manifest (about a second per GB)"


def int_list(text: str) -> list[int]:
    """A comma-separated list of integers, e.g. 512,1024."""
    try:
        return [int(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 512,1024") from None


def device_name(text: str) -> str:
    """cpu, cuda or cuda:N."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N")
    return text


class HelpConfig(argparse.Action):
    """--help-config: print every field --set takes, with its default and meaning, and exit as --help does."""

    def __init__(self, option_strings: list[str], dest: str, training: bool = False, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.training = training

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from ..config import ModelConfig, describe_fields

        sections = {"model": ModelConfig}
        if self.training:
            from ..train.config import RUN_SECTIONS

            sections = RUN_SECTIONS
        print(describe_fields(sections))
        parser.exit()


def add_config_arguments(parser: argparse.ArgumentParser, training: bool = False) -> None:
    """--config, --set and --help-config: a preset or YAML file, overrides of its fields, and the list of fields.

    `training` adds the train section to the model's."""
    fields = "model.<field> or train.<field>" if training else "a model field"
    parser.add_argument("--config", default="demo-cpu", help="preset name or YAML path (default: demo-cpu)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help=f"override {fields} (see --help-config)"
    )
    parser.add_argument(
        "--help-config",
        action=HelpConfig,
        training=training,
        help="list every field --set takes, with its default and meaning, and exit",
    )


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint and --no-verify: the checkpoint a command reads, and whether its files are hashed first."""
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint (save_pretrained or ckpt-<step>) or run directory (its newest)"
    )
    parser.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """--dtype of a command that runs a model: auto measures the fastest safe dtype here."""
    parser.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="matmul precision (default: auto, the fastest safe dtype measured on this machine in under a second)",
    )


def add_machine_arguments(parser: argparse.ArgumentParser, default_device: str | None) -> None:
    """--device and --threads of a benchmark; a `default_device` of None means cuda when available."""
    default = default_device or "cuda when available"
    parser.add_argument(
        "--device", type=device_name, default=default_device, help=f"cpu, cuda or cuda:N (default: {default})"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
