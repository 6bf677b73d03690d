"""The continuous-batching engine behind `minigrok serve`: one static KV cache of `max_batch` rows and one decode loop.

Each choice of a request is a sequence that takes one row of the cache. Between decode steps the loop admits
waiting sequences into the free rows (a prefill of their prompts into those rows alone, `KVCache.slots`), while the
busy rows keep their state; then one batched step samples a token for every busy row, each with its own
temperature, top_p and seeded generator, so a row generates what it would alone. Busy rows are kept at the front of
the cache: a finished row takes the last busy row's keys, so every step runs on rows 0 .. n - 1 only.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..generate import (
    RowSampling,
    cache_dtype,
    check_finite,
    decode_logits,
    prefill_rows,
    sample_next,
    sampling_tensors,
)
from ..machine import autocast, reading_back_is_free
from ..model import KVCache


class Refused(ValueError):
    """A request the engine cannot take: the message names the field, the value and the fix; `status` is the HTTP
    status it answers to (400 invalid, 429 the queue is full, 503 shutting down)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


@dataclass(frozen=True)
class Output:
    """What choice `index` of a request produced since its last output: new `text`, the `tokens` generated so far,
    and once it ends its finish_reason ("stop", "length", or "error" with the `error` message)."""

    index: int
    text: str
    tokens: int
    finish_reason: str | None = None
    error: str | None = None


