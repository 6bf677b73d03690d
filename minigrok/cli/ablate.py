"""`minigrok ablate`: train every variant (a grid of config values, or listed variants) at each seed (each a normal `minigrok train`
run, in its own process), then write their table and figure. Rerunning the same command skips finished runs and
resumes interrupted ones."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from .arguments import int_list

SHARED_TOKENIZER = "tokenizer.json"  # in the ablation's directory: the one every run trains on


def add_ablate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="demo-cpu", help="preset name or YAML path every variant starts from")
    variants = parser.add_mutually_exclusive_group(required=True)
    variants.add_argument(
        "--vary",
        action="append",
        metavar="KEY=V1,V2,...",
        help="a model.<field> or train.<field> and its values (repeat for a grid: every combination is trained; "
        "fields: minigrok train --help-config)",
    )
    variants.add_argument(
        "--variant",
        action="append",
        metavar="KEY=VALUE[,KEY=VALUE...]",
        help="one variant: these fields changed together (repeat for more; the base config is trained too), "
        "e.g. each option alone and then all of them",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="an override every variant shares"
    )
    parser.add_argument(
        "--budget",
        metavar="minutes=X|tokens=N|steps=N",
        help="the budget of every run, the same for all (default: the base config's)",
    )
    parser.add_argument("--seeds", type=int_list, default=[0], help="seeds each variant is trained with (default: 0)")
    parser.add_argument("--out", help="the ablation's directory (default: runs/ablate-<base>)")
    parser.add_argument("--data", nargs="+", help="training corpus, as minigrok train --data (default: built-in)")
    parser.add_argument("--val-data", nargs="+", help="validation corpus, as minigrok train --val-data")
    parser.add_argument(
        "--tokenizer",
        default="bpe",
        help="bpe (trained once, by the first run, and shared), byte, or a tokenizer.json path",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each run (default: torch's choice)")


def run_ablate(args: argparse.Namespace) -> None:
    """Plan and check every run, record the spec, train what is not finished one run at a time, write the results."""
    from ..train import ablate

    if args.vary:
        variants, option = ablate.grid(ablate.parse_vary(args.vary)), "--vary"
    else:
        variants, option = ablate.parse_variants(args.variant), "--variant"
    runs = ablate.plan(args.base, args.set, variants, args.budget, args.seeds, option)
    out = Path(args.out or Path("runs") / f"ablate-{Path(args.base).stem}")
    spec = ablate.spec(args.base, args.set, variants, args.budget, args.seeds, args.data, args.val_data, args.tokenizer)
    ablate.check_spec(out, spec)
    shared_tokenizer = out / SHARED_TOKENIZER
    for index, run in enumerate(runs, 1):
        run_dir = out / run.name
        state = ablate.run_state(run_dir)
        print(
            f"[{index}/{len(runs)}] {run_dir}: "
            + {"new": "training", "interrupted": "resuming"}.get(state, "finished, skipped"),
            flush=True,
        )
        if state == "finished":
            continue
        command = [sys.executable, "-m", "minigrok.cli", "train", "--config", args.base, "--out", str(run_dir)]
        command += ["--samples", "0"]
        for pair in run.train_overrides() if state == "interrupted" else run.overrides:
            command += ["--set", pair]
        command += ["--data", *args.data] if args.data else []
        command += ["--val-data", *args.val_data] if args.val_data else []
        if state == "interrupted":
            command.append("--resume")
        else:
            command += ["--tokenizer", str(shared_tokenizer) if shared_tokenizer.is_file() else args.tokenizer]
        try:
            train(command, args.threads, run_dir)
        finally:  # the first run trained the tokenizer (a stopped run too, at its start): share it
            if args.tokenizer == "bpe" and not shared_tokenizer.is_file() and (run_dir / SHARED_TOKENIZER).is_file():
                share_tokenizer(run_dir / SHARED_TOKENIZER, shared_tokenizer)
    caption = (
        f"Ablation of {args.base}, budget {args.budget or 'of the base config'}, seeds "
        f"{', '.join(map(str, args.seeds))}; val bpb: mean (min–max) over the seeds"
        + (f"; {ablate.BASE_VALUE}: the base config's value." if args.variant else ".")
    )
    varied = ablate.columns(variants)
    rows = ablate.summarize(runs, out, varied)
    for path in ablate.write_results(rows, out, varied, caption):
        print(f"wrote {path}")
    print((out / "results.md").read_text())


def train(command: list[str], threads: int | None, run_dir: Path) -> None:
    """Run one `minigrok train` to its end. Ctrl-C reaches it from the terminal (the same process group) and it
    stops after a checkpoint; a SIGTERM sent to this process is passed on to it the same way."""
    from ..train.trainer import TrainingStopped

    env = os.environ | ({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {})
    process = subprocess.Popen(command, env=env)
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),  # the terminal sent it to the run too
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum)),
    }
    try:
        code = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        raise TrainingStopped(
            code - 128,
            f"ablation stopped in {run_dir}: rerun the same minigrok ablate command to continue (finished runs are "
            "skipped; this one resumes from its newest checkpoint, or starts over if it has none)",
        )
    if code:
        raise ChildProcessError(
            f"training {run_dir} failed (exit code {code}; its output is above): fix the cause and rerun the same "
            "minigrok ablate command (finished runs are skipped, this one resumes from its newest checkpoint)"
        )


def share_tokenizer(source: Path, shared: Path) -> None:
    """Copy the tokenizer the first run trained to the ablation's directory, where every later run takes it from."""
    from ..files import atomic_write

    tokenizer = source.read_bytes()
    atomic_write(shared, lambda tmp: Path(tmp).write_bytes(tokenizer))
