"""Tokenizers: byte-level BPE trained with the `tokenizers` library, and a training-free byte tokenizer.

Both are saved as one tokenizer.json. A BPE tokenizer is a genuine `tokenizers` JSON (loadable by
`tokenizers.Tokenizer.from_file`); the byte tokenizer is a small JSON of our own,
{"minigrok_tokenizer": "byte", "vocab_size": 259, "special_tokens": {...}}.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from minigrok.files import atomic_write, write_json

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
TOKENIZER_NAME = "tokenizer.json"
BYTE_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def _byte_json() -> dict:
    """The content of the byte tokenizer's tokenizer.json."""
    return {
        "minigrok_tokenizer": "byte",
        "vocab_size": BYTE_VOCAB_SIZE,
        "special_tokens": {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)},
    }


class TokenizerError(ValueError):
    """A tokenizer file, option or input the tokenizer cannot use; the message names it and the fix."""


class VocabMismatchError(TokenizerError):
    """The tokenizer produces ids the model has no embedding rows for."""


def _byte_level_chars() -> dict[str, int]:
    """char -> byte for the ByteLevel pre-tokenizer's alphabet (GPT-2's bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    unprintable = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + n) for n, b in enumerate(unprintable)})
    return {c: b for b, c in chars.items()}


_BYTE_OF_CHAR = _byte_level_chars()


def _byte_backend() -> tokenizers.Tokenizer:
    """The byte tokenizer as a `tokenizers` one: a byte-level BPE with no merges, its 256 tokens the bytes in id order."""
    char_of_byte = {byte: char for char, byte in _BYTE_OF_CHAR.items()}
    vocab = {char_of_byte[byte]: byte for byte in range(256)}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return backend


def vocabulary_hash(content: dict) -> str:
    """sha256 of the vocabulary and merges in a tokenizer.json's content (its "model" section; the byte tokenizer's
    as save_hf writes it): equal for files that split text into the same ids, whatever else they record."""
    if content.get("minigrok_tokenizer") == "byte":
        content = json.loads(_byte_backend().to_str())
    model = content.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict):
        raise TokenizerError("the tokenizer.json has no model section with a vocab: re-save the tokenizer")
    merges = [merge.split(" ", 1) if isinstance(merge, str) else list(merge) for merge in model.get("merges") or []]
    canonical = {"type": model.get("type"), "vocab": model["vocab"], "merges": merges}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Tokenizer:
    """Text <-> ids. kind "bpe" wraps a byte-level BPE `tokenizers.Tokenizer`; kind "byte" uses id = byte value.

    Special ids are never produced from text (text spelling "<|eos|>" is encoded as ordinary tokens), and
    decode drops them.
    """

    def __init__(self, backend: tokenizers.Tokenizer | None = None):
        self._backend = backend
        self.kind = "byte" if backend is None else "bpe"
        if backend is None:
            self.vocab_size = BYTE_VOCAB_SIZE
            specials = _byte_json()["special_tokens"]
            self._token_bytes = [bytes([b]) for b in range(256)] + [b""] * len(SPECIAL_TOKENS)
        else:
            backend.encode_special_tokens = True  # not stored in tokenizer.json, so set on every load
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
            specials = {name: backend.token_to_id(name) for name in SPECIAL_TOKENS}
            missing = [name for name, i in specials.items() if i is None]
            if missing:
                raise TokenizerError(
                    f"the BPE tokenizer lacks the special tokens {missing}: train it with train_bpe (tokenizer spec 'bpe')"
                )
            self._token_bytes = self._bpe_token_bytes(set(specials.values()))
        self.bos_id, self.eos_id, self.pad_id = (specials[name] for name in SPECIAL_TOKENS)

    def _bpe_token_bytes(self, special_ids: set[int]) -> list[bytes]:
        table = [b""] * self.vocab_size
        for token, i in self._backend.get_vocab(with_added_tokens=True).items():
            if i in special_ids:
                continue
            if i >= self.vocab_size or any(c not in _BYTE_OF_CHAR for c in token):
                raise TokenizerError(
                    f"token {token!r} (id {i}) is not a byte-level BPE token: train the tokenizer with train_bpe"
                )
            table[i] = bytes(_BYTE_OF_CHAR[c] for c in token)
        return table

    def encode(self, text: str) -> list[int]:
        """Ids for text; the byte tokenizer also takes undecodable bytes carried as lone surrogates (surrogateescape)."""
        if self._backend is None:
            return list(text.encode("utf-8", errors="surrogateescape"))
        return self._backend.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._backend is None:
            return [list(text.encode("utf-8", errors="surrogateescape")) for text in texts]
        # encode_batch_fast (tokenizers >= 0.20) skips computing offsets, which we never use: about 3x faster
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        return [encoding.ids for encoding in encode(texts)]

    def encode_bytes(self, data: bytes) -> list[int]:
        """Ids for raw bytes. The byte tokenizer takes any bytes; BPE needs valid UTF-8."""
        if self._backend is None:
            return list(data)
        try:
            return self.encode(data.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise TokenizerError(
                f"a BPE tokenizer encodes text, and these bytes are not valid UTF-8 ({error}): use the byte tokenizer"
            ) from error

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes behind `ids` (special ids give nothing), even when they split a UTF-8 character."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(
                    f"id {i} is outside the tokenizer's {self.vocab_size} ids: mask the model's padded vocab rows "
                    "(ids >= tokenizer.vocab_size) when sampling"
                )
        return b"".join(self._token_bytes[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        """The content of tokenizer.json."""
        return _byte_json() if self._backend is None else json.loads(self._backend.to_str())

    def __reduce__(self):
        """Pickled as its tokenizer.json (as worker processes receive it) and rebuilt through the constructor, which
        sets again what tokenizer.json leaves out."""
        return _from_dict, (self.to_dict(),)

    def fingerprint(self) -> str:
        """sha256 hex of the canonical tokenizer.json content: equal fingerprints encode identically."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json atomically to `path` (a .json file, or a directory to put it in); returns the file."""
        file = _tokenizer_file(path)
        write_json(file, self.to_dict())
        return file

    def save_hf(self, directory: str | Path) -> None:
        """tokenizer.json + tokenizer_config.json that transformers' AutoTokenizer loads, giving the same ids for
        text (one difference: it reads "<|eos|>" spelled in text as the special token; we never do).

        A BPE tokenizer is already a `tokenizers` file; the byte tokenizer is written as one: a byte-level BPE
        with no merges, whose 256 tokens are the bytes in id order."""
        directory = Path(directory)
        backend = self._backend or _byte_backend()
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / TOKENIZER_NAME, lambda tmp: Path(tmp).write_text(backend.to_str(), encoding="utf-8"))
        names = dict(zip(("bos_token", "eos_token", "pad_token"), SPECIAL_TOKENS, strict=True))
        write_json(directory / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast"} | names)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json written by save (give the file or its directory)."""
        file = _tokenizer_file(path)
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} is missing: give a tokenizer.json or a directory holding one (written by Tokenizer.save)"
            )
        try:
            text = file.read_text(encoding="utf-8")
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise TokenizerError(
                f"{file} is not valid JSON ({error}): the file is corrupt; re-save the tokenizer"
            ) from error
        if not isinstance(data, dict):
            raise TokenizerError(f"{file} holds a JSON {type(data).__name__}, not a tokenizer: re-save the tokenizer")
        if "minigrok_tokenizer" in data:
            if data != _byte_json():
                raise TokenizerError(
                    f"{file} is not a byte tokenizer this version understands: re-save it with byte_tokenizer().save"
                )
            return cls()
        if (data.get("model") or {}).get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
            raise TokenizerError(f"{file} is not a byte-level BPE tokenizer: train one with tokenizer spec 'bpe'")
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise TokenizerError(f"{file} is not a valid tokenizers file ({error}): re-save the tokenizer") from error
        try:
            return cls(backend)
        except TokenizerError as error:
            raise TokenizerError(f"{file}: {error}") from error


