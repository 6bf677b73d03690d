"""The token files the trainer reads, encoded from the run's corpora and reused while fresh, and the batches drawn
from them.

data/<split>/<name>/ holds one split of one corpus as token shards with their index.json (see shards.py); a corpus
given without a name is "corpus". data/meta.json sums them up: the tokenizer, the dtype, and per split its tokens,
bytes, documents, corpus fingerprint and sources (with their weights). data/curation.json, when documents are
curated (see curate.py), says what each filter dropped.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minigrok.files import write_json

from .corpus import (
    DEFAULT_TEXT_FIELD,
    CorpusSplit,
    DataError,
    discover_corpus,
    mixture_fingerprint,
    parse_data,
    split_corpus,
    split_mixture,
)
from .curate import CURATION_NAME, SPLITS, Curation, curate, write_report
from .shards import INDEX_NAME, SHARD_TOKENS, TokenStream, encode_shards, shard_name, token_dtype
from .tokenizer import Tokenizer

META_NAME = "meta.json"
META_FORMAT = 2
FLAT_FILES = ("train.bin", "val.bin")  # the layout before shards: one flat file per split, re-encoded when met

__all__ = ["SHARD_TOKENS", "BatchSampler", "TokenFiles", "TokenStream", "encode_corpus", "prepare_data", "token_dtype"]


@dataclass
class TokenFiles:
    """Where prepare_data put the token shards (root = the data directory), their dtype, and meta.json's content."""

    root: Path
    dtype: str
    meta: dict

    def _split(self, split: str) -> dict:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}: choose one of {SPLITS}")
        return self.meta["splits"][split]

    def streams(self, split: str) -> dict[str, TokenStream]:
        """Each source's token stream in `split`, mapped from disk (not read into memory)."""
        return {
            name: TokenStream([self.root / split / name / shard_name(i) for i in range(stats["shards"])], self.dtype)
            for name, stats in self._split(split)["sources"].items()
        }

    def tokens(self, split: str) -> TokenStream:
        """The split's token ids, every source's shards read as one array (len and slices), mapped from disk."""
        self._split(split)
        return TokenStream([path for stream in self.streams(split).values() for path in stream.paths], self.dtype)

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of text per token in `split`: turns a loss in nats/token into bits/byte."""
        stats = self._split(split)
        return stats["n_bytes"] / stats["n_tokens"]

    def sampler(self, split: str, batch_size: int, seq_len: int, seed: int) -> BatchSampler:
        """The split's batches, each row from a source drawn by its weight: the one way the trainer draws them."""
        weights = {name: stats["weight"] for name, stats in self._split(split)["sources"].items()}
        return BatchSampler(self.streams(split), batch_size, seq_len, seed, weights, path=self.root / split)


def prepare_data(
    out_dir: str | Path,
    tokenizer: Tokenizer,
    train_paths: list[str] | None,
    val_paths: list[str] | None = None,
    val_fraction: float = 0.05,
    text_field: str = DEFAULT_TEXT_FIELD,
    workers: int = 1,
    shard_tokens: int = SHARD_TOKENS,
    curation: Curation | None = None,
) -> TokenFiles:
    """Encode the corpus (None = built-in; name=path:weight entries make a mixture) into token shards under out_dir
    plus meta.json; reuse fresh shards and continue an encoding a kill interrupted.

    Each split of each source is one stream of token ids, documents joined by eos_id (empty documents are skipped),
    uint16 when the tokenizer has at most 65536 ids, else uint32, cut into shards of shard_tokens. It is encoded
    again when the tokenizer, the files it reads (path, size, mtime), the split rule, the text field or the
    curation changed, or a shard is missing or the wrong size (from that shard on). `workers` processes encode it
    (1: this process). Curated documents are dropped before encoding, and data/curation.json reports them.
    """
    out_dir = Path(out_dir)
    sources = parse_data(train_paths)
    weights = {source.name: source.weight or 1.0 for source in sources}
    splits = split_mixture(sources, val_paths, val_fraction, text_field)
    curated, plan = curate(splits, curation or Curation())
    for split, parts in splits.items():
        for name, part in parts.items():
            if not part.sources:
                raise DataError(f"{_label(split, name, parts)} is empty: give --val-data or more files")
    meta = {
        "format": META_FORMAT,
        "tokenizer": {
            "fingerprint": tokenizer.fingerprint(),
            "kind": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size,
        },
        "dtype": token_dtype(tokenizer).name,
        "shard_tokens": shard_tokens,
        "splits": {},
    }
    if plan is not None:
        meta["curation"] = curation.settings()
    for split, parts in curated.items():
        totals = {"n_tokens": 0, "n_bytes": 0, "n_documents": 0}
        totals["corpus_fingerprint"] = mixture_fingerprint(splits[split])  # the files' (run.json records it)
        totals["sources"] = {}
        for name, part in parts.items():
            label = _label(split, name, parts)
            directory = out_dir / split / name
            index = encode_shards(directory, part, tokenizer, part.fingerprint(), shard_tokens, workers, label)
            if not index["n_tokens"] and plan is not None:
                write_report(out_dir, plan)
                raise DataError(
                    f"{label} is empty after curation ({out_dir / CURATION_NAME} says what each filter dropped): "
                    "relax train.dedup, train.min_doc_chars or train.max_*_fraction, or give more files"
                )
            if not index["n_tokens"]:
                raise DataError(f"{label} is empty: give --val-data or more files")
            counts = {key: index[key] for key in ("n_tokens", "n_bytes", "n_documents")}
            totals["sources"][name] = counts | {"shards": len(index["shards"]), "weight": weights.get(name, 1.0)}
            for key, value in counts.items():
                totals[key] += value
        meta["splits"][split] = totals
        _remove_stale_sources(out_dir / split, parts)
    _remove_flat_files(out_dir)
    write_report(out_dir, plan)
    if meta != _read_meta(out_dir / META_NAME):
        write_json(out_dir / META_NAME, meta)
    return TokenFiles(out_dir, meta["dtype"], meta)


