"""Downstream tasks scored as lm-evaluation-harness scores them, from local JSONL files, with no network.

Three kinds of row, told apart by their keys:
- multiple choice `{"context", "choices", "gold"}`: acc (the choice of highest summed log-likelihood given the
  context) and acc_norm (log-likelihood per byte of the choice);
- generation `{"prompt", "reference"}`: exact_match of the greedy completion, cut at a stop string, after stripping;
- code `{"prompt", "tests"}`: pass@1 of prompt + greedy completion + tests run in a sandboxed subprocess.
Generation and code rows may add `"stop"` (a string or a list of them) and `"max_new_tokens"`.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

KINDS = {  # the keys that make a row of each kind, and what the kind reports
    "multiple_choice": (("context", "choices", "gold"), ("acc", "acc_norm")),
    "generation": (("prompt", "reference"), ("exact_match",)),
    "code": (("prompt", "tests"), ("pass@1",)),
}
DEFAULT_STOPS = {"generation": ("\n",), "code": ("\nclass", "\ndef", "\n#", "\nif", "\nprint")}  # as HumanEval
BUILTIN = "builtin"
BUILTIN_ROWS = 400
TIMEOUT_S = 10.0
MEMORY_BYTES = 1 << 30
BATCH_SIZE, MAX_NEW_TOKENS = 8, 128  # minigrok eval's defaults, and those of train.eval_tasks
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
UNSHARE = getattr(ctypes.CDLL(None), "unshare", None)  # Linux's unshare(2), looked up before any fork


class TaskError(ValueError):
    """A task file or row that cannot be scored; the message names the file, the line, the field and the fix."""


def mean_stderr(values: list[float]) -> float | None:
    """The standard error of the mean, sample std / sqrt(n), as lm-evaluation-harness's mean_stderr (None for n < 2)."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


# -- task files ---------------------------------------------------------------------------------------------------


