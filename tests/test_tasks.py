"""Downstream tasks: the log-likelihood scorer against float64 arithmetic done here, the metrics by hand, the
sandbox of code tasks, and the built-in task."""

import copy
import math
import os
import socket
import time

import pytest
import torch

from minigrok import MiniGrok, ModelConfig
from minigrok.tasks import (
    builtin_task,
    encode_pair,
    loglikelihoods,
    mean_stderr,
    run_sandboxed,
    score_multiple_choice,
)
from minigrok.train.corpus import split_corpus
from minigrok.train.tokenizer import byte_tokenizer, train_bpe


def tiny_model(max_seq_len: int = 128, seed: int = 0) -> MiniGrok:
    """A random model over the byte tokenizer's ids (vocab_size = the tokenizer's: no padded rows)."""
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=byte_tokenizer().vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
        max_seq_len=max_seq_len,
    )  # fmt: skip
    return MiniGrok(config).eval()


def byte_request(context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Byte ids of a request as the harness splits it: the context's trailing spaces start the continuation, and an
    empty context is the start of a document (eos)."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    return list(stripped.encode()) or [byte_tokenizer().eos_id], list(continuation.encode())


def reference_loglikelihood(model: MiniGrok, context: str, continuation: str) -> float:
    """log P(continuation | context) in float64, one request alone, the last max_seq_len + 1 ids kept."""
    model64 = copy.deepcopy(model).double()
    context_ids, continuation_ids = byte_request(context, continuation)
    ids = (context_ids + continuation_ids)[-(model.config.max_seq_len + 1) :]
    with torch.no_grad():
        logprobs = model64(torch.tensor([ids[:-1]])).logits[0].log_softmax(dim=-1)
    n = len(continuation_ids)
    return sum(logprobs[len(ids) - 1 - n + k, ids[len(ids) - n + k]].item() for k in range(n))


REQUESTS = [
    ("def add(a, b):\n    return", " a + b"),
    ("x", "yz"),
    ("import os\nprint(os.getcwd())\n", "# done\n"),
    ("caf\u00e9 ", "cr\u00e8me"),  # a trailing space goes with the continuation; multi-byte characters
    ("", "print(1)"),  # no context: scored after eos
]


def test_loglikelihoods_match_float64_and_batching_changes_nothing():
    model, tokenizer = tiny_model(), byte_tokenizer()
    expected = [reference_loglikelihood(model, context, continuation) for context, continuation in REQUESTS]
    batched = loglikelihoods(model, tokenizer, REQUESTS, batch_size=3)
    alone = [loglikelihoods(model, tokenizer, [request], batch_size=1)[0] for request in REQUESTS]
    assert batched == pytest.approx(expected, rel=1e-5, abs=1e-4)
    assert batched == pytest.approx(alone, rel=1e-6, abs=1e-5)
    assert len(set(batched)) == len(batched)  # distinct requests, distinct scores: nothing was mixed up


def test_a_context_past_max_seq_len_is_left_truncated():
    model, tokenizer = tiny_model(max_seq_len=16), byte_tokenizer()
    context, continuation = "the quick brown fox jumps over the lazy dog and on", " and"
    expected = reference_loglikelihood(model, context, continuation)
    assert loglikelihoods(model, tokenizer, [(context, continuation)], 1)[0] == pytest.approx(expected, rel=1e-5)
    # the same as the last 17 tokens given as the request
    short = context.encode()[-(17 - len(continuation)) :].decode()
    assert loglikelihoods(model, tokenizer, [(short, continuation)], 1)[0] == pytest.approx(expected, rel=1e-5)


def test_encode_pair_splits_the_whole_text_where_the_context_ends():
    tokenizer = train_bpe(["the cat sat on the mat, the cat ate the rat " * 20], vocab_size=300)
    context_ids, continuation_ids = encode_pair(tokenizer, "the cat ", "sat on")
    assert context_ids == tokenizer.encode("the cat")  # the space moved to the continuation
    assert context_ids + continuation_ids == tokenizer.encode("the cat sat on")
    assert tokenizer.decode(continuation_ids) == " sat on"
    assert encode_pair(tokenizer, "", "the cat") == ([tokenizer.eos_id], tokenizer.encode("the cat"))


def test_acc_acc_norm_and_stderr_by_hand(monkeypatch):
    # log-likelihoods per choice chosen so that acc and acc_norm (per byte) pick differently
    lls = {"a": -2.0, "bbbbbb": -3.0, "cc": -2.5, "ddd": -1.0, "e": -4.0, "\u00e9": -1.8, "ff": -2.0}
    monkeypatch.setattr("minigrok.tasks.loglikelihoods", lambda m, t, requests, b: [lls[x] for _, x in requests])
    rows = [
        {"context": "q1", "choices": ["a", "bbbbbb"], "gold": 1},  # acc picks a (-2), acc_norm bbbbbb (-0.5/byte)
        {"context": "q2", "choices": ["cc", "ddd"], "gold": 1},  # both pick ddd
        {"context": "q3", "choices": ["e", "a", "cc"], "gold": 0},  # acc picks a, acc_norm cc (-1.25 > -2)
        {"context": "q4", "choices": ["\u00e9", "ff"], "gold": 0},  # per byte -0.9 > -1.0 (per character -1.8 < -1)
    ]
    result = score_multiple_choice(None, None, rows, batch_size=2)
    assert result["acc"] == pytest.approx(2 / 4) and result["acc_norm"] == pytest.approx(3 / 4)
    assert result["acc_stderr"] == pytest.approx(math.sqrt(0.5 * 0.5 / 3))
    assert result["acc_norm_stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    assert result["n"] == 4
    assert mean_stderr([0.0, 1.0, 1.0, 1.0]) == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    assert mean_stderr([1.0]) is None


def test_sandbox_passes_fails_and_kills_on_timeout():
    assert run_sandboxed("def f(x):\n    return x + 1\n\nassert f(1) == 2\n") == "passed"
    assert run_sandboxed("def f(x):\n    return x\n\nassert f(1) == 2\n") == "failed"
    assert run_sandboxed("x = bytearray(4 << 30)\n") == "failed"  # past the memory limit: MemoryError
    started = time.perf_counter()
    assert run_sandboxed("while True:\n    pass\n", timeout=1.0) == "timed out"
    assert time.perf_counter() - started < 5


def test_sandbox_refuses_writes_outside_its_directory_sockets_and_processes(tmp_path):
    target = tmp_path / "escaped.txt"
    assert run_sandboxed(f"open({str(target)!r}, 'w').write('x')\n") == "failed"
    assert run_sandboxed(f"import os\nos.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)\n") == "failed"
    assert not target.exists()
    assert run_sandboxed("open('inside.txt', 'w').write('x')\nassert open('inside.txt').read() == 'x'\n") == "passed"
    server = socket.create_server(("127.0.0.1", 0))  # a listener the program could reach without the sandbox
    port = server.getsockname()[1]
    try:
        assert run_sandboxed(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n") == "failed"
    finally:
        server.close()
    assert run_sandboxed(f"import os\nos.system('touch {target}')\n") == "failed"
    assert run_sandboxed("import os\nassert 'HTTPS_PROXY' not in os.environ and 'http_proxy' not in os.environ\n") == (
        "passed"
    )
    assert not target.exists() and os.environ.get("PATH")


def test_builtin_task_is_drawn_from_the_validation_split_the_same_every_time():
    rows = builtin_task(rows=30)
    assert rows == builtin_task(rows=30) and len(rows) == 30
    val_text = "\n".join(split_corpus(None)["val"].documents())
    for row in rows:
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
        gold = row["choices"][row["gold"]]
        assert row["context"] + gold + "\n" in val_text.replace("\r\n", "\n") or (row["context"] + gold) in val_text
    assert len({row["gold"] for row in rows}) > 1  # the true line is not always in one place
