"""The `minigrok` command. Each subcommand imports what it needs when it runs, so start-up stays light."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, build_model_config


def cmd_info(args: argparse.Namespace) -> None:
    from .report import model_report

    config = build_model_config(args.config, args.set)
    print(f"config: {args.config}")
    for key, value in config.to_dict().items():
        print(f"  {key}: {value}")
    print(model_report(config, args.context))  # arithmetic on the shapes: no model is built, whatever its size


def cmd_export_hf(args: argparse.Namespace) -> None:
    from .hf import export_hf
    from .model import MiniGrok
    from .train.checkpoint import resolve_checkpoint
    from .train.tokenizer import TOKENIZER_NAME

    ckpt = resolve_checkpoint(args.checkpoint)
    if (ckpt / TOKENIZER_NAME).is_file():  # a training checkpoint: its tokenizer goes along
        model, tokenizer = load_checkpoint(ckpt, verify=not args.no_verify)
    else:
        model, tokenizer = MiniGrok.from_pretrained(ckpt, verify=not args.no_verify), None
    export_hf(model, args.out)
    if tokenizer is not None:
        tokenizer.save_hf(args.out)
    print(f"wrote a Llama checkpoint{' and its tokenizer' if tokenizer else ''} to {args.out} (from {ckpt})")


def cmd_import_hf(args: argparse.Namespace) -> None:
    from .hf import import_hf

    import_hf(args.hf_dir).save_pretrained(args.out)
    print(f"wrote a minigrok checkpoint to {args.out}")


def load_checkpoint(path: str, verify: bool = True):
    """(model, tokenizer) from a checkpoint or run directory (its newest checkpoint), checked against each other
    and, with `verify`, every file against the checkpoint's manifest."""
    from .checkpoint import CheckpointError, check_files, read_manifest
    from .model import MiniGrok
    from .train.checkpoint import STATE_NAME, load_trainer_state, resolve_checkpoint
    from .train.tokenizer import TOKENIZER_NAME, Tokenizer, check_vocab

    ckpt = resolve_checkpoint(path)
    model = MiniGrok.from_pretrained(ckpt, verify=verify).eval()
    if (manifest := read_manifest(ckpt)) and TOKENIZER_NAME in manifest["files"]:
        check_files(ckpt, manifest, [TOKENIZER_NAME], hashes=verify)
    tokenizer = Tokenizer.load(ckpt)
    if (ckpt / STATE_NAME).is_file() and load_trainer_state(ckpt)["tokenizer_fingerprint"] != tokenizer.fingerprint():
        raise CheckpointError(
            f"{ckpt / TOKENIZER_NAME} is not the tokenizer the model was trained with (fingerprint "
            f"{tokenizer.fingerprint()[:12]}, trained with {load_trainer_state(ckpt)['tokenizer_fingerprint'][:12]}): "
            "restore it from the run directory"
        )
    check_vocab(tokenizer, model.config.vocab_size)
    return model, tokenizer


def inference_dtype(requested: str, model, rows: int) -> str:
    """Resolve --dtype for a CPU inference job of `rows` tokens per forward (auto: the fastest safe dtype measured
    here, in under a second) and say on stderr what was chosen."""
    import torch

    from .machine import resolve_dtype

    choice = resolve_dtype(requested, model.config, rows, torch.device("cpu"), training=False, field="--dtype")
    print(choice.summary(), file=sys.stderr)
    return choice.dtype


