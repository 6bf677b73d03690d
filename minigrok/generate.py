"""Token generation: one prefill over the prompts, then a short loop of single-token steps against a static KV cache.

Prompts of different lengths share one batch: each row keeps its own positions in the cache (see KVCache), so a row
generates exactly what it would alone. The prompts are right-padded for the prefill; a row's padding keys sit past
its length, masked out of every later step and overwritten as the row grows. Every decode step has the same shapes,
so `compile=True` compiles it once per batch size and cache length (cache lengths are rounded up to a power of two).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .machine import reading_back_is_free

if TYPE_CHECKING:
    from .model import KVCache, MiniGrok
    from .speculative import SpeculativeStats


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class RowSampling:
    """How one row is generated: its token budget, sampling parameters and stop tokens."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 0")
        temperature = self.temperature
        if (
            not isinstance(temperature, (int, float))
            or isinstance(temperature, bool)
            or not 0 <= temperature < math.inf
        ):
            raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 1 or None")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1] or be None")
        if not all(_is_int(token) for token in self.stop_tokens):
            raise ValueError(f"stop_tokens={list(self.stop_tokens)!r} must be integer token ids")


def exponential_noise(
    batch: int, vocab: int, generator: torch.Generator | list[torch.Generator | None] | None, device: torch.device
) -> torch.Tensor:
    """Exp(1) draws [batch, vocab]: from one generator for the batch, or row by row from one generator per row."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.empty(batch, vocab, device=device).exponential_(generator=generator)
    return torch.stack([torch.empty(vocab, device=device).exponential_(generator=row) for row in generator])


def sampling_probs(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    top_k: int | torch.Tensor | None,
    top_p: float | torch.Tensor | None,
) -> torch.Tensor:
    """The distribution [B, V] that sample_next draws from, of logits [B, V]: the softmax of the tempered, top-k and
    nucleus-filtered logits; one-hot at the argmax in a greedy row (temperature 0).

    temperature, top_k and top_p are one value for all rows or a [B] tensor of one per row (a row's top_k >= V or
    top_p = 1 keeps every token).
    """
    batch, vocab = logits.shape
    temperature = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device).expand(batch)
    greedy = temperature == 0
    logits = logits.float() / torch.where(greedy, 1.0, temperature)[:, None]
    if top_k is not None or top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        if top_k is not None:
            top_k = torch.as_tensor(top_k, device=logits.device).clamp(max=vocab).expand(batch)
            kth_largest = sorted_logits.gather(1, top_k[:, None] - 1)
            logits = logits.masked_fill(logits < kth_largest, float("-inf"))
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
        if top_p is not None:
            top_p = torch.as_tensor(top_p, dtype=torch.float32, device=logits.device).expand(batch)[:, None]
            probs = sorted_logits.softmax(dim=-1)
            # Drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays).
            drop_sorted = (probs.cumsum(dim=-1) - probs >= top_p) & (top_p < 1)
            logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    one_hot = torch.zeros_like(logits).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], one_hot, logits.softmax(dim=-1))


def draw(probs: torch.Tensor, generator: torch.Generator | list[torch.Generator | None] | None) -> torch.Tensor:
    """One token per row of probs [B, V] (any scale): the argmax of probs / Exp(1) noise is a draw from them."""
    return (probs / exponential_noise(*probs.shape, generator, probs.device)).argmax(dim=-1)


def sample_next(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    top_k: int | torch.Tensor | None,
    top_p: float | torch.Tensor | None,
    generator: torch.Generator | list[torch.Generator | None] | None,
) -> torch.Tensor:
    """Pick one token per row from logits [B, V]: argmax at temperature 0, else top-k / nucleus sampling.

    The parameters are those of sampling_probs. The noise of the draw comes from one generator for the batch or one
    per row (`generator` a list), so that a row's tokens depend on its own seed alone.
    """
    if not isinstance(temperature, torch.Tensor) and temperature == 0:
        return logits.argmax(dim=-1)
    return draw(sampling_probs(logits, temperature, top_k, top_p), generator)


def cache_length(needed: int, max_seq_len: int) -> int:
    """A KV cache's length: `needed` rounded up to a power of two (at most max_seq_len), so that generations of
    similar lengths share one compiled decode step."""
    return min(max_seq_len, max(16, 1 << (needed - 1).bit_length()))


def decode_logits(model: MiniGrok, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One decode step: logits [B, V] of the token after `tokens` [B] in each row; the cache advances by one."""
    return model.logits(model.hidden_states(tokens[:, None], cache)[:, 0])


@functools.cache
def compiled_decode_logits():
    """decode_logits under torch.compile with static shapes: one graph per model, batch size and cache length."""
    return torch.compile(decode_logits, dynamic=False, fullgraph=True)


