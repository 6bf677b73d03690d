import pytest

from minigrok.bench.serve import free_port, start_server, stop_server
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


class Server:
    """`minigrok serve` in a subprocess on a free loopback port (fp32, one thread); `url` is its /v1 base."""

    def __init__(self, checkpoint, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.process = start_server(checkpoint, self.port, ["--dtype", "fp32", *flags], threads=1)

    def stop(self) -> int | None:
        return stop_server(self.process)


@pytest.fixture(scope="session")
def server(run):
    server = Server(run, "--max-batch", "16", "--max-request-bytes", "4096")
    yield server
    server.stop()
