"""Which text a run trains and validates on: files, directories and globs (or the built-in corpus: the running
interpreter's standard library sources), read as documents and split into training and validation.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}


class DataError(ValueError):
    """A corpus, split or token file the pipeline cannot use; the message names it and the fix."""


@dataclass(frozen=True)
class Source:
    """One corpus file: plain text is one document; .jsonl gives the "text" field of each line."""

    path: Path

    def documents(self) -> Iterator[str]:
        if self.path.suffix == ".jsonl":
            yield from _jsonl_texts(self.path)
        else:
            # Invalid UTF-8 bytes survive as lone surrogates: the byte tokenizer gets them back exactly,
            # BPE gets U+FFFD in their place (see utf8_clean).
            with open(self.path, encoding="utf-8", errors="surrogateescape", newline="") as f:
                yield f.read()

    def stat_key(self) -> list:
        stat = self.path.stat()
        return [str(self.path), stat.st_size, stat.st_mtime_ns]


def _jsonl_texts(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{lineno} is not valid JSON ({error}): fix or remove the line") from error
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(
                    f'{path}:{lineno} has no string "text" field: each line must be an object like {{"text": "..."}}'
                )
            yield record["text"]


def builtin_corpus_files() -> list[Path]:
    """The standard library's .py files, without site-packages/dist-packages and test/tests/idle_test directories.

    Sorted by path relative to the standard library, so the order is the same on every machine.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_STDLIB_DIRS]
        files += [Path(dirpath, name) for name in filenames if name.endswith(".py")]
    if not files:
        raise FileNotFoundError(f"no standard library sources under {root}: give training data paths instead")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_by_hash(
    files: Sequence[str | Path], val_fraction: float = 0.05, root: str | Path | None = None
) -> tuple[list[Path], list[Path]]:
    """Split files into (train, val) by the sha256 of each path relative to `root` (default: their common directory).

    A file goes to val when its hash, read as a fraction of 2**64, is below val_fraction; with two or more files,
    each side keeps at least one (the lowest hashes go to val). Both lists keep the input order.
    """
    _check_fraction(val_fraction)
    paths = [Path(os.path.abspath(f)) for f in files]
    if not paths:
        return [], []
    if root is None:
        root = os.path.commonpath([p.parent for p in paths])
    root = os.path.abspath(root)
    unit = {p: _hash_unit(Path(os.path.relpath(p, root)).as_posix()) for p in paths}
    by_hash = sorted(paths, key=lambda p: unit[p])
    n_val = sum(u < val_fraction for u in unit.values())
    if len(paths) >= 2:
        n_val = min(max(n_val, 1), len(paths) - 1)
    val = set(by_hash[:n_val])
    return [p for p in paths if p not in val], [p for p in paths if p in val]


def _hash_unit(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def _check_fraction(val_fraction: float) -> None:
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction!r} must be between 0 and 1 (exclusive), e.g. 0.05")


def discover_corpus(paths: list[str]) -> list[Source]:
    """Sources for files, directories and shell globs, in the order given; a file reached twice is kept once.

    A directory contributes its files recursively, sorted, skipping hidden entries and binary files (a NUL byte in
    the first 8 KiB). Files named directly or matched by a glob are read as given.
    """
    found: dict[Path, None] = {}
    for spec in paths:
        if any(c in spec for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(spec, recursive=True))]
            if not matches:
                raise FileNotFoundError(f"no files match the corpus pattern {spec!r}: check the pattern")
        else:
            matches = [Path(spec)]
            if not matches[0].exists():
                raise FileNotFoundError(f"corpus path {spec!r} does not exist: give a file, a directory or a glob")
        files = [f for m in matches for f in ([m] if m.is_file() else _text_files_under(m))]
        if not files:
            raise FileNotFoundError(f"corpus path {spec!r} holds no text files: give files with text in them")
        found.update(dict.fromkeys(f.resolve() for f in files))
    return [Source(path) for path in found]


def _text_files_under(directory: Path) -> list[Path]:
    files = []
    for path in directory.rglob("*"):
        relative = path.relative_to(directory)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts) and not _is_binary(path):
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(directory).as_posix())


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


