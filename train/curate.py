"""Curation before encoding: documents dropped for quality (too short, mostly repeated lines, non-text
characters) and as duplicates (exact: the same normalised text; near: MinHash LSH over word shingles), across every
source of the training split, and the validation split against the training split as well as itself.

The kept set depends on the documents alone, not on the order of files or sources: each split's documents are
judged in the order of their text's sha256 (then source name), the training split first. One pass reads every
document and keeps hashes and MinHash signatures only; the encoding reads the documents again and skips those dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigrok.config import ConfigError, show
from minigrok.files import write_json

from .corpus import CorpusSplit, Source, optional_module

CURATION_NAME = "curation.json"
SPLITS = ("train", "val")  # in the order they are curated
DEDUP = ("none", "exact", "near")
NUM_PERM = 128  # MinHash permutations: the Jaccard estimate's error is about 1/sqrt(128) ~ 0.09
SHINGLE_WORDS = 5  # words per shingle of near deduplication
MINHASH_SEED = 1
MINHASH_SCHEME = "affine32"  # named, so signatures stay the same whatever datasketch's default
EXAMPLES = 3  # dropped documents shown per filter in curation.json
EXAMPLE_CHARS = 80
_NON_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd\udc80-\udcff]")


@dataclass(frozen=True)
class Curation:
    """Which documents a run drops before encoding (the train.* fields of the same names; the defaults drop none)."""

    dedup: str = "none"
    near_dup_threshold: float = 0.8
    min_doc_chars: int = 0
    max_repeated_line_fraction: float = 1.0
    max_non_text_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.dedup not in DEDUP:
            raise ConfigError(f"train.dedup={show(self.dedup)} is unknown: choose one of {DEDUP}")
        threshold = self.near_dup_threshold
        if isinstance(threshold, bool) or not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
            raise ConfigError(f"train.near_dup_threshold={show(threshold)} must lie in (0, 1), e.g. 0.8")
        if isinstance(self.min_doc_chars, bool) or not (
            isinstance(self.min_doc_chars, int) and self.min_doc_chars >= 0
        ):
            raise ConfigError(f"train.min_doc_chars={show(self.min_doc_chars)} must be an integer >= 0 (0 keeps all)")
        for name in ("max_repeated_line_fraction", "max_non_text_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ConfigError(f"train.{name}={show(value)} must lie in [0, 1] (1 keeps all)")

    @classmethod
    def of(cls, config: Any) -> Curation:
        """The curation a TrainConfig (or anything with these fields) asks for."""
        return cls(**{name: getattr(config, name) for name in CURATION_FIELDS})

    def settings(self) -> dict[str, Any]:
        """The fields that change what is kept: the threshold counts only with near deduplication."""
        settings = dataclasses.asdict(self)
        if self.dedup != "near":
            del settings["near_dup_threshold"]
        return settings

    @property
    def active(self) -> bool:
        return self.settings() != Curation().settings()

    def quality_failure(self, text: str) -> str | None:
        """The first quality filter `text` fails (too_short, repeated_lines, non_text), or None."""
        if len(text) < self.min_doc_chars:
            return "too_short"
        if self.max_repeated_line_fraction < 1 and repeated_line_fraction(text) > self.max_repeated_line_fraction:
            return "repeated_lines"
        if self.max_non_text_fraction < 1 and non_text_fraction(text) > self.max_non_text_fraction:
            return "non_text"
        return None

    def reasons(self) -> list[str]:
        """The filters this curation applies, in the order they are tried."""
        enabled = {
            "too_short": self.min_doc_chars > 0,
            "repeated_lines": self.max_repeated_line_fraction < 1,
            "non_text": self.max_non_text_fraction < 1,
            "exact_duplicate": self.dedup != "none",
            "near_duplicate": self.dedup == "near",
        }
        return [reason for reason, on in enabled.items() if on]


CURATION_FIELDS = tuple(field.name for field in dataclasses.fields(Curation))


def repeated_line_fraction(text: str) -> float:
    """Share of a document's non-blank lines that repeat an earlier line of it (stripped): 0 when all differ."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return 1 - len(set(lines)) / len(lines) if lines else 0.0


def non_text_fraction(text: str) -> float:
    """Share of characters that are not text: control characters other than tab and newlines, U+FFFD, and invalid
    UTF-8 bytes (read as lone surrogates)."""
    return len(_NON_TEXT.findall(text)) / len(text) if text else 0.0


