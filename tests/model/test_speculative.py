"""Speculative decoding: greedy tokens are the target's alone, sampled tokens follow the target's distribution."""

import dataclasses

import pytest
import torch
from test_generate import make_model as make_tied_model
from test_generate import random_prompts

from minigrok import MiniGrok, ModelConfig, SpeculativeStats
from minigrok.speculative import accept_draft


def make_model(seed: int, **overrides) -> MiniGrok:
    # Untied heads: with a tied head a random model mostly repeats its input, and every draft would agree.
    return make_tied_model(seed, **(dict(tie_embeddings=False) | overrides))


def shallower(target: MiniGrok, **overrides) -> MiniGrok:
    """The target cut to fewer (or shared) layers: its first blocks, embedding, norm and head."""
    config = dataclasses.replace(target.config, n_unique_layers=None, **overrides)
    draft = MiniGrok(config).eval()
    missing, unexpected = draft.load_state_dict(target.state_dict(), strict=False)
    assert not missing and all(name.startswith("blocks.") for name in unexpected)
    return draft


def alone(model: MiniGrok, prompt: list[int], budget: int, stops: list[int] = ()) -> list[int]:
    return model.generate(torch.tensor([prompt]), budget, temperature=0, stop_tokens=list(stops))[0, len(prompt) :]


PAIRS = {
    "shallower": lambda: (target := make_model(1, init_std=0.05), shallower(target, n_layers=2)),
    "shared-layers": lambda: (target := make_model(2), shallower(target, n_layers=2, share="all")),
    "gqa-8:1-other-shape": lambda: (
        make_model(3, n_heads=8, n_kv_heads=1),
        make_model(4, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=48, max_seq_len=64),
    ),
}


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_greedy_tokens_are_the_targets_alone(pair, k):
    target, draft = PAIRS[pair]()
    stats = SpeculativeStats()
    for length, budget in [(1, 9), (7, 17), (13, 4)]:  # budgets ending mid-draft
        prompt = random_prompts([length], 101, seed=length)[0]
        expected = alone(target, prompt, budget)
        got = target.generate(torch.tensor([prompt]), budget, temperature=0, draft_model=draft, num_draft_tokens=k)
        assert got[0, length:].tolist() == expected.tolist()
        stop = int(expected[budget // 2])  # ends at (and keeps) its first occurrence, never past it
        spec = target.generate(
            torch.tensor([prompt]), budget, temperature=0, stop_tokens=[stop], draft_model=draft, stats=stats
        )
        assert torch.equal(spec[0, length:], alone(target, prompt, budget, [stop]))
    assert 0 <= stats.accepted <= stats.drafted and stats.drafted > 0
    if pair != "gqa-8:1-other-shape":  # a shallower copy of the target agrees with it on some tokens, not all
        assert 0 < stats.accepted < stats.drafted, stats


@pytest.mark.parametrize("pair", ["shallower", "gqa-8:1-other-shape"])
def test_rows_of_a_batch_each_accept_their_own_drafts(pair):
    target, draft = PAIRS[pair]()
    prompts = random_prompts([1, 30, 7, 12, 2], 101, seed=9)
    budgets = [13, 3, 20, 0, 1]
    expected = [alone(target, p, n).tolist() for p, n in zip(prompts, budgets, strict=True)]
    stops = [[expected[0][4]], [], [expected[2][11], 5], [], [7]]
    expected = [e[: e.index(s[0]) + 1] if s and s[0] in e else e for e, s in zip(expected, stops, strict=True)]
    got = target.generate_batch(
        prompts, budgets, temperature=0, stop_tokens=stops, draft_model=draft, num_draft_tokens=3
    )
    assert got == expected
    # generate pads a row that stopped early with its stop token, as without a draft.
    ids = torch.tensor(random_prompts([6, 6], 101, seed=10))
    plain = target.generate(ids, 15, temperature=0, stop_tokens=[expected[2][3]])
    assert torch.equal(target.generate(ids, 15, temperature=0, stop_tokens=[expected[2][3]], draft_model=draft), plain)
    streamed = target.generate_stream(ids, 15, temperature=0, stop_tokens=[expected[2][3]], draft_model=draft)
    assert torch.equal(torch.stack(list(streamed), dim=1), plain[:, 6:])


def test_sampled_rows_of_a_batch_draw_from_their_own_seeds_alone():
    target, draft = PAIRS["shallower"]()
    prompts = random_prompts([4, 11, 1], 101, seed=11)
    settings = dict(temperature=[0.9, 1.2, 0.7], top_p=[None, 0.8, None], seed=[3, 4, 5], stop_tokens=[[], [], [9]])
    speculative = dict(draft_model=draft, num_draft_tokens=3)
    together = target.generate_batch(prompts, [14, 5, 20], **settings, **speculative)
    for row, prompt in enumerate(prompts):
        single = {name: [values[row]] for name, values in settings.items()}
        assert target.generate_batch([prompt], [[14, 5, 20][row]], **single, **speculative) == [together[row]]
    assert [len(tokens) for tokens in together[:2]] == [14, 5]


def test_a_draft_identical_to_the_target_accepts_every_token():
    target = make_model(5)
    draft = make_model(5)
    stats = SpeculativeStats()
    prompt = torch.tensor(random_prompts([5], 101, seed=5))
    out = target.generate(prompt, 31, temperature=0, draft_model=draft, num_draft_tokens=4, stats=stats)
    assert torch.equal(out, target.generate(prompt, 31, temperature=0))
    # The first token comes from the prefill; each round then keeps 4 drafted tokens and adds one: 1 + 6 * 5 = 31.
    assert stats.accepted == stats.drafted == 24 and stats.rounds == 6


def test_the_rejection_rule_emits_tokens_distributed_as_p():
    """Many rows of one tiny case, q far from p (q covers tokens p never picks and misses some it does): each
    emitted position follows p within 4.5 sigma per token."""
    n, vocab = 200_000, 5
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0], [0.1, 0.0, 0.2, 0.3, 0.4], [0.25, 0.25, 0.0, 0.0, 0.5]])
    q = torch.tensor([[0.05, 0.05, 0.0, 0.6, 0.3], [0.1, 0.5, 0.2, 0.1, 0.1]])
    generator = torch.Generator().manual_seed(0)
    draft = torch.multinomial(q, n, replacement=True, generator=generator).T  # [n, 2]
    accepted, token = accept_draft(p.expand(n, 3, vocab), q.expand(n, 2, vocab), draft, generator)
    assert 0 < (accepted == 0).sum() < n and (accepted == 2).sum() > 0
    first = torch.where(accepted >= 1, draft[:, 0], token)
    second = torch.where(accepted >= 2, draft[:, 1], token)[accepted >= 1]  # given the first was kept
    bonus = token[accepted == 2]
    for emitted, expected in [(first, p[0]), (second, p[1]), (bonus, p[2])]:
        counts = torch.bincount(emitted, minlength=vocab).double()
        mean = len(emitted) * expected.double()
        assert ((counts - mean).abs() <= 4.5 * (mean * (1 - expected)).sqrt() + 1).all(), (counts, mean)


