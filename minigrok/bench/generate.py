"""`minigrok bench generate`: greedy decode tokens/s, prefill latency, time to first token and peak memory of our
generation, against transformers' LlamaForCausalLM.generate with the same weights."""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import torch

from .memory import peak_bytes
from .timing import Timing, clock_resolution, sample_seconds


def our_calls(
    model, ids: torch.Tensor, new_tokens: int, compile: bool, draft=None, num_draft_tokens: int = 4, stats=None
) -> dict[str, Callable[[], torch.Tensor]]:
    """Our prefill (the prompt's forward into a fresh cache), first token and whole greedy generation; with a
    `draft`, also the whole greedy generation decoded speculatively, its drafts counted into `stats`."""
    from ..generate import cache_length, prefill

    max_len = cache_length(ids.shape[1] + new_tokens, model.config.max_seq_len)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return prefill(model, list(ids), max_len)[0]

    calls = {
        "prefill": forward,
        "first": lambda: model.generate(ids, 1, temperature=0, compile=compile),
        "full": lambda: model.generate(ids, new_tokens, temperature=0, compile=compile),
    }
    if draft is not None:
        speculative = dict(draft_model=draft, num_draft_tokens=num_draft_tokens, stats=stats)
        calls["speculative"] = lambda: model.generate(ids, new_tokens, temperature=0, compile=compile, **speculative)
    return calls


