"""`minigrok bench train`, `bench generate`, `bench data`, `bench serve` and `bench kernels`: training and generation
speed against baselines, the corpus encoder and batch sampler, the server under load, and one op across shapes."""

from __future__ import annotations

import argparse
from pathlib import Path

from .arguments import NO_VERIFY_HELP, add_config_arguments, add_dtype_argument, add_machine_arguments, int_list
from .inference import add_draft_arguments, load_checkpoint, load_draft

# What each op of `bench kernels` sweeps: the attentions take them as --seq-lens, every other op as --sizes.
SWEPT = {
    "attention": "sequence lengths",
    "decode_attention": "KV-cache lengths",
    "rms_norm": "hidden sizes",
    "rope": "hidden sizes",
    "swiglu": "hidden sizes",
    "linear_cross_entropy": "vocab sizes",
}


def set_threads(threads: int | None) -> None:
    """Apply --threads (None keeps torch's choice)."""
    import torch

    if threads:
        torch.set_num_threads(threads)


def print_figures(figures: dict) -> None:
    """One line per figure: its name right-aligned, then its value (floats to 4 significant digits)."""
    for key, value in figures.items():
        print(f"{key:>24}  {value:,.4g}" if isinstance(value, float) else f"{key:>24}  {value}")


def add_bench_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_dtype_argument(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model (after 2 warm-up steps)")
    add_machine_arguments(parser, default_device="cpu")
    parser.add_argument(
        "--activation-checkpointing",
        choices=["none", "full", "selective"],
        default="none",
        help="recompute each block in backward (full), or all but attention (selective), to save memory",
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        choices=["hf", "naive-loss", "checkpointing-none", "checkpointing-full", "checkpointing-selective", "muon"],
        default=[],
        help="baselines: transformers' LlamaForCausalLM; our model with full logits + F.cross_entropy; "
        "our model in another activation-checkpointing mode (peak memory and tokens/s as fractions of ours); "
        "our model trained by train.optimizer=muon (muon_step_vs_ours: its step time over AdamW's)",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="N > 1: DDP over N CPU processes (gloo), each on threads/N threads, against one process on all the "
        "threads, at the same global --batch-size",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile both models before timing")
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")


def run_bench_train(args: argparse.Namespace) -> None:
    """Print every figure of bench_train, and write them to --json."""
    from .. import bench
    from ..config import build_model_config
    from ..files import write_json

    set_threads(args.threads)
    config = build_model_config(args.config, args.set)
    shape = (config, args.batch_size, args.seq_len)
    if args.nproc != 1:
        if args.compare or args.compile or args.device != "cpu":
            raise ValueError(
                "--nproc compares DDP processes with threads on the CPU: drop --compare, --compile and --device"
            )
        result = bench.bench_processes(
            *shape, args.nproc, args.dtype, args.steps, activation_checkpointing=args.activation_checkpointing
        )
    else:
        result = bench.bench_train(
            *shape,
            args.dtype,
            steps=args.steps,
            compare=tuple(args.compare),
            device=args.device,
            compile=args.compile,
            activation_checkpointing=args.activation_checkpointing,
        )
    print_figures(result)
    unstable = [
        key.removesuffix("step_stable").rstrip("_") or "ours"
        for key, value in result.items()
        if key.endswith("step_stable") and value is False
    ]
    if unstable:
        fewer_threads = "" if args.nproc != 1 else "--threads 1 and "  # --nproc needs threads for every process
        print(
            f"step times of {', '.join(unstable)} are unstable: rerun with {fewer_threads}more --steps, on a quiet machine"
        )
    if args.json:
        write_json(args.json, result)


def add_bench_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", help="corpus to encode: files, directories, globs (default: built-in)")
    parser.add_argument("--tokenizer", default="bpe", help="bpe (trained on the data first, untimed), byte, or a path")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the bpe tokenizer trained")
    parser.add_argument("--workers", type=int_list, default=[1, 2], help="encoding processes to time, e.g. 1,2")
    parser.add_argument("--repeats", type=int, default=1, help="encodings per number of workers, in turns")
    parser.add_argument(
        "--sizes",
        type=int_list,
        help="sampler: corpus sizes in tokens (default: 1e6,1e7,1e8,1e9), e.g. 1000000,1000000000",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="sampler: rows per batch")
    parser.add_argument("--seq-len", type=int, default=2048, help="sampler: tokens per row")
    parser.add_argument(
        "--shard-tokens", type=int, default=None, help="sampler: tokens per shard (default: the trainer's)"
    )
    parser.add_argument("--batches", type=int, default=200, help="sampler: timed batches per corpus size")
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")


def run_bench_data(args: argparse.Namespace) -> None:
    """Time the encoder and the sampler, print both tables, and write them to --json."""
    from ..bench.data import SAMPLER_SIZES, bench_encoding, bench_sampler, format_data_tables
    from ..files import write_json
    from ..train.corpus import split_corpus
    from ..train.tokenizer import load_or_train_tokenizer

    for name in ("vocab_size", "repeats", "batch_size", "seq_len", "shard_tokens", "batches"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value} must be a positive integer")
    for name, values in (("--workers", args.workers), ("--sizes", args.sizes or [])):
        if any(value < 1 for value in values):
            raise ValueError(f"{name} {values}: every value must be a positive integer")
    train = split_corpus(args.data)["train"]
    tokenizer = load_or_train_tokenizer(args.tokenizer, train.clean_documents, args.vocab_size)
    result = {
        "tokenizer": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "encoding": bench_encoding(args.data, tokenizer, tuple(args.workers), args.repeats),
        "sampler": bench_sampler(
            args.batch_size, args.seq_len, tuple(args.sizes or SAMPLER_SIZES), args.shard_tokens, args.batches
        ),
    }
    print(format_data_tables(result))
    if args.json:
        write_json(args.json, result)


def add_bench_generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 8], help="comma-separated, e.g. 1,8")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens generated per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each kind per model (after a warm-up)")
    add_machine_arguments(parser, default_device="cpu")
    parser.add_argument(
        "--compare", nargs="+", choices=["hf"], default=[], help="baseline: transformers' LlamaForCausalLM.generate"
    )
    parser.add_argument("--compile", action="store_true", help="generate with compile=True (cold compile timed)")
    parser.add_argument(
        "--checkpoint", default=None, help="trained (or quantised) checkpoint or run directory instead of --config"
    )
    parser.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    parser.add_argument(
        "--data",
        nargs="+",
        help="with --checkpoint: text the prompts are cut from (default: the built-in corpus' validation files)",
    )
    add_draft_arguments(parser)
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")