def normalise(text: str) -> str:
    """The text exact deduplication compares: NFKC, case-folded, every run of whitespace one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).digest()


def _shingles(words: list[str]) -> list[bytes]:
    """Word SHINGLE_WORDS-grams (a shorter document is one shingle), as MinHash reads them."""
    count = max(1, len(words) - SHINGLE_WORDS + 1)
    return [" ".join(words[i : i + SHINGLE_WORDS]).encode("utf-8", errors="surrogatepass") for i in range(count)]


def _example(text: str) -> str:
    return text[:EXAMPLE_CHARS] + ("..." if len(text) > EXAMPLE_CHARS else "")


@dataclass
class _Entry:
    """What the curation pass keeps of one document that passed the quality filters: hashes, never the text."""

    digest: bytes  # sha256 of the text as it is: the order documents are judged in
    source: str
    position: int  # among the source's non-empty documents of the split
    n_bytes: int
    exact: bytes  # sha256 of the normalised text (set when deduplicating)
    example: str
    signature: Any = None  # the MinHash of near deduplication


class Plan:
    """The documents a curation drops from each split of each source, found by one pass when first asked for."""

    def __init__(self, splits: dict[str, dict[str, CorpusSplit]], curation: Curation):
        self.splits, self.curation = splits, curation
        self.keys = {split: self._key(SPLITS[: SPLITS.index(split) + 1]) for split in SPLITS}
        self.key = self._key(SPLITS)  # curation.json's: of the whole plan
        self._dropped: dict[str, dict[str, set[int]]] | None = None
        self._report: dict | None = None

    def _key(self, splits: tuple[str, ...]) -> str:
        """sha256 of what decides the drops from `splits`: the settings, and with deduplication the files of these
        splits and of those before them (validation is deduplicated against training, not training against it)."""
        files = {split: {name: part.fingerprint() for name, part in self.splits[split].items()} for split in splits}
        payload = {"curation": self.curation.settings(), "corpus": files if self.curation.dedup != "none" else None}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()

    def dropped(self, split: str, name: str) -> set[int]:
        """Positions (among its non-empty documents) of the documents dropped from one split of one source."""
        if self._dropped is None:
            self._run()
        return self._dropped[split][name]

    def report(self) -> dict:
        """curation.json's content: per split and source, documents and bytes read, kept and dropped per filter."""
        if self._report is None:
            self._run()
        return self._report

    def _run(self) -> None:
        curation = self.curation
        near = _NearIndex(curation.near_dup_threshold) if curation.dedup == "near" else None
        seen: dict[bytes, dict] = {}  # sha256 of a kept document's normalised text -> where it is kept
        self._dropped = {split: {name: set() for name in parts} for split, parts in self.splits.items()}
        self._report = {"key": self.key, "settings": curation.settings(), "reasons": curation.reasons(), "splits": {}}
        for split in SPLITS:  # training first: validation is deduplicated against it
            counts = {name: _counts(curation.reasons()) for name in self.splits[split]}
            entries = self._read(split, counts, near)
            for entry in sorted(entries, key=lambda e: (e.digest, e.source, e.position)):
                original = seen.get(entry.exact)
                reason = "exact_duplicate" if original else None
                if near is not None and original is None:
                    original = near.similar(entry.signature)
                    reason = "near_duplicate" if original else None
                if reason:
                    self._drop(counts, split, entry, reason, original)
                    continue
                seen[entry.exact] = {"split": split, "source": entry.source, "text": entry.example}
                if near is not None:
                    near.add(entry.signature, seen[entry.exact])
            self._report["splits"][split] = {name: _finish(c) for name, c in counts.items()}

    def _read(self, split: str, counts: dict, near: _NearIndex | None) -> list[_Entry]:
        """Count every document of the split, drop those that fail a quality filter, and return the hashes (and
        MinHash signatures) of the others for deduplication (none when it is off)."""
        entries = []
        for name, part in self.splits[split].items():
            for position, text in enumerate(_non_empty(part)):
                n_bytes = len(text.encode("utf-8", errors="surrogateescape"))
                _add(counts[name]["read"], n_bytes)
                entry = _Entry(_digest(text), name, position, n_bytes, b"", _example(text))
                if failure := self.curation.quality_failure(text):
                    self._drop(counts, split, entry, failure)
                elif self.curation.dedup != "none":
                    normalised = normalise(text)
                    entry.exact = _digest(normalised)
                    entry.signature = near.signature(normalised.split()) if near is not None else None
                    entries.append(entry)
        return entries

    def _drop(self, counts: dict, split: str, entry: _Entry, reason: str, original: dict | None = None) -> None:
        self._dropped[split][entry.source].add(entry.position)
        dropped = counts[entry.source]["dropped"][reason]
        _add(dropped, entry.n_bytes)
        example = {"text": entry.example} | ({"duplicate_of": original} if original else {})
        examples = [*dropped["examples"], (entry.digest, example)]
        dropped["examples"] = sorted(examples, key=lambda pair: pair[0])[:EXAMPLES]


