import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from minigrok.cli import main


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """A tiny model trained briefly on a small corpus of Python (byte tokenizer, fp32)."""
    root = tmp_path_factory.mktemp("serve")
    corpus = root / "corpus"
    corpus.mkdir()
    for index in range(4):
        (corpus / f"part{index}.py").write_text(
            "".join(f"def function_{index}_{n}(x):\n    return x * {n} - {index}\n\n" for n in range(50))
        )
    out = root / "tiny-run"
    args = ["train", "--config", "tiny", "--data", str(corpus), "--tokenizer", "byte", "--out", str(out)]
    assert main(args + ["--set", "train.max_steps=60", "--set", "train.dtype=fp32", "--samples", "0"]) == 0
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`minigrok serve` in a subprocess on a free loopback port; `url` is its /v1 base."""

    def __init__(self, checkpoint, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        argv = [
            sys.executable,
            "-m",
            "minigrok.cli",
            "serve",
            "--checkpoint",
            str(checkpoint),
            "--port",
            str(self.port),
        ]
        env = os.environ | {"OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [*argv, "--dtype", "fp32", *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/models", timeout=1).read()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"minigrok serve did not start:\n{self.process.stdout.read()}") from None
                time.sleep(0.2)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()


@pytest.fixture(scope="session")
def server(run):
    server = Server(run, "--max-batch", "16", "--max-request-bytes", "4096")
    yield server
    server.stop()
