"""Which text a run trains and validates on: files, directories and globs (or the built-in corpus: the running
interpreter's standard library sources), read as documents and split into training and validation; several such
corpora, named and weighted, make a mixture.

Plain text files are one document each; .jsonl lines, Parquet rows and the rows of a dataset directory written by
Hugging Face `datasets` (save_to_disk) are one document each, read from the text field (train.text_field) and
streamed, so memory holds one document at a time whatever the corpus size.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import json
import os
import re
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
DEFAULT_TEXT_FIELD = "text"
DEFAULT_NAME = "corpus"  # the name of a corpus given without one (a mixture of one)
_ROWS_PER_READ = 1024  # Parquet and dataset rows read at a time


class DataError(ValueError):
    """A corpus, split or token file the pipeline cannot use; the message names it and the fix."""


def optional_module(module: str, extra: str, what: str) -> ModuleType:
    """Import an optional extra only when a corpus needs it, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise DataError(f"{what} needs the {module} package: pip install 'minigrok[{extra}]'") from error


def is_dataset_dir(path: Path) -> bool:
    """A directory written by `datasets`' save_to_disk (a Dataset, or a DatasetDict of splits)."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


@dataclass(frozen=True)
class Source:
    """One corpus file (or saved dataset directory) and the field its records keep their text in."""

    path: Path
    text_field: str = DEFAULT_TEXT_FIELD

    @property
    def has_records(self) -> bool:
        """Whether the source is made of records (one document each) rather than one plain-text document."""
        return self.path.suffix in (".jsonl", ".parquet") or self.path.is_dir()

    def documents(self) -> Iterator[str]:
        if self.path.suffix == ".jsonl":
            yield from _jsonl_texts(self.path, self.text_field)
        elif self.path.suffix == ".parquet":
            yield from _parquet_texts(self.path, self.text_field)
        elif self.path.is_dir():
            yield from _dataset_texts(self.path, self.text_field)
        else:
            # Invalid UTF-8 bytes survive as lone surrogates: the byte tokenizer gets them back exactly,
            # BPE gets U+FFFD in their place (see utf8_clean).
            with open(self.path, encoding="utf-8", errors="surrogateescape", newline="") as f:
                yield f.read()

    def stat_key(self) -> list:
        """What the fingerprint of a split reads of this source: path, size and mtime_ns (of a directory: its files'
        total size and newest mtime), and the text field when it is not the default."""
        files = [self.path] if self.path.is_file() else [p for p in self.path.rglob("*") if p.is_file()]
        stats = [f.stat() for f in files]
        key = [str(self.path), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]
        # the default field leaves the key as it always was, so recorded runs keep their fingerprints
        return key + [self.text_field] if self.has_records and self.text_field != DEFAULT_TEXT_FIELD else key

    def size_hint(self) -> int:
        """About how many bytes of text the source holds (for a progress bar): its file sizes, uncompressed."""
        if self.path.suffix == ".parquet":
            metadata = (
                optional_module("pyarrow.parquet", "parquet", f"reading {self.path}").ParquetFile(self.path).metadata
            )
            return sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
        return self.stat_key()[1]


def _record_error(path: Path, field: str, found: Sequence[str]) -> DataError:
    return DataError(
        f"{path} has no text field {field!r} (it has {', '.join(map(repr, found)) or 'none'}): "
        "set train.text_field to the field that holds the text"
    )


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{lineno} is not valid JSON ({error}): fix or remove the line") from error
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(
                    f"{path}:{lineno} has no string {json.dumps(field)} field: each line must be an object like "
                    f'{{{json.dumps(field)}: "..."}} (or set train.text_field to the field that holds the text)'
                )
            yield record[field]


def _parquet_texts(path: Path, field: str) -> Iterator[str]:
    """The text column of a Parquet file, a batch of rows at a time; null cells are empty documents."""
    parquet = optional_module("pyarrow.parquet", "parquet", f"reading {path}")
    file = parquet.ParquetFile(path)
    schema = file.schema_arrow
    if field not in schema.names:
        raise _record_error(path, field, schema.names)
    if str(schema.field(field).type) not in ("string", "large_string"):
        raise DataError(
            f"{path}: column {field!r} holds {schema.field(field).type}, not text: set train.text_field to a text column"
        )
    for batch in file.iter_batches(batch_size=_ROWS_PER_READ, columns=[field]):
        yield from (text or "" for text in batch.column(0).to_pylist())


def _dataset_texts(path: Path, field: str) -> Iterator[str]:
    """The text field of a saved dataset (a DatasetDict gives its "train" split), memory-mapped by `datasets`."""
    datasets = optional_module("datasets", "datasets", f"reading the dataset directory {path}")
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataError(
                f"{path} holds the splits {sorted(dataset)} and no 'train': give one split's directory, e.g. "
                f"{path / sorted(dataset)[0]}"
            )
        dataset = dataset["train"]
    if field not in dataset.column_names:
        raise _record_error(path, field, dataset.column_names)
    for batch in dataset.select_columns([field]).iter(batch_size=_ROWS_PER_READ):
        for text in batch[field]:
            if text is not None and not isinstance(text, str):
                raise DataError(f"{path}: field {field!r} holds {type(text).__name__}, not text: set train.text_field")
            yield text or ""


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


def discover_corpus(paths: list[str], text_field: str = DEFAULT_TEXT_FIELD) -> list[Source]:
    """Sources for files, directories and shell globs, in the order given; a file reached twice is kept once.

    A directory contributes its files recursively, sorted, skipping hidden entries and binary files (a NUL byte in
    the first 8 KiB) other than Parquet; a saved dataset directory inside it is one source. Files named directly or
    matched by a glob are read as given.
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
        files = [f for m in matches for f in ([m] if m.is_file() else _sources_under(m))]
        if not files:
            raise FileNotFoundError(f"corpus path {spec!r} holds no text files: give files with text in them")
        found.update(dict.fromkeys(f.resolve() for f in files))
    return [Source(path, text_field) for path in found]