def _label(split: str, name: str, parts: dict[str, CorpusSplit]) -> str:
    """How messages name one split of one source: "training split", or "training split of code" in a mixture."""
    word = "training split" if split == "train" else "validation split"
    return word if len(parts) == 1 else f"{word} of {name}"


def _remove_stale_sources(split_dir: Path, parts: dict[str, CorpusSplit]) -> None:
    """Drop the shards of sources the run no longer has (a mixture changed with --new-data)."""
    for directory in split_dir.iterdir():
        if directory.name not in parts and (directory / INDEX_NAME).is_file():
            shutil.rmtree(directory)


def _remove_flat_files(out_dir: Path) -> None:
    """A run directory of the flat layout has been encoded into shards (the same tokens): its files can go."""
    flat = [out_dir / name for name in FLAT_FILES if (out_dir / name).is_file()]
    for path in flat:
        path.unlink()
    if flat:
        print(
            f"{out_dir}: re-encoded the flat token files into shards (the same tokens) and removed them",
            file=sys.stderr,
        )


def _read_meta(path: Path) -> dict:
    """meta.json's content, or {} when it is missing or unreadable."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def encode_corpus(tokenizer: Tokenizer, paths: list[str] | None) -> tuple[np.ndarray, int]:
    """Every document of `paths` (None = the built-in corpus' validation files) as one token array joined by eos,
    and the UTF-8 bytes of their text; for scoring a model on a corpus."""
    split = split_corpus(None)["val"] if paths is None else CorpusSplit(tuple(discover_corpus(paths)))
    with tempfile.TemporaryDirectory() as tmp:
        index = encode_shards(Path(tmp), split, tokenizer, split.fingerprint(), SHARD_TOKENS)
        stream = TokenStream([Path(tmp) / shard["file"] for shard in index["shards"]], token_dtype(tokenizer))
        return np.array(stream[:]), index["n_bytes"]


class BatchSampler:
    """Random windows from token streams. batch(step, micro_step) depends only on (seed, step, micro_step), so a
    resumed run, in any process, sees exactly the batches an uninterrupted run saw.

    Each row picks its source by weight (with one source, no draw), then a window start uniformly in that source's
    stream. A window may cross a shard boundary: shards are cuts of one stream at fixed token counts, not
    boundaries of documents, so every window of the stream is equally likely, as with one flat file.
    """

    def __init__(
        self,
        streams: dict[str, TokenStream],
        batch_size: int,
        seq_len: int,
        seed: int,
        weights: dict[str, float] | None = None,
        path: str | Path | None = None,
    ):
        for field, value in (("batch_size", batch_size), ("seq_len", seq_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise DataError(f"{field}={value!r} must be a positive integer")
        self.names = list(streams)
        self.streams = [streams[name] for name in self.names]
        for name, stream in zip(self.names, self.streams, strict=True):
            if len(stream) < seq_len + 1:
                where = stream.paths[0].parent if len(stream.paths) > 1 else (stream.paths or [name])[0]
                raise DataError(
                    f"{where} has {len(stream)} tokens; need at least seq_len+1={seq_len + 1}: "
                    "lower train.seq_len or add data"
                )
        weights = weights or dict.fromkeys(self.names, 1.0)
        total = sum(weights[name] for name in self.names)
        self.probabilities = np.array([weights[name] / total for name in self.names])
        self.highs = np.array([len(stream) - seq_len for stream in self.streams], dtype=np.int64)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.path = Path(path) if path is not None else self.streams[0].paths[0]
        self.n_tokens = int(sum(len(stream) for stream in self.streams))

    def draw(self, step: int, micro_step: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(source of each row, start of its window): the whole batch's choices, cheap to make."""
        rng = np.random.default_rng([self.seed, step, micro_step])
        if len(self.streams) == 1:  # no source draw: the same windows as a single flat file gave
            return np.zeros(self.batch_size, np.int64), rng.integers(0, self.highs[0], size=self.batch_size)
        sources = rng.choice(len(self.streams), size=self.batch_size, p=self.probabilities)
        return sources, rng.integers(0, self.highs[sources])

    def batch(self, step: int, micro_step: int = 0, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 [rows of batch_size, seq_len]; targets are inputs shifted left by one token.

        `rows` reads part of the batch (rank r of a distributed run: rows [r*b:(r+1)*b] of the global batch); the
        parts of a batch concatenated are the whole batch."""
        if not isinstance(rows, slice):
            raise TypeError(f"rows={rows!r} must be a slice, e.g. slice(0, 8)")
        sources, starts = (part[rows] for part in self.draw(step, micro_step))
        length = self.seq_len + 1
        windows = [self.streams[source][start : start + length] for source, start in zip(sources, starts, strict=True)]
        windows = (
            torch.from_numpy(np.stack(windows).astype(np.int64))
            if windows
            else torch.empty(0, length, dtype=torch.int64)
        )
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def source_tokens(self, steps: Sequence[int], micro_steps: int) -> dict[str, int]:
        """Training tokens each source gave to the batches of `steps` (each of micro_steps micro-batches)."""
        counts = np.zeros(len(self.streams), np.int64)
        for step in steps:
            for micro_step in range(micro_steps):
                counts += np.bincount(self.draw(step, micro_step)[0], minlength=len(self.streams))
        return {name: int(count) * self.seq_len for name, count in zip(self.names, counts, strict=True)}
