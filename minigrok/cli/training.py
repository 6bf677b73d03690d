"""`minigrok train` and `plot`: a run from a preset and a corpus (fresh or resumed), then its curves."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from ..config import ConfigError
from .arguments import NO_VERIFY_HELP, add_config_arguments
from .inference import inference_dtype, load_checkpoint, stream_text


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, training=True)
    parser.add_argument(
        "--data",
        nargs="+",
        help="training corpus: files, directories, globs, .jsonl, .parquet, saved datasets (default: built-in); "
        "or a mixture of name=path:weight entries (replaces the config's data: list)",
    )
    parser.add_argument("--val-data", nargs="+", help="validation corpus (default: held out from --data by file hash)")
    parser.add_argument("--tokenizer", default="bpe", help="bpe (trained on the data), byte, or a tokenizer.json path")
    parser.add_argument("--out", help="run directory (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument(
        "--new-data",
        action="store_true",
        help="with --resume: continue on the corpus --data names (or on the run's changed files) on purpose, logged",
    )
    parser.add_argument(
        "--teacher",
        help="distil from this model (train.distill_*): a minigrok checkpoint or run directory, or a Hugging Face "
        "Llama directory, of the student's vocabulary (e.g. --tokenizer TEACHER_RUN/tokenizer.json)",
    )
    parser.add_argument("--samples", type=int, default=3, help="samples printed after training")
    parser.add_argument("--sample-tokens", type=int, default=120, help="tokens per sample")


def run_train(args: argparse.Namespace) -> None:
    """Start or resume the run in --out, holding its lock, then train and sample; under torchrun, in every process
    (rank 0 holds the lock and writes the run's files).

    A worker group that torchrun restarts (--max-restarts) continues from the newest checkpoint, as --resume would."""
    from ..train import checkpoint
    from ..train.config import TrainConfig, build_run_configs
    from ..train.distributed import process_group
    from ..train.run import RunLock, resume_run, start_run

    model_values, train_config, config_data, overrides = build_run_configs(args.config, args.set)
    data = args.data or config_data  # --data replaces the config's data: list
    run_dir = Path(args.out or Path("runs") / Path(args.config).stem)
    if args.resume and overrides["model"]:
        raise ConfigError(
            f"--resume keeps the checkpoint's model; drop the model overrides {sorted(overrides['model'])}"
        )
    if args.new_data and not args.resume:
        raise ValueError("--new-data continues a run on another corpus: it needs --resume")
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    resume = args.resume or (restart > 0 and bool(checkpoint.checkpoint_dirs(run_dir)))
    if resume:  # the process group follows the run's own device and timeout
        saved = checkpoint.load_trainer_state(checkpoint.latest_checkpoint(run_dir))["train_config"]
        train_config = TrainConfig.from_dict(saved | overrides["train"])
    teacher = load_teacher(args.teacher) if args.teacher else None
    with process_group(train_config.device, train_config.dist_timeout_s) as world:
        if resume and not args.resume:
            print(f"restart {restart} by torchrun: resuming from {checkpoint.latest_checkpoint(run_dir)}")
        with RunLock(run_dir) if world.is_main else contextlib.nullcontext():
            if resume:
                trainer = resume_run(run_dir, overrides["train"], data, args.val_data, args.new_data, teacher=teacher)
            else:
                if "vocab_size" not in overrides["model"]:  # the preset's is a placeholder: follow the tokenizer
                    model_values.pop("vocab_size", None)
                trainer = start_run(
                    run_dir, model_values, train_config, data, args.val_data, args.tokenizer, teacher=teacher
                )
            train_and_sample(trainer, args)


def load_teacher(path: str):
    """The --teacher model, in eval mode: a Hugging Face Llama directory (import_hf), else a minigrok checkpoint or run
    directory (its newest checkpoint, checked against its manifest), with the sha256 of its weight files and the
    vocabulary of its tokenizer.json (a Hugging Face directory without one is taken, with a warning)."""
    from ..checkpoint import read_json
    from ..train.checkpoint import resolve_checkpoint
    from ..train.distill import Teacher, weights_sha256
    from ..train.tokenizer import TOKENIZER_NAME, vocabulary_hash

    directory = Path(path)
    if (directory / "config.json").is_file() and "model_type" in read_json(directory / "config.json"):
        from ..hf import _weight_files, import_hf

        model, weight_files = import_hf(directory).eval(), _weight_files(directory)
        tokenizer_file = directory / TOKENIZER_NAME
        if not tokenizer_file.is_file():
            print(
                f"warning: --teacher {directory} has no {TOKENIZER_NAME}, so nothing checks that it shares the "
                "student's tokenizer: make sure the student's --tokenizer is the one the teacher was trained with",
                file=sys.stderr,
            )
            return Teacher(model, str(directory.resolve()), weights_sha256(weight_files))
        vocabulary = vocabulary_hash(read_json(tokenizer_file))
    else:
        model, tokenizer = load_checkpoint(path)
        ckpt = resolve_checkpoint(path)
        weight_files = sorted(ckpt.glob("*.safetensors"))
        tokenizer_file, vocabulary = ckpt / TOKENIZER_NAME, vocabulary_hash(tokenizer.to_dict())
    return Teacher(model, str(directory.resolve()), weights_sha256(weight_files), tokenizer_file.resolve(), vocabulary)


def train_and_sample(trainer, args: argparse.Namespace) -> None:
    """Train to the end of the budget, then print the final figures and args.samples samples (on rank 0)."""
    from ..checkpoint import read_json
    from ..train.curate import CURATION_NAME, summary

    data, tokenizer, train_config = trainer.data, trainer.tokenizer, trainer.config
    splits = data.meta["splits"]
    print(f"data: {splits['train']['n_tokens']:,} train / {splits['val']['n_tokens']:,} val tokens")
    if (report := data.root / CURATION_NAME).is_file():
        print(f"{summary(read_json(report))}; {report} has examples")
    sources = splits["train"]["sources"]
    if len(sources) > 1:
        total = sum(source["weight"] for source in sources.values())
        for name, source in sources.items():
            print(
                f"  {name}: {source['n_tokens']:,} train tokens, weight {source['weight']:g} ({source['weight'] / total:.0%} of rows)"
            )
    print(trainer.model.report(context=train_config.seq_len))
    final = trainer.train()
    model = trainer.plain_model()  # fsdp: gathered from every process's shards
    if model is None:  # not rank 0
        return
    print(
        f"step {final['step']}: val loss {final['val_loss']:.4f}, val {final['val_bpb']:.4f} bits/byte; "
        f"run in {trainer.run_dir}"
    )
    model.eval().cpu()
    dtype = inference_dtype("auto", model, rows=1) if args.samples else "fp32"
    for index in range(args.samples):
        print(f"--- sample {index + 1} ---")
        stream_text(
            model,
            tokenizer,
            "",
            dtype,
            max_new_tokens=args.sample_tokens,
            temperature=0.8,
            top_k=40,
            seed=train_config.seed + index,
        )


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run directories (each with log.jsonl)")
    parser.add_argument("--out", default=None, help="PNG path (default: <first run>/curves.png)")


def run_plot(args: argparse.Namespace) -> None:
    from ..train.plot import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out)}")


def add_consolidate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a sharded (FSDP) ckpt-<step>, or a run directory (its newest checkpoint)")
    parser.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)


def run_consolidate(args: argparse.Namespace) -> None:
    """Write a sharded checkpoint's model.safetensors, so generate, eval and export-hf read it."""
    from ..train.checkpoint import resolve_checkpoint
    from ..train.distributed import consolidate

    print(f"wrote {consolidate(resolve_checkpoint(args.checkpoint), verify=not args.no_verify)}")
