"""The token files the trainer reads (train.bin, val.bin, meta.json), encoded from a corpus and reused while fresh,
and the batches drawn from them."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minigrok.files import atomic_write, write_json

from .corpus import CorpusSplit, DataError, discover_corpus, split_corpus, utf8_clean
from .tokenizer import Tokenizer

SPLITS = ("train", "val")
META_NAME = "meta.json"
META_FORMAT = 1
_BATCH_CHARS = 1 << 20  # text per encode_batch call: large enough for the tokenizers thread pool, small in memory


@dataclass
class TokenFiles:
    """Where prepare_data put the token files, their dtype, and meta.json's content."""

    train_path: Path
    val_path: Path
    dtype: str
    meta: dict

    def path(self, split: str) -> Path:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}: choose one of {SPLITS}")
        return self.train_path if split == "train" else self.val_path

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of text per token in `split`: turns a loss in nats/token into bits/byte."""
        self.path(split)  # rejects an unknown split name
        stats = self.meta["splits"][split]
        return stats["n_bytes"] / stats["n_tokens"]

    def tokens(self, split: str) -> np.memmap:
        """The split's token ids, mapped from disk (not read into memory)."""
        return np.memmap(self.path(split), dtype=self.dtype, mode="r")

    def sampler(self, split: str, batch_size: int, seq_len: int, seed: int) -> BatchSampler:
        """The split's batches: the one way the trainer draws them."""
        return BatchSampler(self.path(split), self.dtype, batch_size, seq_len, seed)


def prepare_data(
    out_dir: str | Path,
    tokenizer: Tokenizer,
    train_paths: list[str] | None,
    val_paths: list[str] | None = None,
    val_fraction: float = 0.05,
) -> TokenFiles:
    """Encode the corpus (None = built-in) into out_dir/train.bin and val.bin plus meta.json; reuse fresh files.

    Each .bin is one flat array of token ids, documents joined by eos_id (empty documents are skipped), uint16 when
    the tokenizer has at most 65536 ids, else uint32. A split is re-encoded when the tokenizer, the files it reads
    (path, size, mtime) or the split rule changed, or its .bin is missing or the wrong size.
    """
    out_dir = Path(out_dir)
    splits = split_corpus(train_paths, val_paths, val_fraction)
    for name, split in splits.items():
        if not split.sources:
            raise DataError(f"{_split_word(name)} split is empty: give --val-data or more files")
    dtype = token_dtype(tokenizer)
    tokenizer_meta = {
        "fingerprint": tokenizer.fingerprint(),
        "kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
    }
    meta = {"format": META_FORMAT, "tokenizer": tokenizer_meta, "dtype": dtype.name, "splits": {}}
    old = _read_meta(out_dir / META_NAME)
    same_encoding = all(old.get(key) == meta[key] for key in ("format", "tokenizer", "dtype"))
    for name, split in splits.items():
        path = out_dir / f"{name}.bin"
        fingerprint = split.fingerprint()
        stats = old.get("splits", {}).get(name, {}) if same_encoding else {}
        fresh = (
            stats.get("corpus_fingerprint") == fingerprint
            and path.is_file()
            and path.stat().st_size == stats.get("n_tokens", -1) * dtype.itemsize
        )
        if not fresh:
            (out_dir / META_NAME).unlink(missing_ok=True)  # never let a stale meta.json vouch for a half-rebuilt set
            stats = _encode_split(name, split, tokenizer, path, dtype) | {"corpus_fingerprint": fingerprint}
        meta["splits"][name] = stats
    if meta != old:
        write_json(out_dir / META_NAME, meta)
    return TokenFiles(out_dir / "train.bin", out_dir / "val.bin", dtype.name, meta)


def token_dtype(tokenizer: Tokenizer) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32)