def _from_dict(data: dict) -> Tokenizer:
    if "minigrok_tokenizer" in data:
        return Tokenizer()
    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(data)))


def _tokenizer_file(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".json" else path / TOKENIZER_NAME


def byte_tokenizer() -> Tokenizer:
    """256 byte ids (id == byte value) then <|bos|>=256, <|eos|>=257, <|pad|>=258; needs no training."""
    return Tokenizer()


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on `texts`; vocab_size counts the 256 bytes, the merges and the 3 specials.

    A small corpus may run out of merges, leaving the tokenizer's vocab_size below the one asked for.
    """
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < BYTE_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab_size={vocab_size!r} is too small for a byte-level BPE: it needs at least {BYTE_VOCAB_SIZE} "
            "(256 bytes + 3 specials); raise it or use the byte tokenizer"
        )
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.encode_special_tokens = True  # learn merges from "<|eos|>" in text like from any other text
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend)


def load_or_train_tokenizer(spec: str, texts_factory: Callable[[], Iterable[str]], vocab_size: int) -> Tokenizer:
    """spec "bpe": train on texts_factory() with vocab_size; "byte": the byte tokenizer; else a tokenizer.json or its directory."""
    if spec == "bpe":
        return train_bpe(texts_factory(), vocab_size)
    if spec == "byte":
        return byte_tokenizer()
    if not Path(spec).exists():
        raise FileNotFoundError(f"tokenizer {spec!r} does not exist: use 'bpe', 'byte' or a path to a tokenizer.json")
    return Tokenizer.load(spec)


def padded_vocab_size(tokenizer: Tokenizer) -> int:
    """tokenizer.vocab_size rounded up to a multiple of 64: the model vocab_size when training from scratch."""
    return 64 * math.ceil(tokenizer.vocab_size / 64)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raise VocabMismatchError when the tokenizer can emit ids the model has no rows for."""
    if tokenizer.vocab_size > model_vocab_size:
        raise VocabMismatchError(
            f"tokenizer has {tokenizer.vocab_size} ids but model.vocab_size={model_vocab_size}: "
            f"set model.vocab_size >= {tokenizer.vocab_size} or use a smaller tokenizer"
        )
