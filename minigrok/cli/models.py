"""`minigrok info`, `export-hf`, `import-hf` and `quantize`: the sizes of a config, conversion to and from the Llama
layout, and packed int8 / int4 checkpoints."""

from __future__ import annotations

import argparse

from .arguments import add_checkpoint_arguments, add_config_arguments


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--context",
        type=int,
        default=None,
        help="context length for FLOPs and windowed layers' KV bytes (default: max_seq_len)",
    )


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
    from ..quantize import is_quantized
    from ..train.checkpoint import resolve_checkpoint
    from ..train.tokenizer import TOKENIZER_NAME
    from .inference import load_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint)
    if is_quantized(ckpt):
        raise ValueError(
            f"{ckpt} is quantised: the Llama layout takes float weights; export the checkpoint it came from"
        )
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


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    parser.add_argument(
        "--bits",
        type=int,
        choices=[8, 4],
        default=None,
        help="8: per output channel; 4: grouped (default: the run's train.qat)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        choices=[32, 64, 128],
        default=None,
        help="4 bits (default: the run's QAT group, else 64)",
    )
    parser.add_argument(
        "--include-embedding",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="quantise the embedding (the tied head) and an untied head too (default: as the run's QAT, else not)",
    )
    parser.add_argument("--out", default=None, help="output directory (default: the checkpoint's, -int8 / -int4-g64)")


def qat_defaults(args: argparse.Namespace, ckpt) -> None:
    """Fill --bits, --group-size and --include-embedding left unset from the QAT the checkpoint was trained with
    (train.qat* in its trainer_state.json), and warn where the result differs: those weights were trained for other
    ones."""
    import sys

    from ..checkpoint import read_json
    from ..quantize import DEFAULT_GROUP_SIZE
    from ..train.checkpoint import STATE_NAME
    from ..train.qat import QAT_BITS

    state = read_json(ckpt / STATE_NAME) if (ckpt / STATE_NAME).is_file() else {}
    train = state.get("train_config") if isinstance(state, dict) else None
    qat = QAT_BITS.get(train.get("qat")) if isinstance(train, dict) else None
    if qat is None:
        if args.bits is None:
            raise ValueError(f"{ckpt} was not trained with QAT (train.qat): give --bits 8 or --bits 4")
        args.include_embedding = bool(args.include_embedding)
        return
    trained = {
        "bits": qat,
        "group_size": train["qat_group_size"] if qat == 4 else None,
        "include_embedding": train["qat_include_embedding"],
    }
    args.bits = args.bits or qat
    if args.include_embedding is None:
        args.include_embedding = trained["include_embedding"]
    if args.bits == 4 and args.group_size is None:
        args.group_size = trained["group_size"] or DEFAULT_GROUP_SIZE
    used = {name: getattr(args, name) for name in trained}
    print(f"{ckpt} was trained with train.qat=int{qat}: {trained}")
    if used != trained:
        print(f"warning: quantising with {used}: not the weights the run trained with", file=sys.stderr)


def run_quantize(args: argparse.Namespace) -> None:
    """Write a packed int8 / int4 checkpoint (with the tokenizer) that generate and eval read, and say its size; the
    settings default to the run's QAT."""
    from pathlib import Path

    from ..checkpoint import WEIGHTS_NAME
    from ..quantize import DEFAULT_GROUP_SIZE, quantize_model, save_quantized
    from ..report import model_report
    from ..train.checkpoint import resolve_checkpoint
    from .inference import load_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint)
    qat_defaults(args, ckpt)
    model, tokenizer = load_checkpoint(ckpt, verify=not args.no_verify)
    group_size = args.group_size or (DEFAULT_GROUP_SIZE if args.bits == 4 else None)
    name = f"int{args.bits}" + (f"-g{group_size}" if group_size else "") + ("-emb" if args.include_embedding else "")
    out = Path(args.out or f"{ckpt}-{name}")
    if out.resolve() == ckpt.resolve():
        raise ValueError(f"--out {out} is the checkpoint being quantised: choose another directory")
    quantize_model(model, args.bits, args.group_size, args.include_embedding)
    tokenizer.save(out)
    save_quantized(model, out)
    size, fp32_size = (out / WEIGHTS_NAME).stat().st_size, model_report(model.config).checkpoint_bytes["fp32"]
    print(
        f"wrote {name} to {out}: {WEIGHTS_NAME} {size / 2**20:.2f} MiB, {size / fp32_size:.3f} of the fp32 weights "
        f"({fp32_size / 2**20:.2f} MiB); {len(model.quantization.tensors)} weights quantised"
    )
