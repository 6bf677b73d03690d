"""The `minigrok` command: a table of subcommands, each importing what it needs only when it runs, so start-up
stays light."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NamedTuple

from . import ablate, benchmarks, inference, models, serving, training
from .inference import inference_dtype

__all__ = ["COMMANDS", "build_parser", "inference_dtype", "main"]


class Command(NamedTuple):
    """One subcommand: its one-line help, the function adding its arguments and the function running it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


class Group(NamedTuple):
    """A subcommand made of subcommands, like `bench`."""

    help: str
    commands: dict[str, Command]


COMMANDS: dict[str, Command | Group] = {
    "info": Command(
        "parameters, FLOPs, KV-cache and checkpoint sizes of a config", models.add_info_arguments, models.run_info
    ),
    "export-hf": Command(
        "convert a minigrok checkpoint to the Hugging Face Llama layout",
        models.add_export_hf_arguments,
        models.run_export_hf,
    ),
    "import-hf": Command(
        "convert a Hugging Face Llama checkpoint to minigrok", models.add_import_hf_arguments, models.run_import_hf
    ),
    "quantize": Command(
        "write a packed int8 / int4 weight-only quantised checkpoint",
        models.add_quantize_arguments,
        models.run_quantize,
    ),
    "train": Command(
        "train a model (default: demo-cpu on the built-in corpus), then sample",
        training.add_train_arguments,
        training.run_train,
    ),
    "consolidate": Command(
        "write the model.safetensors of a sharded (FSDP) training checkpoint",
        training.add_consolidate_arguments,
        training.run_consolidate,
    ),
    "generate": Command(
        "stream a continuation of a prompt from a checkpoint", inference.add_generate_arguments, inference.run_generate
    ),
    "eval": Command(
        "loss and bits per byte of a checkpoint on a corpus", inference.add_eval_arguments, inference.run_eval
    ),
    "serve": Command(
        "an OpenAI-compatible HTTP server with continuous batching (the serve extra)",
        serving.add_serve_arguments,
        serving.run_serve,
    ),
    "plot": Command("PNG of train/val curves of one or more runs", training.add_plot_arguments, training.run_plot),
    "ablate": Command(
        "train a grid of config variants at equal budget and seeds; table (Markdown, CSV) and plot of val bpb",
        ablate.add_ablate_arguments,
        ablate.run_ablate,
    ),
    "bench": Group(
        "benchmarks",
        {
            "train": Command(
                "training tokens/s and MFU, optionally against transformers' Llama",
                benchmarks.add_bench_train_arguments,
                benchmarks.run_bench_train,
            ),
            "data": Command(
                "corpus encoding MB/s with 1 and 2 workers, and the sampler's cost per batch up to 1e9 tokens",
                benchmarks.add_bench_data_arguments,
                benchmarks.run_bench_data,
            ),
            "generate": Command(
                "greedy decode tokens/s, prefill and first-token latency, optionally against transformers' Llama",
                benchmarks.add_bench_generate_arguments,
                benchmarks.run_bench_generate,
            ),
            "serve": Command(
                "requests/s, latency and time to first token of minigrok serve at 1, 4 and 16 concurrent clients",
                benchmarks.add_bench_serve_arguments,
                benchmarks.run_bench_serve,
            ),
            "kernels": Command(
                "time one op per provider across shapes; table, JSON, CSV and a plot",
                benchmarks.add_bench_kernels_arguments,
                benchmarks.run_bench_kernels,
            ),
        },
    ),
}


def add_commands(parser: argparse.ArgumentParser, commands: dict[str, Command | Group], dest: str) -> None:
    """One subparser per entry of `commands`; the chosen command's name lands in args.<dest>, its function in args.run."""
    subparsers = parser.add_subparsers(dest=dest, required=True)
    for name, entry in commands.items():
        subparser = subparsers.add_parser(name, help=entry.help, description=entry.help)
        if isinstance(entry, Group):
            add_commands(subparser, entry.commands, dest=name)
        else:
            entry.add_arguments(subparser)
            subparser.set_defaults(run=entry.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minigrok", description=__doc__)
    add_commands(parser, COMMANDS, dest="command")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit code says how it ended (2: bad config or input, 1: the machine's fault)."""
    args = build_parser().parse_args(argv)
    from ..train.trainer import TrainingStopped

    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:  # config, input and checkpoint errors carry their own fix
        print(f"minigrok {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the machine's fault, not the input's: a full disk, a read-only folder
        print(f"minigrok {args.command}: error: {error}", file=sys.stderr)
        return 1
    except TrainingStopped as stopped:
        if str(stopped):  # empty on the ranks other than 0 of a torchrun job
            print(stopped, file=sys.stderr)
        return 128 + stopped.signum
    except KeyboardInterrupt:
        print(f"minigrok {args.command}: stopped at once", file=sys.stderr)
        return 130
    return 0