def stream_text(model, tokenizer, prompt: str, dtype: str, **sampling) -> str:
    """Generate from `prompt` (empty = start of a document) with the matmuls in `dtype`, printing text as it comes;
    returns the new text."""
    import os

    import torch

    from .machine import autocast

    # argv holds undecodable bytes as surrogates: back to the bytes typed (the byte tokenizer takes any, BPE refuses)
    ids = tokenizer.encode_bytes(os.fsencode(prompt)) if prompt else [tokenizer.eos_id]
    new_ids, shown = [], ""
    print(os.fsencode(prompt).decode("utf-8", errors="replace"), end="", flush=True)
    # One autocast region around the whole loop: each weight is cast once, not at every decoded token.
    with autocast(dtype, torch.device("cpu")):
        for token in model.generate_stream(torch.tensor([ids]), stop_tokens=[tokenizer.eos_id], **sampling):
            if token.item() == tokenizer.eos_id:
                break
            if token.item() >= tokenizer.vocab_size:  # a padding row of the embedding: no text to show
                continue
            new_ids.append(token.item())
            text = tokenizer.decode(new_ids)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                print(text[len(shown) :], end="", flush=True)
                shown = text
    print()
    return tokenizer.decode(new_ids)


def cmd_train(args: argparse.Namespace) -> None:
    from .train.config import build_run_configs
    from .train.run import RunLock, resume_run, start_run

    model_values, train_config, overrides = build_run_configs(args.config, args.set)
    run_dir = Path(args.out or Path("runs") / Path(args.config).stem)
    if args.resume and overrides["model"]:
        raise ConfigError(
            f"--resume keeps the checkpoint's model; drop the model overrides {sorted(overrides['model'])}"
        )
    if args.new_data and not args.resume:
        raise ValueError("--new-data continues a run on another corpus: it needs --resume")
    with RunLock(run_dir):
        if args.resume:
            trainer = resume_run(run_dir, overrides["train"], args.data, args.val_data, args.new_data)
        else:
            if "vocab_size" not in overrides["model"]:  # the preset's is a placeholder: follow the tokenizer
                model_values.pop("vocab_size", None)
            trainer = start_run(run_dir, model_values, train_config, args.data, args.val_data, args.tokenizer)
        train_and_sample(trainer, args)


def train_and_sample(trainer, args: argparse.Namespace) -> None:
    """Train to the end of the budget, then print the final figures and args.samples samples."""
    data, model, tokenizer, train_config = trainer.data, trainer.model, trainer.tokenizer, trainer.config
    print(
        f"data: {data.meta['splits']['train']['n_tokens']:,} train / {data.meta['splits']['val']['n_tokens']:,} val tokens"
    )
    print(model.report(context=train_config.seq_len))
    final = trainer.train()
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


def cmd_generate(args: argparse.Namespace) -> None:
    model, tokenizer = load_checkpoint(args.checkpoint, verify=not args.no_verify)
    stream_text(
        model,
        tokenizer,
        args.prompt,
        inference_dtype(args.dtype, model, rows=1),  # decoding runs one token per forward
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )


def cmd_eval(args: argparse.Namespace) -> None:
    import json
    import math

    import torch

    from .train.config import TrainConfig
    from .train.data import encode_corpus
    from .train.trainer import evaluate

    model, tokenizer = load_checkpoint(args.checkpoint, verify=not args.no_verify)
    tokens, n_bytes = encode_corpus(tokenizer, args.data or None)
    if len(tokens) < 2:
        raise ValueError(f"{' '.join(args.data or ['the corpus'])} holds {len(tokens)} token(s): eval needs at least 2")
    seq_len = min(args.seq_len, model.config.max_seq_len)
    eval_tokens = args.max_tokens or len(tokens)
    config = TrainConfig(max_steps=1, seq_len=seq_len, batch_size=args.batch_size, eval_tokens=eval_tokens)
    dtype = inference_dtype(args.dtype, model, rows=args.batch_size * seq_len)
    metrics = evaluate(model, tokens, config, torch.device("cpu"), n_bytes / len(tokens), dtype)
    extra = {"tokens": len(tokens), "perplexity": math.exp(metrics["val_loss"]), "dtype": dtype}
    print(json.dumps(metrics | extra, indent=2))


def cmd_plot(args: argparse.Namespace) -> None:
    from .train.plot import plot_runs

    out = plot_runs(args.runs, args.out)
    print(f"wrote {out}")