@dataclass(frozen=True)
class CorpusSplit:
    """The documents of one split: whole sources ("all"), or the "head" or "tail" of a single source."""

    sources: tuple[Source, ...]
    part: str = "all"
    val_fraction: float = 0.0

    def documents(self) -> Iterator[str]:
        yield from (text for _, text in self.documents_with_sources())

    def documents_with_sources(self) -> Iterator[tuple[Source, str]]:
        if self.part == "all":
            for source in self.sources:
                yield from ((source, text) for text in source.documents())
        else:
            head, tail = _split_tail(self.sources[0], self.val_fraction)
            yield from ((self.sources[0], text) for text in (tail if self.part == "tail" else head))

    def clean_documents(self) -> Iterator[str]:
        """The documents as valid text, invalid UTF-8 bytes as U+FFFD: what a BPE tokenizer can train on."""
        yield from (utf8_clean(text)[0] for text in self.documents())

    def fingerprint(self) -> str:
        """sha256 of what this split reads: each file's path, size and mtime_ns, and the part taken."""
        payload = {"part": self.part, "val_fraction": self.val_fraction, "files": [s.stat_key() for s in self.sources]}
        return hashlib.sha256(json.dumps(payload).encode("utf-8")).hexdigest()


def _split_tail(source: Source, val_fraction: float) -> tuple[list[str], list[str]]:
    """(head, tail) documents of one file: the tail is its last val_fraction of text, cut at a line boundary.

    In a .jsonl file each line is a document, so the cut falls between documents.
    """
    if source.path.suffix == ".jsonl":
        documents = list(source.documents())
        start = _tail_start(documents, val_fraction)
        return documents[:start], documents[start:]
    lines = next(source.documents()).splitlines(keepends=True)
    start = _tail_start(lines, val_fraction)
    return ["".join(lines[:start])], ["".join(lines[start:])]


def _tail_start(pieces: list[str], val_fraction: float) -> int:
    """Index where the tail starts: the fewest last pieces (at least one, never all) holding val_fraction of the text."""
    target = val_fraction * sum(len(piece) for piece in pieces)
    start, held = len(pieces), 0
    while start > 1 and (held == 0 or held < target):
        start -= 1
        held += len(pieces[start])
    return start


def split_corpus(
    train_paths: list[str] | None, val_paths: list[str] | None = None, val_fraction: float = 0.05
) -> dict[str, CorpusSplit]:
    """{"train": ..., "val": ...} for a corpus (None = the built-in one), as prepare_data encodes them.

    val_paths, when given, are the validation corpus; else a single file holds out its tail and several files are
    split by split_by_hash.
    """
    _check_fraction(val_fraction)
    if train_paths is None:
        root = sysconfig.get_paths()["stdlib"]
        sources = [Source(path) for path in builtin_corpus_files()]
    else:
        root = None
        sources = discover_corpus(train_paths)
    if val_paths:
        val = discover_corpus(val_paths)
        shared = sorted(str(s.path) for s in set(sources) & set(val))
        if shared:
            raise DataError(f"{shared[0]} is in both the training and the validation corpus: remove it from one")
        return {"train": CorpusSplit(tuple(sources)), "val": CorpusSplit(tuple(val))}
    if len(sources) == 1:
        return {
            "train": CorpusSplit(tuple(sources), "head", val_fraction),
            "val": CorpusSplit(tuple(sources), "tail", val_fraction),
        }
    train, val = split_by_hash([s.path for s in sources], val_fraction, root)
    return {"train": CorpusSplit(tuple(map(Source, train))), "val": CorpusSplit(tuple(map(Source, val)))}


def utf8_clean(text: str) -> tuple[str, int]:
    """(text with each invalid UTF-8 byte, read as a lone surrogate, replaced by U+FFFD; how many there were)."""
    cleaned, count = _SURROGATE.subn("\ufffd", text)
    return cleaned, count


_SURROGATE = re.compile("[\udc80-\udcff]")