class TextStream:
    """A choice's text as its tokens come: hands out the part that is final, holding back an unfinished UTF-8
    character and an ending that may begin a stop string; cut before the first stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.data = bytearray()
        self.text, self.sent = "", 0

    def add(self, token: int) -> tuple[str, bool]:
        """The new final text after `token`, and whether it ended at a stop string."""
        if token < self.tokenizer.vocab_size:  # a padding row of the embedding has no text
            self.data += self.tokenizer.decode_bytes([token])
        self.text = self.data.decode("utf-8", errors="replace")
        found = [index for index in (self.text.find(stop) for stop in self.stop) if index >= 0]
        if found:
            self.text = self.text[: min(found)]
            return self.flush(), True
        held = 1 if self.text.endswith("\ufffd") else 0  # perhaps the first bytes of a character
        for stop in self.stop:
            held = max(held, next((k for k in range(len(stop) - 1, 0, -1) if self.text.endswith(stop[:k])), 0))
        return self.flush(len(self.text) - held), False

    def flush(self, end: int | None = None) -> str:
        """The text not handed out yet, up to `end` (default: all of it)."""
        end = len(self.text) if end is None else max(end, self.sent)
        new, self.sent = self.text[self.sent : end], end
        return new


class Job:
    """One request: its choices' outputs go to `emit` (called from the engine's thread); `cancel` frees its rows."""

    def __init__(self, emit: Callable[[Output], None]):
        self.emit = emit
        self.cancelled = False


@dataclass(eq=False)
class Sequence:
    """One choice of a job: its prompt, sampling, generator and text so far; `last` is the token to feed next."""

    job: Job
    index: int
    prompt: list[int]
    sampling: RowSampling
    generator: torch.Generator | None
    text: TextStream
    tokens: int = 0
    last: int = 0


class Engine:
    """Continuous batching over one KVCache of `max_batch` rows; `max_queue` bounds the sequences waiting for one.

    `start` runs the loop in a background thread (matmuls in `dtype`); `step` is one turn of it, for tests.
    """

    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 256, dtype: str = "fp32"):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch={max_batch} and max_queue={max_queue} must be at least 1")
        self.model, self.tokenizer, self.dtype = model, tokenizer, dtype
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = model.head_weight.device
        self.cache = None  # built by the first step, inside the loop's autocast
        self.rows: list[Sequence] = []  # row i of the cache; rows past len(rows) are free
        self.logits: torch.Tensor | None = None  # [len(rows), V]: each busy row's next-token logits
        self.waiting: deque[Sequence] = deque()
        self.condition = threading.Condition()
        self.stopping = False
        self.cancelled = 0  # sequences dropped because their request was cancelled
        self.peak = 0  # the most rows busy at once so far
        self.thread: threading.Thread | None = None

    def submit(
        self,
        prompts: list[list[int]],
        sampling: RowSampling,
        emit: Callable[[Output], None],
        n: int = 1,
        seed: int | None = None,
        stop: tuple[str, ...] = (),
    ) -> Job:
        """Queue `n` choices of each prompt (choice i of prompt p has index p * n + i, seeded seed + index); their
        outputs go to `emit`. Refused when a prompt is unusable or the queue is full."""
        max_seq_len = self.model.config.max_seq_len
        for prompt in prompts:
            if not prompt:
                raise Refused("the prompt is empty: give at least one token", param="prompt")
            try:
                self.model.check_input_ids(torch.tensor([prompt]))
            except ValueError as error:
                raise Refused(str(error), param="prompt") from None
            if len(prompt) + sampling.max_new_tokens > max_seq_len:
                raise Refused(
                    f"the prompt's {len(prompt)} tokens + max_tokens={sampling.max_new_tokens} exceed the model's "
                    f"context of max_seq_len={max_seq_len} tokens: shorten the prompt or lower max_tokens to at most "
                    f"{max(max_seq_len - len(prompt), 0)}",
                    param="max_tokens" if len(prompt) < max_seq_len else "prompt",
                    code="context_length_exceeded",
                )
        job = Job(emit)
        sequences = []
        for index in range(len(prompts) * n):
            generator = None if seed is None else torch.Generator(self.device).manual_seed(seed + index)
            text = TextStream(self.tokenizer, stop)
            sequences.append(Sequence(job, index, prompts[index // n], sampling, generator, text))
        with self.condition:
            if self.stopping:
                raise Refused("the server is shutting down: retry on another", code="shutting_down", status=503)
            if len(self.waiting) + len(sequences) > self.max_queue:
                raise Refused(
                    f"the server is busy: {len(self.waiting)} sequences wait for a slot and this request adds "
                    f"{len(sequences)}, past --max-queue={self.max_queue}; retry later",
                    code="queue_full",
                    status=429,
                )
            self.waiting.extend(sequences)
            self.condition.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Drop the job's sequences: those waiting never start, busy ones free their rows before the next step."""
        job.cancelled = True

    @torch.no_grad()
    def step(self) -> None:
        """Sample one token for every busy row, free the finished rows, run one decode step for the rest, and admit
        waiting sequences into the free rows (their prefill gives their first logits)."""
        if self.cache is None:
            config = self.model.config
            self.cache = KVCache(config, self.max_batch, config.max_seq_len, cache_dtype(self.model), self.device)
        if self.rows:
            temperature, top_k, top_p = sampling_tensors(
                [row.sampling for row in self.rows], self.logits.shape[-1], self.device
            )
            generators = [row.generator for row in self.rows]
            generator = None if all(g is None for g in generators) else generators
            tokens = sample_next(self.logits, temperature, top_k, top_p, generator).tolist()
            self.free([index for index, token in enumerate(tokens) if not self.advance(self.rows[index], token)])
            self.logits = None
        if self.rows:
            last = torch.tensor([row.last for row in self.rows], device=self.device)
            self.logits = decode_logits(self.model, last, self.cache.slots(0, len(self.rows)))
            if reading_back_is_free(self.logits):
                check_finite(self.logits, max(row.tokens for row in self.rows))
        self.admit()
        self.peak = max(self.peak, len(self.rows))

    def admit(self) -> None:
        """Prefill waiting sequences into the free rows, after the busy ones."""
        new = []
        with self.condition:
            while self.waiting and len(self.rows) + len(new) < self.max_batch:
                sequence = self.waiting.popleft()
                if sequence.job.cancelled:
                    self.cancelled += 1
                else:
                    new.append(sequence)
        if not new:
            return
        start = len(self.rows)
        self.rows += new  # before the prefill, so that a failure reaches them too
        rows = self.cache.slots(start, start + len(new))
        rows.reset()
        prompts = [torch.tensor(sequence.prompt, device=self.device) for sequence in new]
        logits = prefill_rows(self.model, prompts, rows)
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])

    def advance(self, sequence: Sequence, token: int) -> bool:
        """Hand the sequence its new token's text; False when it is done (finished or cancelled)."""
        if sequence.job.cancelled:
            self.cancelled += 1
            return False
        sequence.tokens += 1
        sequence.last = token
        if token in sequence.sampling.stop_tokens:
            text, finish = sequence.text.flush(), "stop"
        else:
            text, stopped = sequence.text.add(token)
            finish = "stop" if stopped else "length" if sequence.tokens >= sequence.sampling.max_new_tokens else None
            if finish == "length":
                text += sequence.text.flush()
        if text or finish:
            sequence.job.emit(Output(sequence.index, text, sequence.tokens, finish))
        return finish is None

    def free(self, done: list[int]) -> None:
        """Free the rows `done`, moving the last busy rows into the holes (from the end, so a moved row is a busy one)."""
        for index in sorted(done, reverse=True):
            last = len(self.rows) - 1
            if index != last:
                self.cache.copy_row(last, index)
                self.rows[index] = self.rows[last]
            self.rows.pop()

    def fail(self, sequences: list[Sequence], message: str) -> None:
        """End the sequences with an error output."""
        for sequence in sequences:
            if not sequence.job.cancelled:
                sequence.job.emit(Output(sequence.index, "", sequence.tokens, "error", message))

    def run(self) -> None:
        """The loop: a step whenever there is work, until `stop`; a failed step ends its requests, not the loop."""
        with autocast(self.dtype, self.device):
            while True:
                with self.condition:
                    while not (self.waiting or self.rows or self.stopping):
                        self.condition.wait()
                    if self.stopping:
                        break
                try:
                    self.step()
                except Exception as error:  # noqa: BLE001 - reported to the requests it ended
                    self.fail(self.rows, f"generation failed: {error}")
                    self.rows, self.logits = [], None
        with self.condition:
            left, self.rows = [*self.rows, *self.waiting], []
            self.waiting.clear()
        self.fail(left, "the server shut down before this request finished")

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="minigrok-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """End the loop after its current step; requests still running end with an error output."""
        with self.condition:
            self.stopping = True
            self.condition.notify()
        if self.thread is not None:
            self.thread.join()

    def stats(self) -> dict[str, int]:
        """Rows in all and in use, sequences waiting, the most rows busy at once, sequences dropped by cancellation."""
        busy = {"active": len(self.rows), "waiting": len(self.waiting), "peak_active": self.peak}
        return {"slots": self.max_batch, **busy, "cancelled": self.cancelled}
