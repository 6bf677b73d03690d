"""Speculative decoding: a small draft model proposes k tokens, the target scores them all in one forward.

Each round, per row: the draft samples k tokens from its distributions q; the target runs its cache forward over
the last emitted token and the k drafted ones, giving its distributions p at all k + 1 positions; the rejection rule
(Leviathan et al. 2023, Chen et al. 2023) keeps a prefix of the draft and adds one token of its own, so every
emitted token follows p exactly (greedy: the target's argmax). Both caches then roll back to the kept prefix by
setting their per-row lengths: the keys past it are masked out until the next round overwrites them (the conv
layers' rings hold enough positions to go back that far).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .generate import (
    RowSampling,
    _is_int,
    cache_length,
    check_finite,
    check_lengths,
    compiled_decode_logits,
    decode_logits,
    draw,
    exponential_noise,
    prefill,
    sample_next,
    sampling_probs,
    sampling_tensors,
)
from .machine import reading_back_is_free

if TYPE_CHECKING:
    from .model import MiniGrok


@dataclass
class SpeculativeStats:
    """Counts of a speculative generation: `drafted` tokens proposed within the rows' budgets, `accepted` of them."""

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0  # target forwards after the prefill

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def check_draft(target: MiniGrok, draft: MiniGrok, num_draft_tokens: int) -> None:
    """Refuse a draft that cannot stand in for the target: another vocabulary or device, or k < 1."""
    if not _is_int(num_draft_tokens) or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens={num_draft_tokens!r} must be an integer >= 1 (typically 2 to 8)")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"the draft model's vocab_size={draft.config.vocab_size} differs from the target's "
            f"{target.config.vocab_size}: the draft must share the target's tokenizer and vocabulary"
        )
    if draft.head_weight.device != target.head_weight.device:
        raise ValueError(
            f"the draft model is on {draft.head_weight.device}, the target on {target.head_weight.device}: "
            "move both to one device"
        )


