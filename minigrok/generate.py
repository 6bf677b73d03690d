"""Token generation: one prefill over the prompt, then a short loop of single-token steps against a KV cache."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import MiniGrok


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Pick one token per row from logits [B, V]: argmax at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays).
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_sampling(
    model: MiniGrok, batch: int, prompt_len: int, max_new_tokens: int, temperature: float, top_k, top_p
) -> None:
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if batch == 0:
        raise ValueError("input_ids has 0 rows: generation needs at least one prompt")
    if prompt_len == 0:
        raise ValueError("input_ids is empty: generation needs at least one prompt token (e.g. a BOS id)")
    if prompt_len + max_new_tokens > model.config.max_seq_len:
        raise ValueError(
            f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} exceeds max_seq_len="
            f"{model.config.max_seq_len}: lower max_new_tokens to at most {model.config.max_seq_len - prompt_len}"
        )
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be an integer >= 1 or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must lie in (0, 1] or be None")


def stream(
    model: MiniGrok,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: list[int] | None = None,
    seed: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield [B] next tokens until max_new_tokens or until every row has emitted a stop token."""
    from .model import KVCache

    model.check_input_ids(input_ids)
    batch, prompt_len = input_ids.shape
    _check_sampling(model, batch, prompt_len, max_new_tokens, temperature, top_k, top_p)
    if max_new_tokens == 0:
        return
    device = input_ids.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache(model.config, batch, prompt_len + max_new_tokens, model.embed.weight.dtype, device)
    stop = torch.tensor(stop_tokens or [], dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    padding = torch.zeros(batch, dtype=torch.long, device=device)  # each finished row repeats its stop token
    logits = model(input_ids, cache=cache).logits[:, -1]
    for step in range(max_new_tokens):
        if not bool(torch.isfinite(logits).all()):  # else argmax picks token 0 forever, or sampling fails obscurely
            raise ValueError(
                f"the model's logits are NaN or infinite at generated token {step}: its weights are damaged or "
                "overflow in this dtype; check the checkpoint, or generate in fp32"
            )
        token = sample_next(logits, temperature, top_k, top_p, generator)
        token = torch.where(finished, padding, token)
        yield token
        hit_stop = torch.isin(token, stop) & ~finished
        padding = torch.where(hit_stop, token, padding)
        finished |= hit_stop
        if bool(finished.all()) or step == max_new_tokens - 1:
            return
        logits = model(token[:, None], cache=cache).logits[:, -1]
