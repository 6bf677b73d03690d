"""The continuous-batching engine, without HTTP: requests joining a running batch generate what each would alone."""

import threading

import pytest
import torch

from minigrok.cli.inference import load_checkpoint
from minigrok.generate import RowSampling
from minigrok.serve.engine import Engine, Refused, TextStream
from minigrok.train.tokenizer import byte_tokenizer


@pytest.fixture(scope="module")
def model(run):
    """The tiny trained model: what it generates depends on the whole prompt, as a row's keys must."""
    return load_checkpoint(str(run))[0]


def text_prompt(length: int, offset: int) -> list[int]:
    """`length` bytes of Python like the training corpus, from `offset` on."""
    text = "".join(f"def function_{n % 4}_{n}(x):\n    return x * {n} - {n % 4}\n\n" for n in range(20))
    return list(text.encode()[offset : offset + length])


def collect(outputs: dict, key):
    """An emit that records each choice's tokens count, text and finish reason under `key`."""

    def emit(output):
        entry = outputs.setdefault((key, output.index), {"text": "", "tokens": 0, "finish": None})
        entry["text"] += output.text
        entry["tokens"], entry["finish"] = output.tokens, output.finish_reason

    return emit


def alone(model, prompt, max_new_tokens, **sampling):
    """The new token ids model.generate gives for one prompt on its own."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens, **sampling)[0, len(prompt) :].tolist()
    return out


def test_requests_admitted_at_different_steps_give_what_each_gives_alone(model):
    """Greedy, fp32: prompts of odd lengths join at steps 0, 1, 3 and 7 while others decode and finish (rows move
    into freed ones); every row equals model.generate of its prompt alone (ids >= 256 are text-less padding rows)."""
    tokenizer = byte_tokenizer()
    engine = Engine(model, tokenizer, max_batch=3, max_queue=16)
    schedule = {0: [5, 11], 1: [3], 3: [17, 2], 7: [9]}  # step -> prompt lengths submitted before it
    budgets = iter([12, 4, 19, 30, 6, 27])
    outputs, prompts = {}, {}
    for step in range(60):
        for length in schedule.get(step, []):
            key = len(prompts)
            prompts[key] = (text_prompt(length, offset=7 * key), next(budgets))
            sampling = RowSampling(prompts[key][1], temperature=0)
            engine.submit([prompts[key][0]], sampling, collect(outputs, key))
        engine.step()
        assert len(engine.rows) <= 3
    assert not engine.rows and not engine.waiting
    for key, (prompt, budget) in prompts.items():
        expected = alone(model, prompt, budget, temperature=0)
        assert outputs[key, 0]["text"] == tokenizer.decode([t for t in expected if t < tokenizer.vocab_size])
        assert outputs[key, 0] | {"text": None} == {"text": None, "tokens": budget, "finish": "length"}


def test_seeded_sampling_and_n_choices_match_generate_with_each_seed(model):
    """n = 3 choices seeded seed + i, sampled with temperature and top_p beside a greedy request: each choice is
    what model.generate gives with that seed, and the greedy row is untouched by the sampled ones."""
    tokenizer = byte_tokenizer()
    engine = Engine(model, tokenizer, max_batch=8)
    prompt = list(b"def f(x):")
    outputs = {}
    engine.submit([prompt], RowSampling(10, temperature=0.9, top_p=0.8), collect(outputs, "s"), n=3, seed=7)
    engine.step()
    engine.submit([list(b"return")], RowSampling(8, temperature=0), collect(outputs, "g"))
    while engine.rows or engine.waiting:
        engine.step()
    for index in range(3):
        expected = alone(model, prompt, 10, temperature=0.9, top_p=0.8, seed=7 + index)
        assert outputs["s", index]["text"] == tokenizer.decode([t for t in expected if t < 256])
    greedy = alone(model, list(b"return"), 8, temperature=0)
    assert outputs["g", 0]["text"] == tokenizer.decode([t for t in greedy if t < 256])
    assert len({outputs["s", index]["text"] for index in range(3)}) > 1


def test_stop_token_and_stop_string_end_a_choice(model):
    tokenizer = byte_tokenizer()
    prompt = list(b"x = ")
    raw = alone(model, prompt, 30, temperature=0)
    text = tokenizer.decode([t for t in raw if t < 256])
    stop = text[5:7]  # two characters from the middle of the greedy text
    stop_token = next(t for t in raw[3:] if t < 256)
    first = raw.index(stop_token)
    engine = Engine(model, tokenizer, max_batch=2)
    outputs = {}
    engine.submit([prompt], RowSampling(30, temperature=0), collect(outputs, "stop"), stop=(stop, "never seen"))
    engine.submit([prompt], RowSampling(30, temperature=0, stop_tokens=(stop_token,)), collect(outputs, "token"))
    while engine.rows or engine.waiting:
        engine.step()
    assert outputs["stop", 0]["text"] == text[: text.index(stop)] and outputs["stop", 0]["finish"] == "stop"
    assert outputs["token", 0] == {
        "text": tokenizer.decode([t for t in raw[:first] if t < 256]),
        "tokens": first + 1,
        "finish": "stop",
    }


def test_text_stream_holds_back_a_split_character_and_a_possible_stop():
    tokenizer = byte_tokenizer()
    stream = TextStream(tokenizer, ("END",))
    pieces = [stream.add(byte) for byte in "aé E".encode()]
    assert [text for text, _ in pieces] == ["a", "", "é", " ", ""]  # é is two bytes; "E" may begin "END"
    assert stream.add(ord("N")) == ("", False) and stream.add(ord("D")) == ("", True)
    stream = TextStream(tokenizer, ("END",))
    assert [stream.add(byte)[0] for byte in b"EX"] == ["", "EX"]


def test_cancelled_and_refused_requests(model):
    tokenizer = byte_tokenizer()
    engine = Engine(model, tokenizer, max_batch=2, max_queue=3)
    outputs = {}
    first = engine.submit([[1, 2, 3]], RowSampling(50, temperature=0), collect(outputs, "a"))
    engine.submit([[4, 5]], RowSampling(5, temperature=0), collect(outputs, "b"), n=2)
    engine.step()
    assert engine.stats() == {"slots": 2, "active": 2, "waiting": 1, "peak_active": 2, "cancelled": 0}
    engine.cancel(first)
    engine.step()  # the cancelled row is freed and the waiting choice takes it
    assert engine.stats() == {"slots": 2, "active": 2, "waiting": 0, "peak_active": 2, "cancelled": 1}
    while engine.rows:
        engine.step()
    expected = tokenizer.decode([t for t in alone(model, [4, 5], 5, temperature=0) if t < 256])
    assert outputs["b", 0]["text"] == outputs["b", 1]["text"] == expected
    with pytest.raises(Refused, match="max_tokens=100 exceed the model's context of max_seq_len=128"):
        engine.submit([list(range(40))], RowSampling(100), collect(outputs, "c"))
    with pytest.raises(Refused, match="--max-queue=3") as refused:
        engine.submit([[1]], RowSampling(2), collect(outputs, "d"), n=4)
    assert refused.value.status == 429


def test_a_failed_step_ends_its_requests_and_the_loop_goes_on(model, monkeypatch):
    """In the background thread: a decode step that raises ends the requests in it with an error output; the next
    request is served as usual; after stop, requests are refused."""
    from minigrok.serve import engine as engine_module

    tokenizer, failures = byte_tokenizer(), [RuntimeError("out of memory")]
    real = engine_module.decode_logits

    def decode_logits(*args):
        if failures:
            raise failures.pop()
        return real(*args)

    monkeypatch.setattr(engine_module, "decode_logits", decode_logits)
    engine = Engine(model, tokenizer, max_batch=4)
    engine.start()
    done, outputs = threading.Event(), []

    def emit(output):
        outputs.append(output)
        if output.finish_reason:
            done.set()

    engine.submit([list(b"def ")], RowSampling(10, temperature=0), emit)
    assert done.wait(30)
    assert outputs[-1].finish_reason == "error" and "generation failed: out of memory" in outputs[-1].error
    done.clear()
    outputs.clear()
    engine.submit([list(b"def ")], RowSampling(10, temperature=0), emit)
    assert done.wait(30)
    expected = [t for t in alone(model, list(b"def "), 10, temperature=0) if t < 256]
    assert "".join(o.text for o in outputs) == tokenizer.decode(expected) and outputs[-1].finish_reason == "length"
    engine.stop()
    assert not engine.thread.is_alive()
    with pytest.raises(Refused, match="shutting down"):
        engine.submit([[1]], RowSampling(2), emit)