def accept_draft(
    p: torch.Tensor,
    q: torch.Tensor,
    draft: torch.Tensor,
    generator: torch.Generator | list[torch.Generator | None] | None,
    greedy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rejection rule on draft [B, k] drawn from q [B, k, V], given the target's p [B, k + 1, V].

    Drafted token i is accepted with probability min(1, p/q) while every one before it was; the first rejected one
    is replaced by a draw from norm(max(0, p - q)), and if all k are accepted a bonus token is drawn from p[k]. Each
    emitted token then follows p. Returns the accepted count [B] and the token after them [B]. `greedy` (one-hot
    p and q) needs no randomness: a token is kept while it is the target's argmax.
    """
    batch, k = draft.shape
    p_draft = p[:, :k].gather(2, draft[..., None])[..., 0]
    q_draft = q.gather(2, draft[..., None])[..., 0]
    # U = exp(-Exp(1)) is uniform on (0, 1]: accept when U <= p/q, so always when p >= q and never when p = 0.
    uniform = torch.ones_like(p_draft) if greedy else torch.exp(-exponential_noise(batch, k, generator, p.device))
    accepted = (uniform * q_draft <= p_draft).long().cumprod(dim=1).sum(dim=1)
    residual = (p - F.pad(q, (0, 0, 0, 1))).clamp(min=0)  # at position k, q is 0: the residual is p itself
    residual = residual[torch.arange(batch, device=p.device), accepted]
    return accepted, residual.argmax(dim=-1) if greedy else draw(residual, generator)


def speculative_rows(
    target: MiniGrok,
    draft: MiniGrok,
    prompts: list[torch.Tensor],
    rows: list[RowSampling],
    num_draft_tokens: int = 4,
    generator: torch.Generator | list[torch.Generator | None] | None = None,
    compile: bool = False,
    stats: SpeculativeStats | None = None,
) -> Iterator[torch.Tensor]:
    """Yield [B] next tokens as stream_rows does, the target's tokens drafted by `draft`, num_draft_tokens a round.

    A row never emits past its first stop token or its max_new_tokens; a done row repeats its stop token (or 0).
    `compile` compiles the draft's single-token steps. Host syncs: one per round.
    """
    check_draft(target, draft, num_draft_tokens)
    check_lengths(target, prompts, rows)
    check_lengths(draft, prompts, rows, whose="the draft model's ")
    steps = max(row.max_new_tokens for row in rows)
    if steps == 0:
        return
    needed = max(len(prompt) + row.max_new_tokens for prompt, row in zip(prompts, rows, strict=True))
    # A round writes up to num_draft_tokens positions past the kept ones, which are then rolled back.
    max_len = max(cache_length(needed, target.config.max_seq_len), needed + num_draft_tokens)
    # Each round sets the lengths back by up to num_draft_tokens + 2 (the draft's) from the furthest written, and
    # the target goes on by num_draft_tokens + 1 tokens at once: both within the rings' rollback.
    logits, target_cache = prefill(target, prompts, max_len, rollback=num_draft_tokens + 2)
    _, draft_cache = prefill(draft, prompts, max_len, rollback=num_draft_tokens + 2)
    check_finite(logits, 0)
    device, vocab = logits.device, logits.shape[-1]
    temperature, top_k, top_p = sampling_tensors(rows, vocab, device)
    greedy = not isinstance(temperature, torch.Tensor) and temperature == 0
    step = compiled_decode_logits() if compile else decode_logits
    check_each_round = reading_back_is_free(logits)
    stats = SpeculativeStats() if stats is None else stats
    sequences = [prompt.tolist() for prompt in prompts]
    new: list[list[int]] = [[] for _ in rows]
    done = [row.max_new_tokens == 0 for row in rows]

    def emit(row: int, tokens: list[int]) -> None:
        for token in tokens:
            new[row].append(token)
            sequences[row].append(token)
            if token in rows[row].stop_tokens or len(new[row]) == rows[row].max_new_tokens:
                done[row] = True
                return

    first = sample_next(logits, temperature, top_k, top_p, generator).tolist()
    for row in range(len(rows)):
        if not done[row]:
            emit(row, [first[row]])
    yielded = 0
    while True:
        active = [row for row in range(len(rows)) if not done[row]]
        ready = min((len(new[row]) for row in active), default=max(len(tokens) for tokens in new))
        for index in range(yielded, ready):
            yield torch.tensor([column_token(new[row], rows[row], index) for row in range(len(rows))], device=device)
        yielded = ready
        if not active:
            return
        # Every round drafts num_draft_tokens, even past a row's budget: a row's draws, and so its tokens, then
        # depend on its own generator alone, not on which rows share the batch.
        k = num_draft_tokens
        # Each active row goes on from its last two tokens (the draft may lack the one before last); a done row
        # computes throwaway tokens at positions 0 and 1.
        context = torch.tensor([sequences[row][-2:] if not done[row] else [0, 0] for row in range(len(rows))])
        lengths = torch.tensor([len(sequences[row]) if not done[row] else 2 for row in range(len(rows))])
        context, lengths = context.to(device), lengths.to(device)
        target_cache.lengths.copy_(lengths - 1)
        draft_cache.lengths.copy_(lengths - 2)
        tokens, q = [], []  # the drafted tokens [B] and the draft's distributions [B, V] they were drawn from
        draft_logits = draft.logits(draft.hidden_states(context, draft_cache)[:, -1])
        for index in range(k):
            q.append(sampling_probs(draft_logits, temperature, top_k, top_p))
            tokens.append(q[-1].argmax(dim=-1) if greedy else draw(q[-1], generator))
            if index < k - 1:
                draft_logits = step(draft, tokens[-1], draft_cache)
        drafted, q = torch.stack(tokens, dim=1), torch.stack(q, dim=1)
        logits = target.logits(target.hidden_states(torch.cat([context[:, 1:], drafted], dim=1), target_cache))
        if check_each_round:
            check_finite(logits, min(len(new[row]) for row in active))
        # The target's distributions at the k + 1 positions of each row, each with its row's sampling parameters.
        each = [v.repeat_interleave(k + 1) if isinstance(v, torch.Tensor) else v for v in (temperature, top_k, top_p)]
        p = sampling_probs(logits.flatten(0, 1), *each).view(len(rows), k + 1, vocab)
        accepted, token = accept_draft(p, q, drafted, generator, greedy)
        accepted, token, drafted_list = accepted.tolist(), token.tolist(), drafted.tolist()
        stats.rounds += 1
        for row in active:
            useful = min(k, rows[row].max_new_tokens - len(new[row]) - 1)  # drafts that could be emitted
            stats.drafted += useful
            stats.accepted += min(accepted[row], useful)
            emit(row, drafted_list[row][: accepted[row]] + [token[row]])


def column_token(tokens: list[int], row: RowSampling, index: int) -> int:
    """A row's token at step `index`: its own, or once it is done its stop token (0 past its max_new_tokens)."""
    if index < len(tokens):
        return tokens[index]
    return tokens[-1] if tokens and tokens[-1] in row.stop_tokens else 0