def _sources_under(directory: Path) -> list[Path]:
    if is_dataset_dir(directory):
        return [directory]
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        datasets = [d for d in dirnames if is_dataset_dir(Path(dirpath, d))]
        dirnames[:] = [d for d in dirnames if d not in datasets]
        found += [Path(dirpath, d) for d in datasets]
        files = (Path(dirpath, name) for name in filenames if not name.startswith("."))
        found += [f for f in files if f.is_file() and (f.suffix == ".parquet" or not _is_binary(f))]
    return sorted(found, key=lambda p: p.relative_to(directory).as_posix())


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
            source = self.sources[0]
            yield from ((source, text) for text in _part_documents(source, self.part, self.val_fraction))

    def clean_documents(self) -> Iterator[str]:
        """The documents as valid text, invalid UTF-8 bytes as U+FFFD: what a BPE tokenizer can train on."""
        yield from (utf8_clean(text)[0] for text in self.documents())

    def fingerprint(self) -> str:
        """sha256 of what this split reads: each file's path, size and mtime_ns, and the part taken."""
        payload = {"part": self.part, "val_fraction": self.val_fraction, "files": [s.stat_key() for s in self.sources]}
        return hashlib.sha256(json.dumps(payload).encode("utf-8")).hexdigest()

    def size_hint(self) -> int:
        """About how many bytes of text the split holds (the share of a single source's head or tail)."""
        total = sum(source.size_hint() for source in self.sources)
        share = {"all": 1.0, "head": 1 - self.val_fraction, "tail": self.val_fraction}[self.part]
        return int(total * share)


def _part_documents(source: Source, part: str, val_fraction: float) -> Iterator[str]:
    """The head or tail documents of one source: the tail is its last val_fraction of text, cut at a line boundary.

    A plain text file (one document) is cut between lines. A source of records is cut between records, in two
    streaming passes (the first measures the text), so a single large file never has to fit in memory: the tail is
    the fewest last records, at least one and never all, that hold val_fraction of the text.
    """
    if not source.has_records:
        lines = next(source.documents()).splitlines(keepends=True)
        start = _tail_start(lines, val_fraction)
        yield "".join(lines[:start] if part == "head" else lines[start:])
        return
    total = sum(len(text) for text in source.documents())
    target, before = val_fraction * total, 0
    for index, text in enumerate(source.documents()):
        before += len(text)
        # in the head while what follows this record still holds the target (the first record always is)
        in_head = index == 0 or (total - before > 0 and total - before >= target)
        if in_head == (part == "head"):
            yield text
        elif part == "head":
            return


def _tail_start(pieces: list[str], val_fraction: float) -> int:
    """Index where the tail starts: the fewest last pieces (at least one, never all) holding val_fraction of the text."""
    target = val_fraction * sum(len(piece) for piece in pieces)
    start, held = len(pieces), 0
    while start > 1 and (held == 0 or held < target):
        start -= 1
        held += len(pieces[start])
    return start


