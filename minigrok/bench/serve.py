"""`minigrok bench serve`: a bounded load test of `minigrok serve` on a free loopback port.

The server runs in a subprocess (its own interpreter, as in use); at each concurrency c, c client threads stream the
same fixed list of greedy completions (a fixed count, stopped early past a time limit) with the standard library's
HTTP client. Figures per concurrency: requests/s, generated tokens/s (the server's usage counts), p50 / p99 latency
and p50 time to the first text; then `throughput_16_vs_1`, the tokens/s at 16 clients over those at 1.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .timing import quantile

PROMPTS = [f"def function_{n % 4}_{n}(x):\n" for n in range(16)]


def free_port() -> int:
    """A loopback port free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(checkpoint: str | Path, port: int, flags: list[str], threads: int | None = None) -> subprocess.Popen:
    """`minigrok serve` on 127.0.0.1:`port` in a subprocess, once it answers GET /v1/models (within a minute)."""
    argv = [sys.executable, "-m", "minigrok.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    process = subprocess.Popen([*argv, *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", "/v1/models")
            connection.getresponse().read()
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_server(process)
                raise RuntimeError(f"minigrok serve did not start:\n{process.stdout.read()}") from None
            time.sleep(0.2)


def stop_server(process: subprocess.Popen) -> int | None:
    """SIGTERM (the server finishes what is in flight), then a kill if it has not ended in 30 s; its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def stream_completion(port: int, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """One greedy streaming completion: (seconds to the first text, seconds in all, tokens generated)."""
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    connection.request("POST", "/v1/completions", json.dumps(body | {"stream_options": {"include_usage": True}}))
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"POST /v1/completions answered {response.status}: {response.read().decode()[:300]}")
    first, tokens = None, 0
    for line in response:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        event = json.loads(line[6:])
        if "error" in event:
            raise RuntimeError(f"the server ended a stream with an error: {event['error']['message']}")
        if first is None and any(choice.get("text") for choice in event["choices"]):
            first = time.perf_counter() - start
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    connection.close()
    total = time.perf_counter() - start
    return (total if first is None else first), total, tokens


def load_level(port: int, model: str, clients: int, requests: int, max_tokens: int, time_limit: float) -> dict:
    """`clients` threads streaming the fixed requests 0 .. requests - 1 between them; none starts past time_limit."""
    results, errors, lock = [], [], threading.Lock()
    next_request = iter(range(requests))
    start = time.perf_counter()

    def client() -> None:
        while time.perf_counter() - start < time_limit:
            with lock:
                index = next(next_request, None)
            if index is None:
                return
            try:
                result = stream_completion(port, model, PROMPTS[index % len(PROMPTS)], max_tokens)
            except (OSError, RuntimeError) as error:
                errors.append(str(error))
                return
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed at concurrency {clients}: {errors[0]}")
    seconds = time.perf_counter() - start
    latencies = [total for _, total, _ in results]
    return {
        "concurrency": clients,
        "requests": len(results),
        "seconds": seconds,
        "requests_per_s": len(results) / seconds,
        "tokens_per_s": sum(tokens for *_, tokens in results) / seconds,
        "latency_p50_s": quantile(latencies, 0.5),
        "latency_p99_s": quantile(latencies, 0.99),
        "ttft_p50_s": quantile([first for first, _, _ in results], 0.5),
    }


def bench_serve(
    checkpoint: str | Path | None = None,
    config=None,
    concurrency: tuple[int, ...] = (1, 4, 16),
    requests: int = 32,
    max_tokens: int = 64,
    time_limit: float = 60.0,
    dtype: str = "fp32",
    threads: int | None = None,
) -> dict:
    """Load-test a checkpoint's server (or, with `config`, a randomly initialised model with the byte tokenizer)."""
    if min(concurrency) < 1 or requests < 1 or max_tokens < 1:
        raise ValueError(
            f"--concurrency {','.join(map(str, concurrency))}, --requests {requests} and --max-tokens {max_tokens} "
            "must all be at least 1"
        )
    with tempfile.TemporaryDirectory() as directory:
        if checkpoint is None:
            import torch

            from ..model import MiniGrok
            from ..train.tokenizer import byte_tokenizer, check_vocab

            check_vocab(byte_tokenizer(), config.vocab_size)
            torch.manual_seed(0)
            MiniGrok(config).save_pretrained(directory)
            byte_tokenizer().save(directory)
            checkpoint = directory
        port = free_port()
        flags = ["--max-batch", str(max(concurrency)), "--dtype", dtype, "--model-name", "bench", "--no-verify"]
        server = start_server(checkpoint, port, flags, threads)
        try:
            stream_completion(port, "bench", PROMPTS[0], max_tokens)  # warm-up
            levels = [load_level(port, "bench", c, requests, max_tokens, time_limit) for c in concurrency]
        finally:
            stop_server(server)
    result = {"max_tokens": max_tokens, "dtype": dtype, "threads": threads, "levels": levels}
    rates = {level["concurrency"]: level["tokens_per_s"] for level in levels}
    if 1 in rates and 16 in rates:
        result["throughput_16_vs_1"] = rates[16] / rates[1]
    return result