def check_finite(logits: torch.Tensor, index: int) -> None:
    if not bool(torch.isfinite(logits).all()):  # else argmax picks token 0 forever, or sampling fails obscurely
        raise ValueError(
            f"the model's logits are NaN or infinite at generated token {index}: its weights are damaged or "
            "overflow in this dtype; check the checkpoint, or generate in fp32"
        )


def cache_dtype(model: MiniGrok) -> torch.dtype:
    """The dtype a KV cache holds: under autocast k and v come out in the autocast dtype (as attention wants q's)."""
    device = model.head_weight.device
    autocast = torch.is_autocast_enabled(device.type)
    return torch.get_autocast_dtype(device.type) if autocast else model.head_weight.dtype


def prefill_rows(model: MiniGrok, prompts: list[torch.Tensor], cache: KVCache) -> torch.Tensor:
    """Run the right-padded prompts through the model into an empty cache of one row each; the logits [B, V] after
    each prompt."""
    device = model.head_weight.device
    lengths = torch.tensor([len(prompt) for prompt in prompts], device=device)
    padded = torch.zeros(len(prompts), max(len(prompt) for prompt in prompts), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        padded[row, : len(prompt)] = prompt
    cache.right_padded(lengths)  # each row goes on after its own last prompt token
    hidden = model.hidden_states(padded, cache)
    last = hidden[torch.arange(len(prompts), device=device), lengths - 1]
    return model.logits(last)


def prefill(
    model: MiniGrok, prompts: list[torch.Tensor], max_len: int, rollback: int = 1
) -> tuple[torch.Tensor, KVCache]:
    """Run the right-padded prompts through the model into a fresh cache (see KVCache for `rollback`); the logits
    [B, V] after each prompt."""
    from .model import KVCache

    device = model.head_weight.device
    cache = KVCache(model.config, len(prompts), max_len, cache_dtype(model), device, rollback)
    return prefill_rows(model, prompts, cache), cache


def sampling_tensors(rows: list[RowSampling], vocab: int, device: torch.device) -> tuple:
    """sample_next's temperature, top_k and top_p for `rows`: a [B] tensor each, or one plain value where every row
    agrees (greedy needs no sort or noise, a full top_k or top_p none)."""
    temperature = [row.temperature for row in rows]
    temperature = 0 if not any(temperature) else torch.tensor(temperature, dtype=torch.float32, device=device)
    top_k = [vocab if row.top_k is None else row.top_k for row in rows]
    top_k = None if min(top_k) >= vocab else torch.tensor(top_k, device=device)
    top_p = [1.0 if row.top_p is None else row.top_p for row in rows]
    top_p = None if min(top_p) >= 1 else torch.tensor(top_p, dtype=torch.float32, device=device)
    return temperature, top_k, top_p


def check_lengths(model: MiniGrok, prompts: list[torch.Tensor], rows: list[RowSampling], whose: str = "") -> None:
    """Refuse an empty prompt, or one whose max_new_tokens would run past the model's max_seq_len."""
    for prompt, row in zip(prompts, rows, strict=True):
        if len(prompt) == 0:
            raise ValueError("a prompt is empty: generation needs at least one prompt token (e.g. a BOS id)")
        if len(prompt) + row.max_new_tokens > model.config.max_seq_len:
            raise ValueError(
                f"prompt of {len(prompt)} tokens + max_new_tokens={row.max_new_tokens} exceeds {whose}max_seq_len="
                f"{model.config.max_seq_len}: lower max_new_tokens to at most {model.config.max_seq_len - len(prompt)}"
            )


def stream_rows(
    model: MiniGrok,
    prompts: list[torch.Tensor],
    rows: list[RowSampling],
    generator: torch.Generator | list[torch.Generator | None] | None = None,
    compile: bool = False,
    draft_model: MiniGrok | None = None,
    num_draft_tokens: int = 4,
    stats: SpeculativeStats | None = None,
) -> Iterator[torch.Tensor]:
    """Yield [B] next tokens, one step at a time, until every row has emitted a stop token or its max_new_tokens.

    A row that is done repeats its stop token (or 0, past its max_new_tokens). Host syncs per step: the check
    that every row is done, and on CPU (where reading back is free) that the logits are finite. With a
    `draft_model`, the same tokens come from speculative decoding (minigrok.speculative), counted into `stats`.
    """
    if draft_model is not None:
        from .speculative import speculative_rows

        yield from speculative_rows(model, draft_model, prompts, rows, num_draft_tokens, generator, compile, stats)
        return
    check_lengths(model, prompts, rows)
    steps = max(row.max_new_tokens for row in rows)
    if steps == 0:
        return
    needed = max(len(prompt) + row.max_new_tokens for prompt, row in zip(prompts, rows, strict=True))
    logits, cache = prefill(model, prompts, cache_length(needed, model.config.max_seq_len))
    check_finite(logits, 0)
    device, vocab = logits.device, logits.shape[-1]
    temperature, top_k, top_p = sampling_tensors(rows, vocab, device)
    width = max(1, *(len(row.stop_tokens) for row in rows))
    stops = torch.tensor([[*row.stop_tokens, *[-1] * (width - len(row.stop_tokens))] for row in rows], device=device)
    budget = torch.tensor([row.max_new_tokens for row in rows], device=device)
    finished = budget == 0
    padding = torch.zeros(len(rows), dtype=torch.long, device=device)  # each finished row repeats its stop token
    step = compiled_decode_logits() if compile else decode_logits
    check_each_step = reading_back_is_free(logits)
    for index in range(steps):
        token = torch.where(finished, padding, sample_next(logits, temperature, top_k, top_p, generator))
        yield token
        hit_stop = (token[:, None] == stops).any(dim=-1) & ~finished
        padding = torch.where(hit_stop, token, padding)
        finished |= hit_stop | (budget <= index + 1)
        if index == steps - 1 or bool(finished.all()):
            return
        logits = step(model, token, cache)
        cache.lengths -= finished.long()  # a done row stays put (rewriting one position), inside the cache
        if check_each_step:
            check_finite(logits, index + 1)


def stream(
    model: MiniGrok,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: list[int] | None = None,
    seed: int | None = None,
    compile: bool = False,
    draft_model: MiniGrok | None = None,
    num_draft_tokens: int = 4,
    stats: SpeculativeStats | None = None,
) -> Iterator[torch.Tensor]:
    """Yield [B] next tokens until max_new_tokens or until every row has emitted a stop token."""
    model.check_input_ids(input_ids)
    row = RowSampling(max_new_tokens, temperature, top_k, top_p, tuple(stop_tokens or ()))
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids has 0 rows: generation needs at least one prompt")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: generation needs at least one prompt token (e.g. a BOS id)")
    generator = None if seed is None else torch.Generator(device=input_ids.device).manual_seed(seed)
    prompts = list(input_ids.to(model.head_weight.device))
    rows = [row] * len(prompts)
    yield from stream_rows(model, prompts, rows, generator, compile, draft_model, num_draft_tokens, stats)


