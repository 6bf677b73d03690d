"""Tokenizers: exact round trips of any text or bytes, specials that text cannot forge, save/load and vocab checks."""

import json
import random

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from minigrok.train.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    TokenizerError,
    VocabMismatchError,
    byte_tokenizer,
    check_vocab,
    load_or_train_tokenizer,
    padded_vocab_size,
    train_bpe,
)

WORDS = [
    "the", "quick", "brown", "fox", "Grüße", "naïve", "façade", "Привет", "мир", "Καλημέρα", "日本語", "中文字符",
    "한국어", "مرحبا", "שלום", "नमस्ते", "😀", "👩‍👩‍👧", "🇫🇷", "e\u0301", "a\u0308\u0323", "def", "return", "{}",
    "\t", "\n", "  ", "<|eos|>",
]  # fmt: skip


def multilingual_texts(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(multilingual_texts(), vocab_size=400)


def test_bpe_trains_to_the_requested_size_with_specials(bpe):
    assert bpe.kind == "bpe" and bpe.vocab_size == 400
    assert len({bpe.bos_id, bpe.eos_id, bpe.pad_id}) == 3
    assert all(0 <= i < bpe.vocab_size for i in (bpe.bos_id, bpe.eos_id, bpe.pad_id))
    assert len(bpe.encode("Grüße 日本語 😀")) < len("Grüße 日本語 😀".encode())  # merges were learned


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_bpe_round_trips_any_text_and_never_emits_specials(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.decode_bytes(ids) == text.encode("utf-8")
    assert not {bpe.bos_id, bpe.eos_id, bpe.pad_id} & set(ids)
    assert bpe.encode_batch([text, "x" + text]) == [ids, bpe.encode("x" + text)]


@settings(max_examples=200, deadline=None)
@given(data=st.binary())
def test_byte_tokenizer_round_trips_any_bytes(data):
    tok = byte_tokenizer()
    ids = tok.encode_bytes(data)
    assert ids == list(data)
    assert tok.decode_bytes(ids) == data
    assert tok.decode(ids) == data.decode("utf-8", errors="replace")


def test_byte_tokenizer_layout():
    tok = byte_tokenizer()
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == ("byte", 259, 256, 257, 258)
    assert tok.encode("é€😀") == list("é€😀".encode())
    assert tok.encode_batch(["a", "", "日"]) == [[97], [], list("日".encode())]


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_specials_never_come_from_plain_text_and_decode_drops_them(bpe, kind):
    tok = bpe if kind == "bpe" else byte_tokenizer()
    text = "a<|bos|>b <|eos|>\n<|pad|><|eos|>"
    ids = tok.encode(text)
    assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id, tok.pad_id]) == "hi"


def test_bpe_trained_on_special_strings_still_keeps_them_ordinary():
    tok = train_bpe(["<|eos|><|bos|> x <|pad|>"] * 200, vocab_size=300)
    ids = tok.encode("<|eos|><|bos|> x <|pad|>")
    assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids)


def test_decode_rejects_ids_outside_the_vocab(bpe):
    with pytest.raises(TokenizerError, match=f"id {bpe.vocab_size} is outside the tokenizer's {bpe.vocab_size} ids"):
        bpe.decode([1, bpe.vocab_size])
    with pytest.raises(TokenizerError, match="id -1"):
        byte_tokenizer().decode([-1])


def test_bpe_encode_bytes_needs_utf8(bpe):
    assert bpe.encode_bytes("ok ✓".encode()) == bpe.encode("ok ✓")
    with pytest.raises(TokenizerError, match="not valid UTF-8.*use the byte tokenizer"):
        bpe.encode_bytes(b"\xff\xfe")


@pytest.mark.parametrize("kind", ["bpe", "byte"])
@pytest.mark.parametrize("as_file", [False, True])
def test_save_load_keeps_ids_and_fingerprint(bpe, tmp_path, kind, as_file):
    tok = bpe if kind == "bpe" else byte_tokenizer()
    target = tmp_path / "tok.json" if as_file else tmp_path / "run"
    written = tok.save(target)
    assert written == (target if as_file else target / "tokenizer.json") and written.is_file()
    loaded = Tokenizer.load(target)
    text = "\n".join(multilingual_texts(20, seed=1))
    assert loaded.kind == kind and loaded.vocab_size == tok.vocab_size
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.fingerprint() == tok.fingerprint()
    assert not {loaded.bos_id, loaded.eos_id, loaded.pad_id} & set(loaded.encode("<|eos|>"))
    assert [p.name for p in written.parent.iterdir()] == [written.name]  # no temporary files left behind


def test_saved_bpe_is_a_genuine_tokenizers_file(bpe, tmp_path):
    backend = tokenizers.Tokenizer.from_file(str(bpe.save(tmp_path)))
    assert backend.encode("Привет мир").ids == bpe.encode("Привет мир")


def test_fingerprints_tell_tokenizers_apart(bpe):
    other = train_bpe(multilingual_texts(seed=1), vocab_size=300)
    fingerprints = {bpe.fingerprint(), other.fingerprint(), byte_tokenizer().fingerprint()}
    assert len(fingerprints) == 3 and all(len(f) == 64 for f in fingerprints)
    assert byte_tokenizer().fingerprint() == byte_tokenizer().fingerprint()


def test_load_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(TokenizerError, match="not valid JSON.*re-save"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece"}}))
    with pytest.raises(TokenizerError, match="not a byte-level BPE tokenizer"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"minigrok_tokenizer": "byte", "vocab_size": 300}))
    with pytest.raises(TokenizerError, match="not a byte tokenizer this version understands"):
        Tokenizer.load(tmp_path)


def test_load_rejects_a_bpe_without_our_specials(tmp_path):
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    backend.train_from_iterator(["hello world"] * 10, trainer=trainer)
    backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match=r"lacks the special tokens \['<\|bos\|>', '<\|eos\|>', '<\|pad\|>'\]"):
        Tokenizer.load(tmp_path)


def test_vocab_size_below_bytes_plus_specials_is_rejected():
    with pytest.raises(TokenizerError, match="vocab_size=258 is too small.*at least 259"):
        train_bpe(["abc"], vocab_size=258)


def test_load_or_train_tokenizer(bpe, tmp_path):
    calls = []

    def texts():
        calls.append(1)
        return multilingual_texts(50)

    assert load_or_train_tokenizer("byte", texts, 4096).kind == "byte" and not calls
    trained = load_or_train_tokenizer("bpe", texts, 300)
    assert trained.kind == "bpe" and trained.vocab_size <= 300 and calls == [1]
    bpe.save(tmp_path)
    assert load_or_train_tokenizer(str(tmp_path), texts, 300).fingerprint() == bpe.fingerprint()
    with pytest.raises(FileNotFoundError, match="use 'bpe', 'byte' or a path"):
        load_or_train_tokenizer(str(tmp_path / "nope"), texts, 300)


def test_padded_vocab_size_and_check_vocab(bpe):
    assert padded_vocab_size(byte_tokenizer()) == 320
    assert padded_vocab_size(bpe) == 448  # 400 -> next multiple of 64
    check_vocab(bpe, 400)
    check_vocab(bpe, padded_vocab_size(bpe))
    message = "tokenizer has 400 ids but model.vocab_size=399: set model.vocab_size >= 400 or use a smaller tokenizer"
    with pytest.raises(VocabMismatchError) as error:
        check_vocab(bpe, 399)
    assert str(error.value) == message and isinstance(error.value, ValueError)


def test_special_token_names():
    assert SPECIAL_TOKENS == ("<|bos|>", "<|eos|>", "<|pad|>")