def cmd_bench_train(args: argparse.Namespace) -> None:
    import json

    import torch

    from .bench import bench_train

    if args.threads:
        torch.set_num_threads(args.threads)
    config = build_model_config(args.config, args.set)
    result = bench_train(
        config,
        args.batch_size,
        args.seq_len,
        args.dtype,
        steps=args.steps,
        compare=tuple(args.compare),
        device=args.device,
        compile=args.compile,
    )
    for key, value in result.items():
        print(f"{key:>24}  {value:,.4g}" if isinstance(value, float) else f"{key:>24}  {value}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def cmd_bench_kernels(args: argparse.Namespace) -> None:
    import os

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here; use --device cpu")
    if device == "cpu":
        # Triton reads this when a kernel is defined, so it must be set before anything imports minigrok.kernels.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .bench import bench_kernels, format_table, plot_rows, write_csv, write_json

    options = {name: getattr(args, name) for name in ("sizes", "rows", "hidden", "head_dims", "gqa", "causal")}
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


def _int_list(text: str) -> list[int]:
    try:
        return [int(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 512,1024") from None


DTYPE_ARGUMENT = dict(
    choices=["auto", "fp32", "bf16", "fp16"],
    default="auto",
    help="matmul precision (default: auto, the fastest safe dtype measured on this machine in under a second)",
)


NO_VERIFY_HELP = "skip the sha256 check of the checkpoint's files against its manifest (about a second per GB)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minigrok", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="parameters, FLOPs, KV-cache and checkpoint sizes of a config")
    info.add_argument("--config", default="demo-cpu", help="preset name or YAML path (default: demo-cpu)")
    info.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model field")
    info.add_argument("--context", type=int, default=None, help="context length for FLOPs (default: max_seq_len)")
    info.set_defaults(run=cmd_info)

    export = commands.add_parser("export-hf", help="convert a minigrok checkpoint to the Hugging Face Llama layout")
    export.add_argument(
        "--checkpoint", required=True, help="checkpoint (save_pretrained or ckpt-<step>) or run directory (its newest)"
    )
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    export.set_defaults(run=cmd_export_hf)

    imp = commands.add_parser("import-hf", help="convert a Hugging Face Llama checkpoint to minigrok")
    imp.add_argument("hf_dir", help="directory with config.json and safetensors weights")
    imp.add_argument("--out", required=True, help="output directory")
    imp.set_defaults(run=cmd_import_hf)
    train = commands.add_parser("train", help="train a model (default: demo-cpu on the built-in corpus), then sample")
    train.add_argument("--config", default="demo-cpu", help="preset name or YAML path (default: demo-cpu)")
    train.add_argument(
        "--data", nargs="+", help="training corpus: files, directories, globs, .jsonl (default: built-in)"
    )
    train.add_argument("--val-data", nargs="+", help="validation corpus (default: held out from --data by file hash)")
    train.add_argument("--tokenizer", default="bpe", help="bpe (trained on the data), byte, or a tokenizer.json path")
    train.add_argument("--out", help="run directory (default: runs/<config name>)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    train.add_argument(
        "--new-data",
        action="store_true",
        help="with --resume: continue on the corpus --data names (or on the run's changed files) on purpose, logged",
    )
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model.<field> or train.<field>")
    train.add_argument("--samples", type=int, default=3, help="samples printed after training")
    train.add_argument("--sample-tokens", type=int, default=120, help="tokens per sample")
    train.set_defaults(run=cmd_train)

    generate = commands.add_parser("generate", help="stream a continuation of a prompt from a checkpoint")
    generate.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its newest)")
    generate.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    generate.add_argument("--max-new-tokens", type=int, default=200)
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--dtype", **DTYPE_ARGUMENT)
    generate.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    generate.set_defaults(run=cmd_generate)

    evaluate = commands.add_parser("eval", help="loss and bits per byte of a checkpoint on a corpus")
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its newest)")
    evaluate.add_argument("--data", nargs="+", help="corpus to score (default: the built-in corpus' validation files)")
    evaluate.add_argument("--seq-len", type=int, default=256)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    evaluate.add_argument("--dtype", **DTYPE_ARGUMENT)
    evaluate.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    evaluate.set_defaults(run=cmd_eval)

    plot = commands.add_parser("plot", help="PNG of train/val curves of one or more runs")
    plot.add_argument("runs", nargs="+", help="run directories (each with log.jsonl)")
    plot.add_argument("--out", default=None, help="PNG path (default: <first run>/curves.png)")
    plot.set_defaults(run=cmd_plot)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    bench_train = bench.add_parser("train", help="training tokens/s and MFU, optionally against transformers' Llama")
    bench_train.add_argument("--config", default="demo-cpu", help="preset name or YAML path")
    bench_train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model field")
    bench_train.add_argument("--dtype", **DTYPE_ARGUMENT)
    bench_train.add_argument("--batch-size", type=int, default=8)
    bench_train.add_argument("--seq-len", type=int, default=256)
    bench_train.add_argument("--steps", type=int, default=10, help="timed steps per model (after 2 warm-up steps)")
    bench_train.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    bench_train.add_argument("--device", default="cpu")
    bench_train.add_argument(
        "--compare",
        nargs="+",
        choices=["hf", "naive-loss"],
        default=[],
        help="baselines: transformers' LlamaForCausalLM; our model with full logits + F.cross_entropy",
    )
    bench_train.add_argument("--compile", action="store_true", help="torch.compile both models before timing")
    bench_train.add_argument("--json", default=None, help="write every figure to this JSON file")
    bench_train.set_defaults(run=cmd_bench_train)

    kernels = bench.add_parser("kernels", help="time one op per provider across shapes; table, JSON, CSV and a plot")
    kernels.add_argument("op", choices=["attention", "rms_norm", "rope", "swiglu", "linear_cross_entropy"])
    kernels.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    kernels.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: fp32 CPU, bf16 GPU")
    kernels.add_argument("--mode", choices=["fwd", "bwd", "fwd+bwd", "all"], default="all")
    kernels.add_argument("--quick", action="store_true", help="a tiny sweep (for tests)")
    kernels.add_argument(
        "--sizes",
        "--seq-lens",
        type=_int_list,
        help="swept values: sequence lengths (attention), hidden sizes (rms_norm, rope, swiglu), vocab sizes (linear_cross_entropy)",
    )
    kernels.add_argument("--rows", type=int, help="fixed rows or tokens (rms_norm, rope, swiglu, linear_cross_entropy)")
    kernels.add_argument("--hidden", type=int, help="fixed hidden size (linear_cross_entropy)")
    kernels.add_argument("--head-dims", type=_int_list, help="attention head dims, e.g. 64,128")
    kernels.add_argument("--gqa", type=_int_list, help="attention query heads per KV head, e.g. 1,4,16")
    kernels.add_argument(
        "--causal", choices=["both", "on", "off"], default=None, help="attention masks (default: both)"
    )
    kernels.add_argument("--providers", type=lambda text: text.split(","), help="comma-separated subset to run")
    kernels.add_argument("--repeats", type=int, default=10, help="timed calls per row on CPU (GPU: do_bench decides)")
    kernels.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    kernels.add_argument("--json", help="write the rows to this JSON file")
    kernels.add_argument("--csv", help="write the rows to this CSV file")
    kernels.add_argument("--plot", help="write a PNG of throughput (or time and peak memory) against the swept size")
    kernels.add_argument("--out-dir", help="write <op>.json, <op>.csv and <op>.png here")
    kernels.set_defaults(run=cmd_bench_kernels)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .train.trainer import TrainingStopped

    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:  # config, input and checkpoint errors carry their own fix
        print(f"minigrok {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the machine's fault, not the input's: a full disk, a read-only folder
        print(f"minigrok {args.command}: error: {error}", file=sys.stderr)
        return 1
    except TrainingStopped as stopped:
        print(stopped, file=sys.stderr)
        return 128 + stopped.signum
    except KeyboardInterrupt:
        print(f"minigrok {args.command}: stopped at once", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