def check_row(row, where: str) -> str:
    """The kind of a task row, or TaskError naming `where` (file:line) and the field at fault."""
    if not isinstance(row, dict):
        raise TaskError(f"{where} is a JSON {type(row).__name__}, not an object: write one object per line")
    kind = "multiple_choice" if "choices" in row else "code" if "tests" in row else "generation"
    keys, _ = KINDS[kind]
    for key in keys:
        if key not in row:
            example = ", ".join(f'"{k}": ...' for k in keys)
            raise TaskError(f"{where} has no {key!r} field: a {kind.replace('_', '-')} row is {{{example}}}")
    for key in (key for key in keys if key not in ("choices", "gold")):
        if not isinstance(row[key], str):
            raise TaskError(f"{where}: {key!r} is {json.dumps(row[key])[:40]}, not a string")
    if kind == "multiple_choice":
        choices, gold = row["choices"], row["gold"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise TaskError(f"{where}: 'choices' must be a list of at least 2 non-empty strings, got {choices!r:.60}")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise TaskError(
                f"{where}: 'gold' is {gold!r}, not the index of a choice: give an integer in 0..{len(choices) - 1}"
            )
        return kind
    stop = row.get("stop", [])
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise TaskError(f"{where}: 'stop' is {stop!r}, not a non-empty string or a list of them")
    budget = row.get("max_new_tokens", 1)
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise TaskError(f"{where}: 'max_new_tokens' is {budget!r}, not an integer >= 1")
    return kind


def load_task(path: str | Path, limit: int | None = None) -> tuple[str, list[dict]]:
    """(kind, rows) of a JSONL task file (at most `limit` rows), every row checked and of the first row's kind."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist: give a .jsonl task file or {BUILTIN!r}")
    rows, kind = [], None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(rows) >= limit:
                break
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise TaskError(f"{path}:{lineno} is not valid JSON ({error}): fix or remove the line") from error
            row_kind = check_row(row, f"{path}:{lineno}")
            if kind not in (None, row_kind):
                raise TaskError(f"{path}:{lineno} is a {row_kind} row in a {kind} task: keep one kind per file")
            kind = row_kind
            rows.append(row)
    if not rows:
        raise TaskError(f"task file {path} holds no rows: write one JSON object per line")
    return kind, rows


def builtin_task(rows: int = BUILTIN_ROWS, seed: int = 0) -> list[dict]:
    """Choose the true next line of a built-in corpus file among it and 3 lines of other files.

    Drawn, the same on every machine with the same Python, from the validation files of the built-in corpus
    (split_corpus's default split, which `minigrok train` holds out for val_loss), so training never sees them.
    """
    from .train.corpus import split_corpus

    lines = [text.splitlines() for text in split_corpus(None)["val"].documents()]
    places = [  # lines worth guessing: neither blank nor trivial nor long, after a few lines of context
        (f, i) for f, file_lines in enumerate(lines) for i in range(4, len(file_lines))
        if len(file_lines[i].strip()) >= 8 and len(file_lines[i]) <= 80
    ]  # fmt: skip
    rng = random.Random(seed)
    task = []
    for f, i in rng.sample(places, min(rows, len(places))):
        gold = lines[f][i]
        distractors = set()
        while len(distractors) < 3:
            other, j = rng.choice(places)
            if other != f and lines[other][j] != gold:
                distractors.add(lines[other][j])
        choices = sorted(distractors) + [gold]
        rng.shuffle(choices)
        context = "".join(line + "\n" for line in lines[f][max(0, i - 8) : i])
        task.append({"context": context, "choices": choices, "gold": choices.index(gold)})
    return task


# -- multiple choice ----------------------------------------------------------------------------------------------


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids as the harness makes them: the whole text encoded once, split where the
    context's own tokens end; trailing spaces of the context go with the continuation; an empty context is eos."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [tokenizer.eos_id], tokenizer.encode(continuation)
    whole, context_ids = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], batch_size: int) -> list[float]:
    """log P(continuation | context) of each (context, continuation): batches of similar lengths, right-padded, one
    forward each; context + continuation is left-truncated to max_seq_len + 1 tokens, as the harness does."""
    max_len = model.config.max_seq_len
    pieces = []
    for context, continuation in requests:
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        if not 0 < len(continuation_ids) <= max_len:
            raise TaskError(
                f"the choice {continuation[:40]!r} (after {context[-40:]!r}) is {len(continuation_ids)} tokens: a "
                f"choice must be 1..{max_len} tokens (the model's max_seq_len); shorten it"
            )
        pieces.append(((context_ids + continuation_ids)[-(max_len + 1) :], len(continuation_ids)))
    order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i][0]))
    scores = [0.0] * len(pieces)
    device = model.head_weight.device
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        inputs = torch.zeros(len(batch), len(pieces[batch[0]][0]) - 1, dtype=torch.long, device=device)
        for row, i in enumerate(batch):
            inputs[row, : len(pieces[i][0]) - 1] = torch.tensor(pieces[i][0][:-1])
        logprobs = model(inputs).logits.float().log_softmax(dim=-1)
        for row, i in enumerate(batch):
            ids, n = pieces[i]
            targets = torch.tensor(ids[-n:], device=device)
            scores[i] = logprobs[row, len(ids) - 1 - n : len(ids) - 1].gather(1, targets[:, None]).sum().item()
    return scores


def score_multiple_choice(model, tokenizer, rows: list[dict], batch_size: int) -> dict:
    """acc and acc_norm (log-likelihood per byte of the choice) with their standard errors."""
    requests = [(row["context"], choice) for row in rows for choice in row["choices"]]
    scores = iter(loglikelihoods(model, tokenizer, requests, batch_size))
    acc, acc_norm = [], []
    for row in rows:
        lls = [next(scores) for _ in row["choices"]]
        normed = [ll / len(choice.encode("utf-8")) for ll, choice in zip(lls, row["choices"], strict=True)]
        acc.append(float(lls.index(max(lls)) == row["gold"]))
        acc_norm.append(float(normed.index(max(normed)) == row["gold"]))
    return metrics({"acc": acc, "acc_norm": acc_norm})


def metrics(values: dict[str, list[float]]) -> dict:
    """Each metric's mean and standard error, and n."""
    out = {}
    for name, scores in values.items():
        out[name] = sum(scores) / len(scores)
        out[f"{name}_stderr"] = mean_stderr(scores)
    return out | {"n": len(next(iter(values.values())))}


# -- generation and code ------------------------------------------------------------------------------------------


def stop_token_ids(tokenizer, stops: tuple[str, ...]) -> list[int]:
    """eos and every token whose text holds a stop string: once one is generated the completion is complete."""
    wanted = [stop.encode("utf-8") for stop in stops]
    tokens = range(tokenizer.vocab_size)
    return [tokenizer.eos_id] + [i for i in tokens if any(w in tokenizer.decode_bytes([i]) for w in wanted)]


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """`text` up to its first stop string."""
    return text[: min([text.find(stop) for stop in stops if stop in text], default=len(text))]


@torch.no_grad()
def complete(model, tokenizer, rows: list[dict], kind: str, batch_size: int, max_new_tokens: int) -> list[str]:
    """The greedy completion of each row's prompt, cut at its first stop string (the row's "stop" or the kind's)."""
    stop_ids: dict[tuple[str, ...], list[int]] = {}
    completions = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        stops = [row_stops(row, kind) for row in batch]
        budgets = [min(row.get("max_new_tokens", max_new_tokens), model.config.max_seq_len - 1) for row in batch]
        prompts = [
            (tokenizer.encode(row["prompt"]) or [tokenizer.eos_id])[-(model.config.max_seq_len - budget) :]
            for row, budget in zip(batch, budgets, strict=True)
        ]
        for row_stop in stops:
            stop_ids.setdefault(row_stop, stop_token_ids(tokenizer, row_stop))
        new = model.generate_batch(prompts, budgets, temperature=0.0, stop_tokens=[stop_ids[s] for s in stops])
        texts = [tokenizer.decode([i for i in ids if i < tokenizer.vocab_size]) for ids in new]  # no padded rows
        completions += [cut_at_stop(text, s) for text, s in zip(texts, stops, strict=True)]
    return completions


def row_stops(row: dict, kind: str) -> tuple[str, ...]:
    stop = row.get("stop", DEFAULT_STOPS[kind])
    return (stop,) if isinstance(stop, str) else tuple(stop)


# The sandbox's first code: an audit hook (which Python code cannot remove) refusing sockets, new processes, native
# libraries and any change to files outside the working directory; then the program runs as __main__.
GUARD = r"""
import os, sys
ROOT = os.path.realpath(os.getcwd())
WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
CHANGES = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.symlink",
           "os.link", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}
REFUSED = ("socket.", "subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.kill",
           "os.forkpty", "pty.", "ctypes.", "sys.remote_exec", "os.startfile", "webbrowser.")
def outside(path):
    if isinstance(path, int) or path is None:
        return False
    real = os.path.realpath(os.fsdecode(path))
    return real != "/dev/null" and not (real + os.sep).startswith(ROOT + os.sep)
def guard(event, args):
    if event.startswith(REFUSED):
        raise PermissionError(f"the sandbox refuses {event}")
    writing = event == "open" and (any(c in str(args[1] or "") for c in "wax+") or (args[2] or 0) & WRITES)
    if (writing and outside(args[0])) or (event in CHANGES and any(outside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike)))):
        raise PermissionError(f"the sandbox refuses {event} outside its directory: {args[0]!r}")
sys.addaudithook(guard)
with open("program.py") as f:
    source = f.read()
exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
"""


def _limit_child(memory_bytes: int, cpu_seconds: int) -> None:
    """In the child before exec: cap memory, CPU and file size; a network namespace of its own where the kernel lets
    an unprivileged process have one (no interfaces but loopback: no network at all)."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))
    if UNSHARE is not None:
        UNSHARE(CLONE_NEWUSER | CLONE_NEWNET)  # returns -1 where not allowed: the guard alone remains


def run_sandboxed(program: str, timeout: float = TIMEOUT_S, memory_bytes: int = MEMORY_BYTES) -> str:
    """Run `program` in `python -I` in a fresh temporary directory; "passed" (exit 0), "failed" or "timed out"
    (killed, with anything it started)."""
    with tempfile.TemporaryDirectory(prefix="minigrok-sandbox-") as directory:
        Path(directory, "program.py").write_text(program, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": directory, "TMPDIR": directory, "LANG": "C.UTF-8"}  # no proxies
        process = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", GUARD],
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=lambda: _limit_child(memory_bytes, math.ceil(timeout) + 1),
        )
        try:
            return "passed" if process.wait(timeout) == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return "timed out"


# -- running tasks ------------------------------------------------------------------------------------------------


def task_rows(spec: str, limit: int | None) -> tuple[str, str, list[dict]]:
    """(name, kind, rows) of a --tasks entry: the built-in task or a JSONL file (named by its stem)."""
    if spec == BUILTIN:
        return BUILTIN, "multiple_choice", builtin_task()[:limit]
    kind, rows = load_task(spec, limit)
    return Path(spec).stem, kind, rows


def load_tasks(specs: list[str], limit: int | None = None) -> list[tuple[str, str, list[dict]]]:
    """(name, kind, rows) of each task, every file checked before any model runs; no two may share a name."""
    tasks = [task_rows(spec, limit) for spec in specs]
    names = [name for name, _, _ in tasks]
    if len(set(names)) < len(names):
        raise TaskError(f"two tasks are named {max(names, key=names.count)!r}: give each task file its own stem")
    return tasks


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[tuple[str, str, list[dict]]],
    batch_size: int = BATCH_SIZE,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict[str, dict]:
    """{name: metrics} of each loaded task."""
    return {name: evaluate_task(model, tokenizer, kind, rows, batch_size, max_new_tokens) for name, kind, rows in tasks}


def evaluate_task(model, tokenizer, kind: str, rows: list[dict], batch_size: int, max_new_tokens: int) -> dict:
    """The metrics of one task's rows."""
    if kind == "multiple_choice":
        return score_multiple_choice(model, tokenizer, rows, batch_size)
    completions = complete(model, tokenizer, rows, kind, batch_size, max_new_tokens)
    if kind == "generation":
        matches = [float(c.strip() == row["reference"].strip()) for c, row in zip(completions, rows, strict=True)]
        return metrics({"exact_match": matches})
    programs = [row["prompt"] + c + "\n\n" + row["tests"] + "\n" for c, row in zip(completions, rows, strict=True)]
    return metrics({"pass@1": [float(run_sandboxed(program) == "passed") for program in programs]})


def scores(result: dict) -> list[str]:
    """The metric names of one task's result (not n or the standard errors)."""
    return [metric for metric in result if metric != "n" and not metric.endswith("_stderr")]


def summary(results: dict[str, dict]) -> str:
    """One line: every task's metrics as value ± stderr."""
    return ", ".join(
        f"{name} {metric} {result[metric]:.4f}"
        + ("" if result[f"{metric}_stderr"] is None else f" ± {result[f'{metric}_stderr']:.4f}")
        for name, result in results.items()
        for metric in scores(result)
    )


def format_table(results: dict[str, dict]) -> str:
    """One line per task and metric: value ± stderr, and n."""
    lines = [f"{'task':<24} {'metric':<12} {'value':>8} {'stderr':>8} {'n':>6}"]
    for name, result in results.items():
        for metric in scores(result):
            stderr = result[f"{metric}_stderr"]
            shown = "-" if stderr is None else f"{stderr:.4f}"
            lines.append(f"{name:<24} {metric:<12} {result[metric]:>8.4f} {shown:>8} {result['n']:>6}")
    return "\n".join(lines)