def per_row(name: str, value, batch: int) -> list:
    """`value` for every row, or a list of one value per row."""
    if not isinstance(value, (list, tuple)):
        return [value] * batch
    if len(value) != batch:
        raise ValueError(
            f"{name} has {len(value)} values for {batch} prompts: give one per prompt, or a single value for all"
        )
    return list(value)


def generate_batch(
    model: MiniGrok,
    prompts: list[list[int] | torch.Tensor],
    max_new_tokens: int | list[int],
    temperature: float | list[float] = 1.0,
    top_k: int | None | list[int | None] = None,
    top_p: float | None | list[float | None] = None,
    stop_tokens: list[int] | list[list[int]] | None = None,
    seed: int | None | list[int | None] = None,
    compile: bool = False,
    draft_model: MiniGrok | None = None,
    num_draft_tokens: int = 4,
    stats: SpeculativeStats | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt (see MiniGrok.generate_batch)."""
    if not prompts:
        raise ValueError("prompts is empty: generation needs at least one prompt")
    device = model.head_weight.device
    prompts = [torch.as_tensor(prompt, dtype=torch.long).flatten().to(device) for prompt in prompts]
    for prompt in prompts:
        model.check_input_ids(prompt[None])
    batch = len(prompts)
    if stop_tokens and not isinstance(stop_tokens[0], (list, tuple)):
        stop_tokens = [stop_tokens] * batch
    rows = [
        RowSampling(*values, tuple(stops))
        for *values, stops in zip(
            per_row("max_new_tokens", max_new_tokens, batch),
            per_row("temperature", temperature, batch),
            per_row("top_k", top_k, batch),
            per_row("top_p", top_p, batch),
            per_row("stop_tokens", stop_tokens or [()] * batch, batch),
            strict=True,
        )
    ]
    seeds = [None if seed is None else seed + row for row in range(batch)] if _is_int(seed) or seed is None else seed
    seeds = per_row("seed", seeds, batch)
    generators = [None if s is None else torch.Generator(device=device).manual_seed(s) for s in seeds]
    generator = None if all(g is None for g in generators) else generators
    steps = list(stream_rows(model, prompts, rows, generator, compile, draft_model, num_draft_tokens, stats))
    columns = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in rows]
    out = []
    for tokens, row in zip(columns, rows, strict=True):
        tokens = tokens[: row.max_new_tokens]
        stop_at = next((i for i, token in enumerate(tokens) if token in row.stop_tokens), None)
        out.append(tokens if stop_at is None else tokens[: stop_at + 1])
    return out