def split_corpus(
    train_paths: list[str] | None,
    val_paths: list[str] | None = None,
    val_fraction: float = 0.05,
    text_field: str = DEFAULT_TEXT_FIELD,
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
        sources = discover_corpus(train_paths, text_field)
    if val_paths:
        val = discover_corpus(val_paths, text_field)
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
    field = sources[0].text_field
    return {
        "train": CorpusSplit(tuple(Source(p, field) for p in train)),
        "val": CorpusSplit(tuple(Source(p, field) for p in val)),
    }


@dataclass(frozen=True)
class DataSource:
    """One corpus of a mixture: its name, its paths (None: the built-in corpus) and its weight in the batches
    (None: a corpus given without name and weight, the whole of the training data)."""

    name: str
    paths: tuple[str, ...] | None
    weight: float | None = None

    def spec(self) -> str:
        """The --data entry that gives this source back (the path made absolute when it is a mixture's)."""
        return f"{self.name}={os.path.abspath(self.paths[0])}:{self.weight}"


_NAMED = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_.-]*)=(.*)")


def parse_data(specs: list[str] | None) -> list[DataSource]:
    """--data as sources: paths of one corpus (None: the built-in one), or name=path:weight entries of a mixture.

    An entry is a mixture's when it starts with name= and is not itself an existing path; every entry must then be.
    """
    if not specs:
        return [DataSource(DEFAULT_NAME, None)]
    named = [_NAMED.fullmatch(spec) if not os.path.exists(spec) else None for spec in specs]
    if not any(named):
        return [DataSource(DEFAULT_NAME, tuple(specs))]
    if not all(named):
        plain = specs[named.index(None)]
        raise DataError(
            f"--data {plain!r} has no name: give every --data entry as name=path:weight (a mixture), or none of them"
        )
    sources = []
    for spec, match in zip(specs, named, strict=True):
        name, rest = match.groups()
        path, colon, weight_text = rest.rpartition(":")
        try:
            weight = float(weight_text) if colon and path else None
        except ValueError:
            weight = None
        if weight is None:
            raise DataError(f"--data {spec!r} is not name=path:weight: write e.g. {name}=data/{name}:0.5")
        if not weight > 0 or weight == float("inf"):
            raise DataError(f"--data {spec!r}: weight {weight_text} must be a positive number, e.g. {name}={path}:1")
        if name in [s.name for s in sources]:
            raise DataError(f"--data {spec!r}: the name {name!r} is given twice: give each source its own name")
        sources.append(DataSource(name, (path,), weight))
    return sources


def canonical_data(specs: list[str] | None) -> list[str] | None:
    """--data as a run records it: absolute paths (None: the built-in corpus), or absolute name=path:weight entries."""
    sources = parse_data(specs)
    if sources[0].weight is None:
        return None if sources[0].paths is None else [os.path.abspath(path) for path in sources[0].paths]
    return [source.spec() for source in sources]


def split_mixture(
    sources: list[DataSource], val_paths: list[str] | None, val_fraction: float, text_field: str = DEFAULT_TEXT_FIELD
) -> dict[str, dict[str, CorpusSplit]]:
    """{"train": {name: split}, "val": {name: split}}: each source split as split_corpus splits a corpus, or, with
    val_paths, each source wholly for training and val_paths (named "corpus") for validation."""
    splits: dict[str, dict[str, CorpusSplit]] = {"train": {}, "val": {}}
    for source in sources:
        paths = None if source.paths is None else list(source.paths)
        parts = split_corpus(paths, val_paths, val_fraction, text_field)
        splits["train"][source.name] = parts["train"]
        splits["val"][DEFAULT_NAME if val_paths else source.name] = parts["val"]
    return splits


def mixture_fingerprint(splits: dict[str, CorpusSplit]) -> str:
    """The fingerprint of a split of every source: a lone unnamed corpus keeps its split's own fingerprint."""
    if list(splits) == [DEFAULT_NAME]:
        return splits[DEFAULT_NAME].fingerprint()
    payload = {name: split.fingerprint() for name, split in splits.items()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def utf8_clean(text: str) -> tuple[str, int]:
    """(text with each invalid UTF-8 byte, read as a lone surrogate, replaced by U+FFFD; how many there were)."""
    cleaned, count = _SURROGATE.subn("\ufffd", text)
    return cleaned, count


_SURROGATE = re.compile("[\udc80-\udcff]")