class _NearIndex:
    """MinHash LSH over the kept documents' signatures; a candidate counts when its estimated Jaccard similarity
    reaches the threshold (LSH's banding alone lets some lower ones through)."""

    def __init__(self, threshold: float):
        self.datasketch = optional_module("datasketch", "curate", "train.dedup=near (near-duplicate detection)")
        self.threshold = threshold
        self.lsh = self.datasketch.MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self.permutations = self.datasketch.MinHash(NUM_PERM, seed=MINHASH_SEED, scheme=MINHASH_SCHEME).permutations
        self.kept: list[tuple[Any, dict]] = []

    def signature(self, words: list[str]) -> Any:
        """The MinHash of the words' shingles, without the permutations each MinHash would otherwise hold."""
        minhash = self.datasketch.MinHash(
            NUM_PERM, seed=MINHASH_SEED, permutations=self.permutations, scheme=MINHASH_SCHEME
        )
        minhash.update_batch(_shingles(words))
        return self.datasketch.LeanMinHash(minhash)

    def similar(self, signature: Any) -> dict | None:
        """Where the earliest kept document as similar as the threshold is kept, or None."""
        matches = [i for i in self.lsh.query(signature) if self.kept[i][0].jaccard(signature) >= self.threshold]
        return self.kept[min(matches)][1] if matches else None

    def add(self, signature: Any, where: dict) -> None:
        self.lsh.insert(len(self.kept), signature)
        self.kept.append((signature, where))


def _counts(reasons: list[str]) -> dict:
    return {
        "read": {"documents": 0, "bytes": 0},
        "dropped": {r: {"documents": 0, "bytes": 0, "examples": []} for r in reasons},
    }


def _add(counts: dict, n_bytes: int) -> None:
    counts["documents"] += 1
    counts["bytes"] += n_bytes


def _finish(counts: dict) -> dict:
    """One source's report: read, kept, and each filter's drops with its examples (those of the lowest sha256)."""
    dropped = {
        reason: d | {"examples": [example for _, example in d["examples"]]} for reason, d in counts["dropped"].items()
    }
    kept = {key: counts["read"][key] - sum(d[key] for d in dropped.values()) for key in ("documents", "bytes")}
    return {"read": counts["read"], "kept": kept, "dropped": dropped}


def _non_empty(part: CorpusSplit) -> Iterator[str]:
    """The split's documents as encoding reads them: empty ones are skipped there, so they are not counted here."""
    return (text for text in part.documents() if text)


@dataclass(frozen=True, kw_only=True)
class CuratedSplit(CorpusSplit):
    """A split of one source less the documents its plan drops; its fingerprint adds the curation to the files'."""

    plan: Plan
    split: str
    name: str

    def documents_with_sources(self) -> Iterator[tuple[Source, str]]:
        dropped = self.plan.dropped(self.split, self.name)
        position = 0
        for source, text in super().documents_with_sources():
            if not text:
                continue
            if position not in dropped:
                yield source, text
            position += 1

    def fingerprint(self) -> str:
        payload = {"files": super().fingerprint(), "curation": self.plan.keys[self.split]}
        return hashlib.sha256(json.dumps(payload).encode("utf-8")).hexdigest()


def curate(splits: dict[str, dict[str, CorpusSplit]], curation: Curation) -> tuple[dict, Plan | None]:
    """({split: {source: split less its dropped documents}}, the plan behind it); the splits as they are and None
    when the curation drops nothing. Nothing is read until a document is."""
    if not curation.active:
        return splits, None
    plan = Plan(splits, curation)
    curated = {
        split: {
            name: CuratedSplit(part.sources, part.part, part.val_fraction, plan=plan, split=split, name=name)
            for name, part in parts.items()
        }
        for split, parts in splits.items()
    }
    return curated, plan


def summary(report: dict) -> str:
    """One line of curation.json: per split, documents kept of those read and how many each filter dropped."""
    parts = []
    for split, sources in report["splits"].items():
        read, kept = (sum(source[key]["documents"] for source in sources.values()) for key in ("read", "kept"))
        drops = {
            reason: sum(s["dropped"][reason]["documents"] for s in sources.values()) for reason in report["reasons"]
        }
        detail = ", ".join(f"{count:,} {reason.replace('_', ' ')}" for reason, count in drops.items() if count)
        parts.append(f"{split} kept {kept:,} of {read:,} documents" + (f" (dropped {detail})" if detail else ""))
    return "curation: " + "; ".join(parts)


def write_report(out_dir: Path, plan: Plan | None) -> None:
    """data/curation.json for the plan (reused when it records the same key); removed when nothing is curated."""
    path = out_dir / CURATION_NAME
    if plan is None:
        path.unlink(missing_ok=True)
        return
    try:
        if json.loads(path.read_text()).get("key") == plan.key:
            return
    except (OSError, ValueError, AttributeError):
        pass
    write_json(path, plan.report())