def hf_calls(llama, ids: torch.Tensor, new_tokens: int) -> dict[str, Callable[[], torch.Tensor]]:
    """The same three calls of transformers: a use_cache forward keeping the last logits, generate of 1 and of N."""
    mask = torch.ones_like(ids)

    def generate(n: int) -> torch.Tensor:
        return llama.generate(
            ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return llama(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1).logits

    return {"prefill": forward, "first": lambda: generate(1), "full": lambda: generate(new_tokens)}


def load_hf_copy(model):
    """transformers' LlamaForCausalLM holding our model's weights, through the minigrok.hf export."""
    from ..hf import export_hf, import_transformers

    transformers = import_transformers()

    with tempfile.TemporaryDirectory() as directory:
        export_hf(model, directory)
        return transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def bench_generate(
    config,
    batch_sizes: tuple[int, ...] = (1, 8),
    prompt_len: int = 128,
    new_tokens: int = 128,
    compare: tuple[str, ...] = (),
    compile: bool = False,
    repeats: int = 3,
    device: str = "cpu",
    model=None,
    draft=None,
    num_draft_tokens: int = 4,
    text_tokens: torch.Tensor | None = None,
) -> dict:
    """Greedy generation of random prompts in fp32, per batch size: decode tokens/s (the time of `new_tokens`
    beyond the first), prefill latency, time to first token and peak memory; with "hf" in `compare` the same of
    transformers' LlamaForCausalLM with our weights, timed interleaved in this process, and whether both produced
    the same tokens. Peak memory is that of the prefill and first token. With `compile`, the cold compile of each batch size's decode step is timed as `compile_s`.

    `model` (e.g. a trained checkpoint) replaces the random weights of `config`, and `text_tokens` (a 1-D token
    stream of text) gives the prompts as random windows of it instead of random ids. With a `draft` model the same
    generation is also decoded speculatively, timed interleaved with the target alone: its tokens/s over the whole
    generation, acceptance_rate (accepted / drafted tokens), speedup_vs_target (the target alone's generate_s over
    the speculative one's) and whether its tokens are the target's.
    """
    from ..model import MiniGrok
    from ..speculative import SpeculativeStats

    config = config if model is None else model.config
    if prompt_len + new_tokens > config.max_seq_len:
        raise ValueError(
            f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceeds max_seq_len={config.max_seq_len}: "
            "lower them or --set max_seq_len=..."
        )
    if text_tokens is not None and len(text_tokens) <= prompt_len:
        raise ValueError(f"--prompt-len {prompt_len} is longer than the {len(text_tokens)} tokens of text to cut from")
    if new_tokens < 2:
        raise ValueError(f"--new-tokens {new_tokens} must be >= 2: decode speed is timed beyond the first token")
    device = torch.device(device)
    torch.manual_seed(0)
    model = (MiniGrok(config) if model is None else model).to(device).eval()
    draft = None if draft is None else draft.to(device).eval()
    llama = load_hf_copy(model).to(device) if "hf" in compare else None
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": "fp32",
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "compile": compile,
        "repeats": repeats,
        "prompts": "random token ids" if text_tokens is None else "windows of text",
        "batches": [],
    }
    generator = torch.Generator().manual_seed(0)
    for batch in batch_sizes:
        if text_tokens is None:
            ids = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=generator).to(device)
        else:
            starts = torch.randint(0, len(text_tokens) - prompt_len, (batch,), generator=generator).tolist()
            ids = torch.stack([text_tokens[start : start + prompt_len] for start in starts]).to(device)
        stats = SpeculativeStats()  # every call of a batch size drafts alike: the rate is that of one call
        calls = {"ours": our_calls(model, ids, new_tokens, compile, draft, num_draft_tokens, stats)}
        if llama is not None:
            calls["hf"] = hf_calls(llama, ids, new_tokens)
        row = {"batch_size": batch}
        if compile:
            cold = sample_seconds(calls["ours"]["full"], 1, device)[0]
            warm = sample_seconds(calls["ours"]["full"], 1, device)[0]
            row["compile_s"] = cold - warm
        outputs = {name: named["full"]() for name, named in calls.items()}  # also the warm-up
        if draft is not None:
            speculative = calls["ours"]["speculative"]()
        seconds = {(name, kind): [] for name, named in calls.items() for kind in named}
        for _ in range(repeats):  # interleaved, so drift on a shared machine hits both alike
            for name, named in calls.items():
                for kind, call in named.items():
                    seconds[name, kind] += sample_seconds(call, 1, device)
        for name, named in calls.items():
            prefix = "" if name == "ours" else f"{name}_"
            timings = {kind: Timing.of(seconds[name, kind], clock_resolution()) for kind in named}
            decode_s = timings["full"].median_s - timings["first"].median_s
            row[f"{prefix}prefill_s"] = timings["prefill"].median_s
            row[f"{prefix}ttft_s"] = timings["first"].median_s
            row[f"{prefix}generate_s"] = timings["full"].median_s
            row[f"{prefix}decode_tokens_per_s"] = batch * (new_tokens - 1) / decode_s
            row[f"{prefix}stable"] = all(timing.stable for timing in timings.values())
            # Peak of the prefill and first token (our static cache is then whole), on the eager path: the CPU
            # tracker does not see inside a compiled graph's kernels, and slows every op it sees.
            eager = our_calls(model, ids, new_tokens, compile=False) if name == "ours" else named
            row[f"{prefix}peak_mb"] = peak_bytes(eager["first"], device)[0] / 2**20
        if draft is not None:
            speculative_s = Timing.of(seconds["ours", "speculative"], clock_resolution()).median_s
            row["speculative_generate_s"] = speculative_s
            row["speculative_tokens_per_s"] = batch * new_tokens / speculative_s
            row["acceptance_rate"] = stats.acceptance_rate
            row["speedup_vs_target"] = row["generate_s"] / speculative_s
            row["speculative_tokens_match_target"] = torch.equal(speculative, outputs["ours"])
        if llama is not None:
            row["decode_ratio_vs_hf"] = row["decode_tokens_per_s"] / row["hf_decode_tokens_per_s"]
            row["prefill_ratio_vs_hf"] = row["prefill_s"] / row["hf_prefill_s"]
            row["greedy_tokens_match_hf"] = torch.equal(outputs["ours"], outputs["hf"])
        result["batches"].append(row)
    if llama is not None:
        result["greedy_tokens_match_hf"] = all(row["greedy_tokens_match_hf"] for row in result["batches"])
    if draft is not None:
        result["num_draft_tokens"] = num_draft_tokens
        matches = [row["speculative_tokens_match_target"] for row in result["batches"]]
        result["speculative_tokens_match_target"] = all(matches)
    return result
