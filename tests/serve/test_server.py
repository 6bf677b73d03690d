"""`minigrok serve` in a subprocess, talked to with the official openai client as a user would."""

import http.client
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from minigrok.cli import main
from minigrok.cli.inference import load_checkpoint

from .conftest import Server

openai = pytest.importorskip("openai", reason="the server is tested with the openai client (dev extra)")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def generated(run, capsys, prompt: str, max_new_tokens: int) -> str:
    """What `minigrok generate` prints after the prompt, greedy and in fp32."""
    argv = ["generate", "--checkpoint", str(run), "--prompt", prompt, "--max-new-tokens", str(max_new_tokens)]
    assert main([*argv, "--temperature", "0", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt) and out.endswith("\n")
    return out[len(prompt) : -1]


def health(server) -> dict:
    return json.loads(urllib.request.urlopen(server.url.removesuffix("/v1") + "/health").read())


def post(server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    """A raw POST: the status and the JSON answer."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", f"/v1/{path}", body, {"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def open_stream(port: int, max_tokens: int, model: str = "tiny-run"):
    """(connection, response) of a greedy streaming completion whose first event has arrived."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = {"model": model, "prompt": "def ", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    connection.request("POST", "/v1/completions", json.dumps(body))
    response = connection.getresponse()
    assert response.readline().startswith(b"data: ")
    return connection, response


def test_models_lists_the_run(client):
    assert [model.id for model in client.models.list()] == ["tiny-run"]


@pytest.mark.parametrize("prompt,max_tokens", [("def ", 40), ("    return x", 25), ("", 30)])
def test_greedy_completion_equals_minigrok_generate(client, run, capsys, prompt, max_tokens):
    expected = generated(run, capsys, prompt, max_tokens)
    args = {"model": "tiny-run", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    completion = client.completions.create(**args)
    assert completion.choices[0].text == expected
    assert completion.choices[0].finish_reason in ("length", "stop")
    usage = completion.usage
    assert usage.prompt_tokens == max(len(prompt.encode()), 1) and usage.completion_tokens <= max_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == expected
    assert chunks[-1].usage == usage and not chunks[-1].choices


def test_chat_follows_the_default_template(client, run, capsys):
    messages = [{"role": "system", "content": "Write Python."}, {"role": "user", "content": "def function_1_3"}]
    expected = generated(run, capsys, "system: Write Python.\nuser: def function_1_3\nassistant:", 30)
    args = {"model": "tiny-run", "messages": messages, "max_tokens": 30, "temperature": 0}
    reply = client.chat.completions.create(**args)
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == expected
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_sixteen_concurrent_streaming_clients_are_batched_and_correct(server, run):
    """16 threads, each its own client, prompt and budget, start together; every stream equals the library's greedy
    generation of its prompt, and the engine ran more than one of them in a step."""
    model, tokenizer = load_checkpoint(str(run))
    prompts = [(f"def function_{i % 4}_{i}(x):\n", 20 + 3 * i) for i in range(16)]
    barrier, results = threading.Barrier(16), [None] * 16

    def one(index: int) -> None:
        prompt, max_tokens = prompts[index]
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        barrier.wait()
        stream = client.completions.create(
            model="tiny-run", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
        )
        results[index] = "".join(chunk.choices[0].text for chunk in stream)

    threads = [threading.Thread(target=one, args=(index,)) for index in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    ids = [tokenizer.encode(prompt) for prompt, _ in prompts]
    budgets = [max_tokens for _, max_tokens in prompts]
    # generate_batch gives each row what it gives alone (tests/model), in one call
    for new, text in zip(model.generate_batch(ids, budgets, 0.0, stop_tokens=[tokenizer.eos_id]), results, strict=True):
        assert text == tokenizer.decode([t for t in new if t < tokenizer.vocab_size])
    assert health(server)["peak_active"] > 1


def test_n_seed_and_stop(client):
    args = {"model": "tiny-run", "prompt": "def ", "max_tokens": 30, "temperature": 1.0, "top_p": 0.9, "seed": 3}
    first, again = client.completions.create(**args, n=3), client.completions.create(**args, n=2)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in again.choices] == [c.text for c in first.choices[:2]]  # choice i is seeded seed + i
    assert len({c.text for c in first.choices}) > 1
    greedy = client.completions.create(model="tiny-run", prompt="def ", max_tokens=30, temperature=0).choices[0]
    stop = greedy.text[8:10]
    cut = client.completions.create(model="tiny-run", prompt="def ", max_tokens=30, temperature=0, stop=[stop, "§"])
    assert cut.choices[0].text == greedy.text[: greedy.text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_errors_and_the_server_goes_on(client, server):
    with pytest.raises(openai.NotFoundError, match="this server serves 'tiny-run'"):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match=r"120 tokens \+ max_tokens=20 exceed .* max_seq_len=128"):
        client.completions.create(model="tiny-run", prompt="x" * 120, max_tokens=20)
    invalid = [
        ({"temperature": -1}, "temperature=-1: Input should be greater than or equal to 0"),
        ({"top_p": 0}, "top_p=0: Input should be greater than 0"),
        ({"n": 0}, "n=0"),
        ({"max_tokens": 0}, "max_tokens=0"),
        ({"max_tokens": "5"}, 'max_tokens="5": Input should be a valid integer'),
        ({"stop": ["a", "b", "c", "d", "e"]}, "up to 4"),
        ({"logprobs": 2}, "logprobs is not supported"),
        ({"prompt": [[1, 2], "x"]}, "prompt="),
        ({"prompt": [100000]}, "outside the vocabulary"),
    ]
    for extra, message in invalid:
        status, answer = post(server, "completions", json.dumps({"model": "tiny-run", "prompt": "x", **extra}).encode())
        assert status == 400 and message in answer["error"]["message"], (extra, answer)
        assert answer["error"]["type"] == "invalid_request_error"
    status, answer = post(server, "chat/completions", b'{"model": "tiny-run", "messages": []}')
    assert status == 400 and answer["error"]["param"] == "messages"
    status, answer = post(server, "chat/completions", b'{"model": "tiny-run", "messages": [{"role": "x"}]}')
    assert status == 400 and "messages.0.role" in answer["error"]["message"]
    status, answer = post(server, "completions", b'{"model": "tiny-run", "prompt": ')
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    status, answer = post(server, "completions", b"[1, 2]")
    assert status == 400 and "not an object" in answer["error"]["message"]
    status, answer = post(server, "completions", json.dumps({"model": "tiny-run", "prompt": "x" * 5000}).encode())
    assert status == 413 and "--max-request-bytes=4096" in answer["error"]["message"]
    assert [model.id for model in client.models.list()] == ["tiny-run"]


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    before = health(server)["cancelled"]
    connection, _ = open_stream(server.port, max_tokens=120)
    connection.sock.close()
    connection.close()
    deadline = time.monotonic() + 20
    while (state := health(server))["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state["cancelled"] == before + 1 and state["active"] == 0


def test_a_stored_chat_template_and_sigterm_finishing_the_requests_in_flight(run, tmp_path, capsys):
    """A checkpoint with its own chat_template.json is served with it; SIGTERM lets the stream under way finish."""
    checkpoint = tmp_path / "chat-run"
    shutil.copytree(sorted(run.glob("ckpt-*"))[-1], checkpoint)
    template = "{% for m in messages %}<{{ m.role }}> {{ m.content | upper }}\n{% endfor %}<assistant>"
    (checkpoint / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    server = Server(checkpoint, "--shutdown-timeout", "20")
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "def f"}]
    reply = client.chat.completions.create(model="chat-run", messages=messages, max_tokens=20, temperature=0)
    assert reply.choices[0].message.content == generated(checkpoint, capsys, "<user> DEF F\n<assistant>", 20)
    connection, response = open_stream(server.port, max_tokens=100, model="chat-run")
    server.process.terminate()
    rest = response.read().decode()
    assert rest.endswith("data: [DONE]\n\n") and '"finish_reason": "length"' in rest
    connection.close()
    server.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server.url}/models", timeout=2)


def test_importing_minigrok_and_its_cli_loads_no_server():
    code = "import sys, minigrok, minigrok.cli; print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_serve_refuses_a_zero_limit(run, capsys):
    assert main(["serve", "--checkpoint", str(run), "--max-batch", "0"]) == 2
    assert "--max-batch=0 must be at least 1" in capsys.readouterr().err


def test_serve_on_a_port_in_use_says_so_before_loading_the_model(run, tmp_path, capsys):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", str(run), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--host 127.0.0.1 --port {port}: cannot listen there (Address already in use)" in err
    assert "choose another --port" in err