def run_bench_generate(args: argparse.Namespace) -> None:
    """Print every figure of bench_generate per batch size, write them to --json, and fail if the greedy tokens
    differ from transformers' or, with --draft, the speculative tokens from the target's alone."""
    import sys

    from ..bench import bench_generate
    from ..config import build_model_config
    from ..files import write_json

    set_threads(args.threads)
    model = draft = text = None
    if args.checkpoint:
        import torch

        from ..train.data import encode_corpus

        if args.set:
            raise ValueError("--set changes a --config preset; a --checkpoint keeps its own config: drop --set")
        model, tokenizer = load_checkpoint(args.checkpoint, verify=not args.no_verify)
        draft = load_draft(args.draft, tokenizer, verify=not args.no_verify) if args.draft else None
        text = torch.from_numpy(encode_corpus(tokenizer, args.data)[0].astype("int64"))  # prompts cut from text
    elif args.draft or args.data:
        flag = "--draft" if args.draft else "--data"
        raise ValueError(f"{flag} needs --checkpoint: the target a draft drafts for, whose tokenizer encodes the text")
    config = model.config if model is not None else build_model_config(args.config, args.set)
    result = bench_generate(
        config,
        tuple(args.batch_sizes),
        args.prompt_len,
        args.new_tokens,
        compare=tuple(args.compare),
        compile=args.compile,
        repeats=args.repeats,
        device=args.device,
        model=model,
        draft=draft,
        num_draft_tokens=args.num_draft_tokens,
        text_tokens=text,
    )
    print_figures({key: value for key, value in result.items() if key != "batches"})
    for row in result["batches"]:
        print()
        print_figures(row)
    if args.json:
        write_json(args.json, result)
    if result.get("greedy_tokens_match_hf") is False:
        print(
            "minigrok bench generate: error: greedy tokens differ from transformers' with the same weights",
            file=sys.stderr,
        )
        raise SystemExit(1)
    if result.get("speculative_tokens_match_target") is False:
        print(
            "minigrok bench generate: error: speculative greedy tokens differ from the target's alone", file=sys.stderr
        )
        raise SystemExit(1)


def add_bench_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None, help="serve this checkpoint or run (default: --config, random)")
    add_config_arguments(parser)
    add_dtype_argument(parser)
    parser.add_argument("--concurrency", type=int_list, default=[1, 4, 16], help="clients at once, e.g. 1,4,16")
    parser.add_argument("--requests", type=int, default=32, help="streaming completions at each concurrency")
    parser.add_argument("--max-tokens", type=int, default=64, help="greedy tokens asked for per request")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per concurrency to start requests in")
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")


