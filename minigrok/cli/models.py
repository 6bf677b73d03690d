"""`minigrok info`, `export-hf` and `import-hf`: the sizes of a config, and conversion to and from the Llama layout."""

from __future__ import annotations

import argparse

from .arguments import add_checkpoint_arguments, add_config_arguments


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--context", type=int, default=None, help="context length for FLOPs (default: max_seq_len)")


def run_info(args: argparse.Namespace) -> None:
    """Print the resolved config and its report: arithmetic on the shapes, no model is built, whatever its size."""
    from ..config import build_model_config
    from ..report import model_report

    config = build_model_config(args.config, args.set)
    print(f"config: {args.config}")
    for key, value in config.to_dict().items():
        print(f"  {key}: {value}")
    print(model_report(config, args.context))


def add_export_hf_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    parser.add_argument("--out", required=True, help="output directory")


def run_export_hf(args: argparse.Namespace) -> None:
    """Write the checkpoint as a Llama checkpoint; a training checkpoint's tokenizer goes along."""
    from ..hf import export_hf
    from ..model import MiniGrok
    from ..train.checkpoint import resolve_checkpoint
    from ..train.tokenizer import TOKENIZER_NAME
    from .inference import load_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint)
    if (ckpt / TOKENIZER_NAME).is_file():
        model, tokenizer = load_checkpoint(ckpt, verify=not args.no_verify)
    else:
        model, tokenizer = MiniGrok.from_pretrained(ckpt, verify=not args.no_verify), None
    export_hf(model, args.out)
    if tokenizer is not None:
        tokenizer.save_hf(args.out)
    print(f"wrote a Llama checkpoint{' and its tokenizer' if tokenizer else ''} to {args.out} (from {ckpt})")


def add_import_hf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", help="directory with config.json and safetensors weights")
    parser.add_argument("--out", required=True, help="output directory")


def run_import_hf(args: argparse.Namespace) -> None:
    from ..hf import import_hf

    import_hf(args.hf_dir).save_pretrained(args.out)
    print(f"wrote a minigrok checkpoint to {args.out}")
