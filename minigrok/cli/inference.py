"""`minigrok generate` and `eval`: run a trained checkpoint, loaded and checked the same way, in a measured dtype."""

from __future__ import annotations

import argparse
import sys

from .arguments import add_checkpoint_arguments, add_dtype_argument


def load_checkpoint(path: str, verify: bool = True):
    """(model, tokenizer) from a checkpoint or run directory (its newest checkpoint), float or quantised, checked
    against each other and, with `verify`, every file against the checkpoint's manifest."""
    from ..checkpoint import CheckpointError, check_files, read_manifest
    from ..model import MiniGrok
    from ..quantize import is_quantized, load_quantized
    from ..train.checkpoint import STATE_NAME, load_trainer_state, resolve_checkpoint
    from ..train.tokenizer import TOKENIZER_NAME, Tokenizer, check_vocab

    ckpt = resolve_checkpoint(path)
    load = load_quantized if is_quantized(ckpt) else MiniGrok.from_pretrained
    model = load(ckpt, verify=verify).eval()
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


def load_draft(path: str, tokenizer, verify: bool = True):
    """The draft model of --draft, checked to share the target's tokenizer (so its token ids mean the same)."""
    from ..checkpoint import CheckpointError

    draft, draft_tokenizer = load_checkpoint(path, verify)
    if draft_tokenizer.fingerprint() != tokenizer.fingerprint():
        raise CheckpointError(
            f"--draft {path} has another tokenizer than the target (fingerprint {draft_tokenizer.fingerprint()[:12]}, "
            f"the target's {tokenizer.fingerprint()[:12]}): train the draft with the target's tokenizer"
        )
    return draft


def add_draft_arguments(parser: argparse.ArgumentParser) -> None:
    """--draft and --num-draft-tokens: speculative decoding with a smaller model of the same tokenizer."""
    parser.add_argument("--draft", default=None, help="checkpoint or run directory of a smaller draft model")
    parser.add_argument("--num-draft-tokens", type=int, default=4, help="tokens the draft proposes per target forward")


def inference_dtype(requested: str, model, rows: int) -> str:
    """Resolve --dtype for a CPU inference job of `rows` tokens per forward (auto: the fastest safe dtype measured
    here, in under a second) and say on stderr what was chosen."""
    import torch

    from ..machine import resolve_dtype

    choice = resolve_dtype(requested, model.config, rows, torch.device("cpu"), training=False, field="--dtype")
    print(choice.summary(), file=sys.stderr)
    return choice.dtype


def stream_text(model, tokenizer, prompt: str, dtype: str, **sampling) -> str:
    """Generate from `prompt` (empty = start of a document) with the matmuls in `dtype`, printing text as it comes;
    returns the new text."""
    import os

    import torch

    from ..machine import autocast

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


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    parser.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    add_draft_arguments(parser)
    add_dtype_argument(parser)


def run_generate(args: argparse.Namespace) -> None:
    """Stream the continuation; with --draft, decode speculatively and say on stderr how many drafts were kept."""
    from ..speculative import SpeculativeStats

    model, tokenizer = load_checkpoint(args.checkpoint, verify=not args.no_verify)
    draft = load_draft(args.draft, tokenizer, verify=not args.no_verify) if args.draft else None
    stats = SpeculativeStats()
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
        draft_model=draft,
        num_draft_tokens=args.num_draft_tokens,
        stats=stats,
    )
    if draft is not None:
        print(
            f"speculative: {stats.accepted} of {stats.drafted} drafted tokens accepted "
            f"(acceptance_rate {stats.acceptance_rate:.2f}) in {stats.rounds} target forwards",
            file=sys.stderr,
        )


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    parser.add_argument("--data", nargs="+", help="corpus to score (default: the built-in corpus' validation files)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    parser.add_argument(
        "--tasks", nargs="+", default=None, help="score downstream tasks instead: JSONL task files or 'builtin'"
    )
    parser.add_argument("--limit", type=int, default=None, help="score at most this many rows of each task")
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, help="tokens a generation or code row may generate (default 128)"
    )
    parser.add_argument("--json", default=None, help="write the task results to this JSON file")
    add_dtype_argument(parser)


def run_eval(args: argparse.Namespace) -> None:
    """Print the loss, bits per byte and perplexity of the checkpoint on the corpus, as JSON (`tokens`: the
    corpus's, `val_tokens`: those scored, at most about --max-tokens); with --tasks, the task metrics instead."""
    import json

    if args.tasks:
        return run_task_eval(args)
    import math

    import torch

    from ..train.config import TrainConfig
    from ..train.data import encode_corpus
    from ..train.trainer import evaluate

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


def run_task_eval(args: argparse.Namespace) -> None:
    """Score each of --tasks, print a table, and with --json write the metrics, the checkpoint, its parameter count
    and the wall time."""
    import time

    import torch

    from ..files import write_json
    from ..machine import autocast
    from ..tasks import evaluate_tasks, format_table, load_tasks

    if args.data:
        raise ValueError("--data and --tasks are two kinds of eval: give one of them")
    for name in ("limit", "batch_size", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    started = time.perf_counter()
    tasks = load_tasks(args.tasks, args.limit)  # every file checked before the model runs
    model, tokenizer = load_checkpoint(args.checkpoint, verify=not args.no_verify)
    dtype = inference_dtype(args.dtype, model, rows=args.batch_size * model.config.max_seq_len)
    with autocast(dtype, torch.device("cpu")):
        results = evaluate_tasks(model, tokenizer, tasks, args.batch_size, args.max_new_tokens)
    print(format_table(results))
    report = {
        "checkpoint": args.checkpoint,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": dtype,
        "wall_seconds": round(time.perf_counter() - started, 3),
        "tasks": results,
    }
    if args.json:
        write_json(args.json, report)
