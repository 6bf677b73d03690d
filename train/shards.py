"""Token shards: one split of one corpus encoded as a stream of token ids (documents joined by eos) cut into
fixed-size files, shard-000000.bin, shard-000001.bin, ..., described by index.json; and the stream read back as one
array without loading it (TokenStream).

Encoding streams: documents are grouped into batches of about a MiB of text, encoded by `workers` processes (or in
this process), and written in order, so memory holds a few batches whatever the corpus size and the tokens do not
depend on the number of workers. Each shard is committed atomically, then the index, which records after every
shard where the stream stands (documents done, tokens of the next batch written) and the counts so far: a killed
encoding keeps its shards and continues from the last one.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minigrok.files import atomic_write, write_json

from .corpus import CorpusSplit, DataError, utf8_clean
from .tokenizer import Tokenizer

INDEX_NAME = "index.json"
INDEX_FORMAT = 1
SHARD_PATTERN = "shard-*.bin"
SHARD_TOKENS = 1 << 24  # the default: 32 MiB files of uint16 ids
BATCH_CHARS = 1 << 20  # text per encoding batch: large enough for the tokenizer's speed, small in memory


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.bin"


def token_dtype(tokenizer: Tokenizer) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32)


class TokenStream:
    """Token files read as one array of ids, each mapped from disk when first read: len() and [start:stop]."""

    def __init__(self, paths: Sequence[str | Path], dtype: str | np.dtype):
        self.paths, self.dtype = [Path(p) for p in paths], np.dtype(dtype)
        counts = []
        for path in self.paths:
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: run prepare_data to build the token files")
            size = path.stat().st_size
            if size % self.dtype.itemsize:
                raise DataError(
                    f"{path} has {size} bytes, not a whole number of {self.dtype.name} tokens: "
                    "the file is corrupt or the dtype wrong; delete it and run prepare_data again"
                )
            counts.append(size // self.dtype.itemsize)
        self.ends = np.cumsum(counts, dtype=np.int64)
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a TokenStream is read in contiguous slices: stream[start:stop]")
        start, stop, _ = key.indices(len(self))
        pieces = []
        shard = int(np.searchsorted(self.ends, start, side="right"))
        while start < stop:
            first = int(self.ends[shard - 1]) if shard else 0
            end = min(stop, int(self.ends[shard]))
            pieces.append(self._map(shard)[start - first : end - first])
            start, shard = end, shard + 1
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty(0, self.dtype)

    def _map(self, shard: int) -> np.memmap:
        if shard not in self._maps:
            self._maps[shard] = np.memmap(self.paths[shard], dtype=self.dtype, mode="r")
        return self._maps[shard]


def encode_shards(
    directory: Path,
    split: CorpusSplit,
    tokenizer: Tokenizer,
    fingerprint: str,
    shard_tokens: int,
    workers: int = 1,
    label: str = "corpus",
) -> dict:
    """Encode `split` into directory/shard-*.bin and index.json; returns the index.

    A complete index of the same encoding (format, tokenizer, dtype, corpus fingerprint, shard size) whose shard
    files have their sizes is reused as it is; otherwise encoding continues after the longest run of intact shards
    it lists (none: from the start). Returns an index whose n_tokens may be 0 (an empty split).
    """
    dtype = token_dtype(tokenizer)
    key = {
        "format": INDEX_FORMAT,
        "tokenizer": tokenizer.fingerprint(),
        "dtype": dtype.name,
        "corpus_fingerprint": fingerprint,
        "shard_tokens": shard_tokens,
    }
    index = _read_index(directory / INDEX_NAME)
    kept = (
        _intact_shards(directory, index.get("shards", []), dtype)
        if all(index.get(k) == v for k, v in key.items())
        else []
    )
    if index.get("complete") and kept == index["shards"]:
        return index
    for stale in directory.glob(".shard-*.tmp"):  # a shard a kill interrupted before its commit
        stale.unlink()
    start = {"n_documents": 0, "n_bytes": 0, "offset": 0, "invalid_utf8": {"bytes": 0, "files": 0, "first": None}}
    state = kept[-1]["state"] if kept else start
    if kept:
        print(f"{label}: continuing the encoding after its {len(kept)} committed shard(s)", file=sys.stderr)
    shards = list(kept)
    with tqdm(
        desc=f"encoding {label}",
        total=split.size_hint(),
        initial=state["n_bytes"],
        unit="B",
        unit_scale=True,
        disable=None,
    ) as bar:
        stream = _token_stream(split, tokenizer, dtype, state, workers, bar)
        while True:
            written, end_state = _write_shard(directory / shard_name(len(shards)), stream, shard_tokens)
            if not written:
                break
            shards.append({"file": shard_name(len(shards)), "n_tokens": written, "state": end_state})
            write_json(directory / INDEX_NAME, key | {"complete": False, "shards": shards})
    for extra in directory.glob(SHARD_PATTERN):  # shards of an older, longer encoding
        if extra.name not in {shard["file"] for shard in shards}:
            extra.unlink()
    final = shards[-1]["state"] if shards else state
    invalid = final["invalid_utf8"]
    if invalid["bytes"]:
        print(
            f"{label}: {invalid['bytes']} bytes of invalid UTF-8 in {invalid['files']} file(s), the first "
            f"{invalid['first']}, became U+FFFD for the BPE tokenizer (the byte tokenizer keeps every byte)",
            file=sys.stderr,
        )
    totals = {name: final[name] for name in ("n_bytes", "n_documents")} | {"n_tokens": _total(shards)}
    index = key | {"complete": True, "shards": shards} | totals | {"invalid_utf8": final["invalid_utf8"]}
    if shards:
        write_json(directory / INDEX_NAME, index)
    return index


def _total(shards: list[dict]) -> int:
    return sum(shard["n_tokens"] for shard in shards)


def _read_index(path: Path) -> dict:
    """index.json's content, or {} when it is missing or unreadable (everything is then encoded again)."""
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) and isinstance(index.get("shards"), list) else {}