def run_bench_serve(args: argparse.Namespace) -> None:
    """Print the load test's figures per concurrency, and write them to --json."""
    from ..bench.serve import bench_serve
    from ..config import build_model_config
    from ..files import write_json

    config = None if args.checkpoint else build_model_config(args.config, args.set)
    result = bench_serve(
        args.checkpoint,
        config,
        tuple(args.concurrency),
        args.requests,
        args.max_tokens,
        args.time_limit,
        args.dtype,
        args.threads,
    )
    for level in result["levels"]:
        print_figures(level)
        print()
    if "throughput_16_vs_1" in result:
        print_figures({"throughput_16_vs_1": result["throughput_16_vs_1"]})
    if args.json:
        write_json(args.json, result)


def add_bench_kernels_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("op", choices=list(SWEPT))
    add_machine_arguments(parser, default_device=None)
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: fp32 CPU, bf16 GPU")
    parser.add_argument("--mode", choices=["fwd", "bwd", "fwd+bwd", "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="a tiny sweep (for tests)")
    parser.add_argument(
        "--seq-lens", type=int_list, help="attention: the swept sequence (decode: KV-cache) lengths, e.g. 1024,4096"
    )
    parser.add_argument(
        "--sizes",
        type=int_list,
        help="the swept sizes of the other ops: hidden sizes (rms_norm, rope, swiglu), vocab sizes (linear_cross_entropy)",
    )
    parser.add_argument("--rows", type=int, help="fixed rows or tokens (rms_norm, rope, swiglu, linear_cross_entropy)")
    parser.add_argument("--hidden", type=int, help="fixed hidden size (linear_cross_entropy)")
    parser.add_argument("--head-dims", type=int_list, help="attention head dims, e.g. 64,128")
    parser.add_argument("--gqa", type=int_list, help="attention query heads per KV head, e.g. 1,4,16")
    parser.add_argument("--causal", choices=["both", "on", "off"], default=None, help="attention masks (default: both)")
    parser.add_argument("--providers", type=lambda text: text.split(","), help="comma-separated subset to run")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per row on CPU (GPU: do_bench decides)")
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--csv", help="write the rows to this CSV file")
    parser.add_argument("--plot", help="write a PNG of throughput (or time and peak memory) against the swept size")
    parser.add_argument("--out-dir", help="write <op>.json, <op>.csv and <op>.png here")


def swept_sizes(args: argparse.Namespace) -> list[int] | None:
    """The values the op sweeps: --seq-lens for the attentions, --sizes for the others; the other flag is refused."""
    right, wrong = ("--seq-lens", "--sizes") if args.op.endswith("attention") else ("--sizes", "--seq-lens")
    values = {"--seq-lens": args.seq_lens, "--sizes": args.sizes}
    if values[wrong] is not None:
        raise ValueError(f"{wrong} does not apply to {args.op}, which sweeps {SWEPT[args.op]}: give them with {right}")
    return values[right]


def run_bench_kernels(args: argparse.Namespace) -> None:
    """Time the op, print the table and write the files asked for; on CPU the Triton kernels run interpreted."""
    import os

    import torch

    sizes = swept_sizes(args)
    set_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device here; use --device cpu")
    if device == "cpu":
        # Triton reads this when a kernel is defined, so it must be set before anything imports minigrok.kernels.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from ..bench import bench_kernels, format_table, plot_rows, write_csv, write_json

    options = {name: getattr(args, name) for name in ("rows", "hidden", "head_dims", "gqa", "causal")}
    options["sizes"] = sizes
    rows = bench_kernels(
        args.op,
        device,
        args.dtype or ("fp32" if device == "cpu" else "bf16"),
        args.mode,
        args.quick,
        args.providers,
        args.repeats,
        progress=True,
        **{name: value for name, value in options.items() if value is not None},
    )
    print(format_table(rows))
    out_dir = Path(args.out_dir) if args.out_dir else None
    json_path = args.json or (out_dir and out_dir / f"{args.op}.json")
    csv_path = args.csv or (out_dir and out_dir / f"{args.op}.csv")
    plot_path = args.plot or (out_dir and out_dir / f"{args.op}.png")
    if json_path:
        write_json(rows, json_path)
    if csv_path:
        write_csv(rows, csv_path)
    if plot_path:
        plot_rows(rows, plot_path)
    for path in (json_path, csv_path, plot_path):
        if path:
            print(f"wrote {path}")