def test_greedy_rule_keeps_drafts_while_they_are_the_argmax():
    p = torch.nn.functional.one_hot(torch.tensor([[3, 1, 4, 0]]), 6).float()
    q = torch.nn.functional.one_hot(torch.tensor([[3, 1, 2]]), 6).float()
    accepted, token = accept_draft(p, q, torch.tensor([[3, 1, 2]]), None, greedy=True)
    assert accepted.tolist() == [2] and token.tolist() == [4]


def test_sampled_tokens_follow_the_targets_exact_distribution():
    """2,000 rows of one prompt, sampled at temperature 0.9 with top_k 12 through a draft far from the target: the
    joint of the first two tokens, and the third's marginal, match the target's own probabilities (float64)."""
    values = dict(vocab_size=16, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=48, max_seq_len=32)
    torch.manual_seed(7)
    target = MiniGrok(ModelConfig(**values, tie_embeddings=False, init_std=0.3)).eval()
    draft = MiniGrok(ModelConfig(**(values | dict(n_layers=1)), tie_embeddings=False, init_std=0.3)).eval()
    prompt, n, temperature, top_k = [3, 9, 1], 2000, 0.9, 12

    def probs(sequences: torch.Tensor) -> torch.Tensor:  # the target's next-token distribution, in float64
        with torch.no_grad():
            logits = target(sequences).logits[:, -1].double() / temperature
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        return logits.masked_fill(logits < kth, float("-inf")).softmax(dim=-1)

    torch.manual_seed(8)
    stats = SpeculativeStats()
    sampling = dict(temperature=temperature, top_k=top_k, draft_model=draft, num_draft_tokens=2, stats=stats)
    tokens = torch.tensor(target.generate_batch([prompt] * n, 3, **sampling))
    assert 0 < stats.accepted < 0.8 * stats.drafted, stats  # the draft is often rejected
    first = probs(torch.tensor([prompt]))[0]
    pairs = torch.cartesian_prod(torch.arange(16), torch.arange(16))  # (t1, t2)
    joint = (
        first[pairs[:, 0]]
        * probs(torch.cat([torch.tensor(prompt).expand(256, 3), pairs[:, :1]], 1))[torch.arange(256), pairs[:, 1]]
    )
    third = (joint[:, None] * probs(torch.cat([torch.tensor(prompt).expand(256, 3), pairs], 1))).sum(0)
    for emitted, expected in [(tokens[:, 0] * 16 + tokens[:, 1], joint), (tokens[:, 2], third)]:
        counts = torch.bincount(emitted, minlength=len(expected)).double()
        mean = n * expected
        assert ((counts - mean).abs() <= 4.5 * (mean * (1 - expected)).sqrt() + 1).all(), (counts, mean)


def test_speculative_arguments_are_checked():
    target = make_model(6)
    prompt = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="draft model's vocab_size=100 differs from the target's 101"):
        target.generate(prompt, 4, draft_model=make_model(7, vocab_size=100))
    for k in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=f"num_draft_tokens={k!r} must be an integer >= 1"):
            target.generate(prompt, 4, draft_model=make_model(7), num_draft_tokens=k)
    with pytest.raises(
        ValueError, match="exceeds the draft model's max_seq_len=16: lower max_new_tokens to at most 13"
    ):
        target.generate(prompt, 20, draft_model=make_model(7, max_seq_len=16))
    assert target.generate(prompt, 0, draft_model=make_model(7)).tolist() == [[1, 2, 3]]