def _intact_shards(directory: Path, shards: list, dtype: np.dtype) -> list[dict]:
    """The longest prefix of the index's shards whose files exist with the size the index gives them."""
    kept = []
    for shard in shards:
        path = directory / str(shard.get("file"))
        if not (isinstance(shard.get("n_tokens"), int) and path.is_file()):
            break
        if path.stat().st_size != shard["n_tokens"] * dtype.itemsize:
            break
        kept.append(shard)
    return kept


def _write_shard(path: Path, stream: _Stream, shard_tokens: int) -> tuple[int, dict | None]:
    """Commit the stream's next shard_tokens tokens (fewer at its end) to `path`; (tokens written, state after)."""
    if not stream.has_tokens():
        return 0, None
    written = 0

    def fill(tmp: str) -> None:
        nonlocal written
        with open(tmp, "wb") as f:
            while written < shard_tokens and stream.has_tokens():
                written += stream.write(f, shard_tokens - written)

    atomic_write(path, fill)
    return written, stream.state()


class _Stream:
    """Encoded batches as one stream of tokens, read forward in pieces, that knows the state at any point."""

    def __init__(self, batches: Iterator[tuple[Batch, np.ndarray]], offset: int, after_last: dict):
        self.batches, self.after_last = batches, after_last
        self.batch: Batch | None = None
        self.tokens = np.empty(0)
        self.offset = offset  # tokens of the current batch already written (a resumed encoding starts inside one)

    def has_tokens(self) -> bool:
        while self.offset >= len(self.tokens):
            nxt = next(self.batches, None)
            if nxt is None:
                return False
            offset = self.offset if self.batch is None else 0
            self.batch, self.tokens = nxt
            self.offset = offset
        return True

    def write(self, f, most: int) -> int:
        piece = self.tokens[self.offset : self.offset + most]
        piece.tofile(f)
        self.offset += len(piece)
        return len(piece)

    def state(self) -> dict:
        """Where a resumed encoding starts: after the current batch when it is all written, else inside it."""
        if self.offset < len(self.tokens):
            return self.batch.before | {"offset": self.offset}
        nxt = next(self.batches, None)
        if nxt is None:
            return _copy(self.after_last)
        self.batch, self.tokens, self.offset = nxt[0], nxt[1], 0
        return self.batch.before