def encode_corpus(tokenizer: Tokenizer, paths: list[str] | None) -> tuple[np.ndarray, int]:
    """Every document of `paths` (None = the built-in corpus' validation files) as one token array joined by eos,
    and the UTF-8 bytes of their text; for scoring a model on a corpus."""
    split = split_corpus(None)["val"] if paths is None else CorpusSplit(tuple(discover_corpus(paths)))
    dtype = token_dtype(tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        stats = _encode_split("val", split, tokenizer, Path(tmp) / "tokens.bin", dtype)
        return np.fromfile(Path(tmp) / "tokens.bin", dtype=dtype), stats["n_bytes"]


def _split_word(name: str) -> str:
    return "training" if name == "train" else "validation"


def _read_meta(path: Path) -> dict:
    """meta.json's content, or {} when it is missing or unreadable (everything is then rebuilt)."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _encode_split(name: str, split: CorpusSplit, tokenizer: Tokenizer, path: Path, dtype: np.dtype) -> dict:
    stats = {"n_tokens": 0, "n_bytes": 0, "n_documents": 0}
    separator = np.array([tokenizer.eos_id], dtype)
    replaced = {"bytes": 0, "files": set(), "first": None}

    def texts() -> Iterator[str]:
        """The split's documents as the tokenizer takes them: every byte for the byte tokenizer, valid text (and a
        count of what was replaced) for BPE."""
        for source, text in split.documents_with_sources():
            stats["n_bytes"] += len(text.encode("utf-8", errors="surrogateescape"))  # the bytes on disk
            if tokenizer.kind == "bpe":
                text, count = utf8_clean(text)
                if count:
                    replaced["bytes"] += count
                    replaced["files"].add(source.path)
                    replaced["first"] = replaced["first"] or source.path
            yield text

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f, tqdm(desc=f"encoding {name}", unit="doc", disable=None) as bar:
            for batch in _batches(texts()):
                arrays = []
                for ids in tokenizer.encode_batch(batch):
                    if stats["n_documents"]:
                        arrays.append(separator)
                    arrays.append(np.asarray(ids, dtype))
                    stats["n_documents"] += 1
                tokens = np.concatenate(arrays)
                tokens.tofile(f)
                stats["n_tokens"] += len(tokens)
                bar.update(len(batch))
        if not stats["n_tokens"]:
            raise DataError(f"{_split_word(name)} split is empty: give --val-data or more files")

    atomic_write(path, write)
    if replaced["bytes"]:
        print(
            f"{_split_word(name)} split: {replaced['bytes']} bytes of invalid UTF-8 in {len(replaced['files'])} file(s), "
            f"the first {replaced['first']}, became U+FFFD for the BPE tokenizer (the byte tokenizer keeps every byte)",
            file=sys.stderr,
        )
    return stats


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    """Non-empty documents grouped into lists of about _BATCH_CHARS characters."""
    batch, chars = [], 0
    for text in documents:
        if not text:
            continue
        batch.append(text)
        chars += len(text)
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class BatchSampler:
    """Random windows from a token file. batch(step, micro_step, rows) depends only on (seed, step, micro_step, rows),

    so a resumed run, in any process, sees exactly the batches an uninterrupted run saw.
    """

    def __init__(self, path: str | Path, dtype: str | np.dtype, batch_size: int, seq_len: int, seed: int):
        path, dtype = Path(path), np.dtype(dtype)
        for field, value in (("batch_size", batch_size), ("seq_len", seq_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise DataError(f"{field}={value!r} must be a positive integer")
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run prepare_data to build the token files")
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise DataError(
                f"{path} has {size} bytes, not a whole number of {dtype.name} tokens: "
                "the file is corrupt or the dtype wrong; delete it and run prepare_data again"
            )
        self.n_tokens = size // dtype.itemsize
        if self.n_tokens < seq_len + 1:
            raise DataError(
                f"{path} has {self.n_tokens} tokens; need at least seq_len+1={seq_len + 1}: "
                "lower train.seq_len or add data"
            )
        self.path, self.batch_size, self.seq_len, self.seed = path, batch_size, seq_len, seed
        self.tokens = np.memmap(path, dtype=dtype, mode="r")

    def batch(self, step: int, micro_step: int = 0, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 [batch_size, seq_len]; targets are inputs shifted left by one token.

        `rows` reads only those rows of the batch: a process of a multi-process run takes its own slice of the
        global batch, so together the processes see exactly the batch one process would."""
        rng = np.random.default_rng([self.seed, step, micro_step])
        starts = rng.integers(0, self.n_tokens - self.seq_len, size=self.batch_size)[rows]
        windows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]
        windows = torch.from_numpy(windows.astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
