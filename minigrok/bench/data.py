"""`minigrok bench data`: how fast the trainer's encoder turns a corpus into token shards with 1 and 2 workers, and
what one batch costs the sampler as the shards grow to 10^9 tokens."""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .output import aligned
from .timing import measure_timing

SAMPLER_SIZES = (10**6, 10**7, 10**8, 10**9)  # tokens of the synthetic shard sets


def bench_encoding(
    paths: list[str] | None, tokenizer, workers: tuple[int, ...] = (1, 2), repeats: int = 1
) -> list[dict]:
    """MB/s and tokens/s of prepare_data (the trainer's encoder: both splits, into a temporary directory) over the
    corpus `paths` (None = built-in) with each number of `workers`, taken in turns `repeats` times; median seconds."""
    from ..train.data import prepare_data

    seconds: dict[int, list[float]] = {count: [] for count in workers}
    totals = {}
    for _ in range(repeats):
        for count in workers:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                files = prepare_data(tmp, tokenizer, paths, workers=count)
                seconds[count].append(time.perf_counter() - start)
            totals = {
                key: sum(split[key] for split in files.meta["splits"].values()) for key in ("n_bytes", "n_tokens")
            }
    rows = []
    for count, values in seconds.items():
        median = statistics.median(values)
        rows.append(
            {"workers": count, "seconds": median, "mb_per_s": totals["n_bytes"] / median / 1e6}
            | {"tokens_per_s": totals["n_tokens"] / median}
            | totals
        )
    return rows


def synthetic_stream(directory: Path, n_tokens: int, shard_tokens: int):
    """A TokenStream of n_tokens random uint16 ids in shards of shard_tokens, whose full shards are one file listed
    again and again: the sampler sees every shard, window and mapping of a corpus that size, the disk holds one shard."""
    from ..train.shards import TokenStream

    def random_file(name: str, tokens: int) -> Path:
        path = directory / name
        if not path.exists():
            np.random.default_rng(tokens).integers(0, 1 << 16, tokens, dtype=np.uint16).tofile(path)
        return path

    paths = [random_file("full.bin", shard_tokens)] * (n_tokens // shard_tokens) if n_tokens >= shard_tokens else []
    if n_tokens % shard_tokens:
        paths.append(random_file(f"rest-{n_tokens % shard_tokens}.bin", n_tokens % shard_tokens))
    return TokenStream(paths, np.uint16)


def bench_sampler(
    batch_size: int,
    seq_len: int,
    sizes: tuple[int, ...] = SAMPLER_SIZES,
    shard_tokens: int | None = None,
    repeats: int = 200,
) -> list[dict]:
    """Seconds per batch (a fresh step each call: new windows, new pages) of the trainer's BatchSampler over
    synthetic shard sets of each size; the shards sit in the page cache, so reads from disk are not in the figure."""
    from ..train.data import BatchSampler
    from ..train.shards import SHARD_TOKENS

    shard_tokens = shard_tokens or SHARD_TOKENS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_tokens in sizes:
            stream = synthetic_stream(Path(tmp), n_tokens, shard_tokens)
            sampler = BatchSampler({"corpus": stream}, batch_size, seq_len, seed=0)
            steps = itertools.count()
            timing = measure_timing(lambda s=sampler, n=steps: s.batch(next(n)), torch.device("cpu"), repeats)
            rows.append(
                {"n_tokens": n_tokens, "shards": len(stream.paths), "batch_size": batch_size, "seq_len": seq_len}
                | {"us_per_batch": timing.median_s * 1e6, "us_p20_p80": [timing.p20_s * 1e6, timing.p80_s * 1e6]}
                | {"tokens_per_s": batch_size * seq_len / timing.median_s, "stable": timing.stable, "note": timing.note}
            )
    return rows


def format_data_tables(result: dict) -> str:
    """The encoding and sampler rows of bench data as two aligned tables."""
    encoding = [["workers", "seconds", "MB/s", "tokens/s", "MB", "tokens"]] + [
        [str(r["workers"]), f"{r['seconds']:.3g}", f"{r['mb_per_s']:.3g}", f"{r['tokens_per_s']:,.0f}"]
        + [f"{r['n_bytes'] / 1e6:.3g}", f"{r['n_tokens']:,}"]
        for r in result["encoding"]
    ]
    sampler = [["corpus tokens", "shards", "batch", "us/batch", "p20-p80 us", "tokens/s", "note"]] + [
        [f"{r['n_tokens']:.0e}", str(r["shards"]), f"{r['batch_size']}x{r['seq_len']}", f"{r['us_per_batch']:.4g}"]
        + [f"{r['us_p20_p80'][0]:.4g}-{r['us_p20_p80'][1]:.4g}", f"{r['tokens_per_s']:,.0f}", r["note"]]
        for r in result["sampler"]
    ]
    return "\n".join(
        ["encoding (prepare_data):", *aligned(encoding), "", "sampler (BatchSampler.batch):", *aligned(sampler)]
    )