def _token_stream(
    split: CorpusSplit, tokenizer: Tokenizer, dtype: np.dtype, state: dict, workers: int, bar: tqdm
) -> _Stream:
    """The split's token stream from `state` on; the bar counts bytes of text and shows tokens/s."""
    after = _copy(state) | {"offset": 0}
    started, tokens = time.perf_counter(), 0

    def counted() -> Iterator[tuple[Batch, np.ndarray]]:
        nonlocal tokens
        for batch, (ids, n_bytes, invalid) in _encoded(
            _batches(split, state["n_documents"]), tokenizer, dtype, workers
        ):
            if after["n_documents"] == 0:
                ids = ids[1:]  # the eos before the first document: documents are joined, not preceded
            batch.before = _copy(after)
            after["n_documents"] += len(batch.sources)
            after["n_bytes"] += n_bytes
            for position, count in invalid:
                _count_invalid(after["invalid_utf8"], batch.sources[position], count)
            tokens += len(ids)
            bar.update(n_bytes)
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - started):,.0f} tokens/s", refresh=False)
            yield batch, ids

    return _Stream(counted(), state["offset"], after)


def _copy(state: dict) -> dict:
    return json.loads(json.dumps(state))


def _count_invalid(counts: dict, source: Path, count: int) -> None:
    """Add a document's invalid UTF-8 bytes; a file's documents come together, so a new path is a new file."""
    if counts.get("last") != str(source):
        counts["files"] += 1
        counts["last"] = str(source)
    counts["bytes"] += count
    counts["first"] = counts["first"] or str(source)


@dataclass
class Batch:
    """Documents encoded together, their sources (for messages) and the stream's state before them."""

    texts: list[str]
    sources: list[Path]
    before: dict | None = None


def _batches(split: CorpusSplit, skip: int) -> Iterator[Batch]:
    """The split's non-empty documents after the first `skip`, in batches of about BATCH_CHARS characters."""
    texts, sources, chars = [], [], 0
    for source, text in split.documents_with_sources():
        if not text:
            continue
        if skip:
            skip -= 1
            continue
        texts.append(text)
        sources.append(source.path)
        chars += len(text)
        if chars >= BATCH_CHARS:
            yield Batch(texts, sources)
            texts, sources, chars = [], [], 0
    if texts:
        yield Batch(texts, sources)


def _encoded(
    batches: Iterable[Batch], tokenizer: Tokenizer, dtype: np.dtype, workers: int
) -> Iterator[tuple[Batch, tuple[np.ndarray, int, list[tuple[int, int]]]]]:
    """(batch, encode_texts of it) in order: in this process, or by `workers` processes with at most two batches
    each in flight, which bounds memory however far reading runs ahead."""
    if workers == 1:
        for batch in batches:
            yield batch, encode_texts(tokenizer, dtype, batch.texts)
        return
    # spawn, not fork: the parent may hold threads (torch's, the tokenizer's) that a forked child would inherit stuck
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(tokenizer, dtype)
    ) as pool:
        pending: deque = deque()
        try:
            for batch in batches:
                pending.append((batch, pool.submit(_encode_in_worker, batch.texts)))
                if len(pending) >= 2 * workers:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def encode_texts(tokenizer: Tokenizer, dtype: np.dtype, texts: list[str]) -> tuple[np.ndarray, int, list]:
    """(eos + ids of each text, concatenated; UTF-8 bytes of the texts as on disk; [(text's position, invalid
    UTF-8 bytes replaced)] for BPE, which encodes valid text only — the byte tokenizer keeps every byte)."""
    n_bytes = sum(len(text.encode("utf-8", errors="surrogateescape")) for text in texts)
    invalid = []
    if tokenizer.kind == "bpe":
        cleaned = []
        for position, text in enumerate(texts):
            text, count = utf8_clean(text)
            cleaned.append(text)
            if count:
                invalid.append((position, count))
        texts = cleaned
    separator = np.array([tokenizer.eos_id], dtype)
    arrays = [piece for ids in tokenizer.encode_batch(texts) for piece in (separator, np.asarray(ids, dtype))]
    return np.concatenate(arrays), n_bytes, invalid


_WORKER: dict = {}


def _start_worker(tokenizer: Tokenizer, dtype: np.dtype) -> None:
    # the workers are the parallelism: one thread each, rather than each also starting a thread per core
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(tokenizer=tokenizer, dtype=dtype)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, int, list]:
    return encode_texts(_WORKER["tokenizer"], _WORKER["dtype"], texts)
