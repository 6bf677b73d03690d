"""Data pipeline: corpus discovery, splits, token files and their reuse, and the seekable batch sampler."""

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from minigrok.train.corpus import DataError, builtin_corpus_files, discover_corpus, split_by_hash
from minigrok.train.data import BatchSampler, TokenStream, prepare_data
from minigrok.train.tokenizer import byte_tokenizer, train_bpe

BYTE = byte_tokenizer()


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.txt").write_text("alpha text\nsecond line é\n")
    (root / "b.md").write_text("# beta ✓ 日本\n")
    (root / "sub" / "c.py").write_text("print('gamma')\n")
    (root / "sub" / "empty.txt").write_text("")
    (root / "docs.jsonl").write_text('{"text": "doc one"}\n\n{"text": "doc two 😀", "id": 2}\n')
    (root / ".hidden" / "secret.txt").write_text("hidden")
    (root / "blob.bin").write_bytes(b"\x00\x01binary")
    return root


def read_tokens(info, split: str) -> list[int]:
    return info.tokens(split)[:].tolist()


def shard(info, split: str, number: int = 0) -> Path:
    return info.root / split / "corpus" / f"shard-{number:06d}.bin"


def expected_tokens(tokenizer, texts: list[str]) -> list[int]:
    tokens = []
    for text in (t for t in texts if t):
        tokens += ([tokenizer.eos_id] if tokens else []) + tokenizer.encode(text)
    return tokens


def test_discover_corpus_walks_dirs_skips_hidden_and_binary_and_reads_jsonl(corpus):
    sources = discover_corpus([str(corpus)])
    names = [s.path.relative_to(corpus.resolve()).as_posix() for s in sources]
    assert names == ["a.txt", "b.md", "docs.jsonl", "sub/c.py", "sub/empty.txt"]
    assert list(sources[2].documents()) == ["doc one", "doc two 😀"]
    assert list(sources[0].documents()) == ["alpha text\nsecond line é\n"]
    globbed = discover_corpus([str(corpus / "**" / "*.py"), str(corpus / "a.txt"), str(corpus / "*.txt")])
    assert [s.path.name for s in globbed] == ["c.py", "a.txt"]  # a file reached twice is kept once


def test_discover_corpus_errors(corpus):
    with pytest.raises(FileNotFoundError, match="corpus path '.*nope.txt' does not exist"):
        discover_corpus([str(corpus / "nope.txt")])
    with pytest.raises(FileNotFoundError, match="no files match"):
        discover_corpus([str(corpus / "*.csv")])
    bad = corpus / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(DataError, match='bad.jsonl:2 has no string "text" field'):
        list(discover_corpus([str(bad)])[0].documents())
    bad.write_text('{"text": "fine"}\n\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:3 is not valid JSON"):
        list(discover_corpus([str(bad)])[0].documents())


def test_prepare_data_encodes_documents_joined_by_eos(corpus, tmp_path):
    val = tmp_path / "val.txt"
    val.write_text("held out\n")
    info = prepare_data(tmp_path / "data", BYTE, [str(corpus)], [str(val)])
    docs = ["alpha text\nsecond line é\n", "# beta ✓ 日本\n", "doc one", "doc two 😀", "print('gamma')\n"]
    assert read_tokens(info, "train") == expected_tokens(BYTE, docs)
    assert read_tokens(info, "val") == BYTE.encode("held out\n")
    train = info.meta["splits"]["train"]
    assert train["n_documents"] == 5  # the empty file is skipped
    assert train["n_tokens"] == sum(len(BYTE.encode(d)) for d in docs) + 4
    assert train["n_bytes"] == sum(len(d.encode()) for d in docs)
    assert info.dtype == info.meta["dtype"] == "uint16"
    assert info.meta["tokenizer"]["fingerprint"] == BYTE.fingerprint()
    assert json.loads((tmp_path / "data" / "meta.json").read_text()) == info.meta
    assert info.bytes_per_token("val") == 1.0 and info.bytes_per_token("train") < 1.0  # eos separators carry no bytes
    files = sorted(p.relative_to(info.root).as_posix() for p in info.root.rglob("*") if p.is_file())
    assert files == ["meta.json"] + [
        f"{split}/corpus/{name}" for split in ("train", "val") for name in ("index.json", "shard-000000.bin")
    ]


def test_prepare_data_reuses_fresh_files_and_rebuilds_stale_ones(corpus, tmp_path, monkeypatch):
    val = tmp_path / "val.txt"
    val.write_text("held out\n")
    out = tmp_path / "data"
    first = prepare_data(out, BYTE, [str(corpus)], [str(val)])
    mtimes = {p: p.stat().st_mtime_ns for p in (shard(first, "train"), shard(first, "val"))}

    tok = byte_tokenizer()
    monkeypatch.setattr(tok, "encode_batch", lambda texts: pytest.fail("fresh data was re-encoded"))
    again = prepare_data(out, tok, [str(corpus)], [str(val)])
    assert again.meta == first.meta and {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

    (corpus / "b.md").write_text("# beta, now longer\n")  # only the training split reads this file
    encoded = []
    monkeypatch.setattr(tok, "encode_batch", lambda texts: encoded.extend(texts) or BYTE.encode_batch(texts))
    changed = prepare_data(out, tok, [str(corpus)], [str(val)])
    assert "# beta, now longer\n" in encoded and "held out\n" not in encoded
    growth = len(b"# beta, now longer\n") - len("# beta ✓ 日本\n".encode())
    assert changed.meta["splits"]["train"]["n_tokens"] == first.meta["splits"]["train"]["n_tokens"] + growth
    assert changed.meta["splits"]["val"] == first.meta["splits"]["val"]

    bpe = train_bpe(["alpha beta gamma doc one two"] * 20, vocab_size=280)
    rebuilt = prepare_data(out, bpe, [str(corpus)], [str(val)])
    assert rebuilt.meta["tokenizer"]["fingerprint"] == bpe.fingerprint()
    assert read_tokens(rebuilt, "val") == bpe.encode("held out\n")

    shard(rebuilt, "val").write_bytes(b"\x00\x00")  # damaged file: wrong size for its index
    assert read_tokens(prepare_data(out, bpe, [str(corpus)], [str(val)]), "val") == bpe.encode("held out\n")


def test_a_file_in_both_splits_is_an_error(corpus, tmp_path):
    with pytest.raises(DataError, match="b.md is in both the training and the validation corpus"):
        prepare_data(tmp_path / "data", BYTE, [str(corpus)], [str(corpus / "b.md")])


def test_token_dtype_follows_the_vocab_size(corpus, tmp_path):
    val = tmp_path / "val.txt"
    val.write_text("held out\n")
    small = prepare_data(tmp_path / "small", BYTE, [str(corpus)], [str(val)])
    big = byte_tokenizer()
    big.vocab_size = 70_000  # stands in for a tokenizer with more ids than uint16 holds
    large = prepare_data(tmp_path / "large", big, [str(corpus)], [str(val)])
    assert (small.dtype, large.dtype) == ("uint16", "uint32")
    assert shard(large, "val").stat().st_size == 4 * len("held out\n")
    assert read_tokens(large, "train") == read_tokens(small, "train")
    sampler = large.sampler("val", batch_size=2, seq_len=4, seed=0)
    assert sampler.batch(0)[0].dtype == torch.int64


def test_single_file_holds_out_its_tail_at_a_line_boundary(tmp_path):
    lines = [f"line {i} {'x' * (i % 7)}\n" for i in range(100)]
    (tmp_path / "one.txt").write_text("".join(lines))
    info = prepare_data(tmp_path / "data", BYTE, [str(tmp_path / "one.txt")], None, val_fraction=0.1)
    train = bytes(read_tokens(info, "train")).decode()
    val = bytes(read_tokens(info, "val")).decode()
    assert train + val == "".join(lines)
    assert train.endswith("\n") and val in ["".join(lines[k:]) for k in range(1, 100)]
    assert 0.1 <= len(val) / (len(train) + len(val)) < 0.12


def test_single_jsonl_holds_out_its_last_documents(tmp_path):
    docs = [f"document number {i}" for i in range(20)]
    (tmp_path / "one.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    info = prepare_data(tmp_path / "data", BYTE, [str(tmp_path / "one.jsonl")], None, val_fraction=0.2)
    assert read_tokens(info, "train") == expected_tokens(BYTE, docs[:16])
    assert read_tokens(info, "val") == expected_tokens(BYTE, docs[16:])
    assert info.meta["splits"]["val"]["n_documents"] == 4


def test_empty_validation_split_is_an_error(tmp_path):
    (tmp_path / "one.txt").write_text("a single line without a newline")
    with pytest.raises(DataError, match="validation split is empty: give --val-data or more files"):
        prepare_data(tmp_path / "data", BYTE, [str(tmp_path / "one.txt")], None)


def test_several_files_split_by_hash(corpus, tmp_path):
    info = prepare_data(tmp_path / "data", BYTE, [str(corpus)], None, val_fraction=0.3)
    splits = info.meta["splits"]
    assert splits["train"]["n_documents"] >= 1 and splits["val"]["n_documents"] >= 1
    assert splits["train"]["n_documents"] + splits["val"]["n_documents"] == 5


def test_split_by_hash_is_a_stable_sha256_threshold(tmp_path):
    names = [f"dir{i % 3}/file{i}.txt" for i in range(40)]

    def unit(name: str) -> float:
        return int(hashlib.sha256(name.encode()).hexdigest()[:16], 16) / 2**64

    expected_val = [tmp_path / n for n in names if unit(n) < 0.3]
    assert 0 < len(expected_val) < len(names)
    train, val = split_by_hash([tmp_path / n for n in names], 0.3, root=tmp_path)
    assert val == expected_val and train == [tmp_path / n for n in names if unit(n) >= 0.3]
    assert split_by_hash([str(tmp_path / n) for n in reversed(names)], 0.3, root=tmp_path)[1] == expected_val[::-1]
    # the default root is the files' common directory, so moving the corpus keeps the split
    moved = [tmp_path / "elsewhere" / n for n in names]
    assert split_by_hash(moved, 0.3)[1] == [tmp_path / "elsewhere" / n for n in names if unit(n) < 0.3]


def test_split_by_hash_keeps_one_file_on_each_side():
    train, val = split_by_hash(["/c/a.txt", "/c/b.txt"], 0.01)
    assert len(train) == len(val) == 1
    with pytest.raises(DataError, match="val_fraction=0 must be between 0 and 1"):
        split_by_hash(["/c/a.txt"], 0)


def test_builtin_corpus_is_the_stdlib_without_tests_or_site_packages():
    files = builtin_corpus_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    relative = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 100 and relative == sorted(relative) and builtin_corpus_files() == files
    assert {"os.py", "unittest/case.py", "json/decoder.py"} <= set(relative)
    excluded = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
    assert not any(excluded & set(f.parts[:-1]) for f in (Path(r) for r in relative))
    assert all(f.suffix == ".py" for f in files)


def write_ramp(path: Path, n: int) -> None:
    np.arange(n, dtype=np.uint16).tofile(path)


def ramp_sampler(path: Path, **options) -> BatchSampler:
    return BatchSampler({"t": TokenStream([path], "uint16")}, **options)


def test_sampler_windows_come_from_the_file_with_shifted_targets(tmp_path):
    write_ramp(tmp_path / "t.bin", 1000)
    sampler = ramp_sampler(tmp_path / "t.bin", batch_size=4, seq_len=16, seed=7)
    inputs, targets = sampler.batch(3)
    assert inputs.shape == targets.shape == (4, 16) and inputs.dtype == targets.dtype == torch.int64
    for row, target in zip(inputs, targets, strict=True):
        start = int(row[0])
        assert row.tolist() == list(range(start, start + 16)) and target.tolist() == list(range(start + 1, start + 17))
    assert int(targets.max()) <= 999


def test_sampler_is_a_pure_function_of_seed_step_and_micro_step(tmp_path):
    write_ramp(tmp_path / "t.bin", 5000)
    a = ramp_sampler(tmp_path / "t.bin", batch_size=8, seq_len=32, seed=1)
    b = ramp_sampler(tmp_path / "t.bin", batch_size=8, seq_len=32, seed=1)
    b.batch(0), b.batch(99)  # draws in between change nothing
    assert all(torch.equal(x, y) for x, y in zip(a.batch(5, 1), b.batch(5, 1), strict=True))
    assert not torch.equal(a.batch(5)[0], a.batch(6)[0])
    assert not torch.equal(a.batch(5, 0)[0], a.batch(5, 1)[0])
    other_seed = ramp_sampler(tmp_path / "t.bin", batch_size=8, seq_len=32, seed=2)
    assert not torch.equal(a.batch(5)[0], other_seed.batch(5)[0])


def batch_digest(path: Path) -> str:
    inputs, targets = ramp_sampler(path, batch_size=8, seq_len=32, seed=1).batch(5, 1)
    return hashlib.sha256(inputs.numpy().tobytes() + targets.numpy().tobytes()).hexdigest()


def test_sampler_batches_match_across_processes(tmp_path):
    write_ramp(tmp_path / "t.bin", 5000)
    script = (
        "import hashlib, sys\n"
        "from minigrok.train.data import BatchSampler, TokenStream\n"
        "inputs, targets = BatchSampler({'t': TokenStream([sys.argv[1]], 'uint16')}, batch_size=8, seq_len=32, seed=1).batch(5, 1)\n"
        "print(hashlib.sha256(inputs.numpy().tobytes() + targets.numpy().tobytes()).hexdigest())\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "t.bin")], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == batch_digest(tmp_path / "t.bin")


def test_sampler_rejects_a_split_shorter_than_one_window(tmp_path):
    write_ramp(tmp_path / "t.bin", 16)
    with pytest.raises(DataError, match=r"has 16 tokens; need at least seq_len\+1=17: lower train.seq_len or add data"):
        ramp_sampler(tmp_path / "t.bin", batch_size=1, seq_len=16, seed=0)
    ramp_sampler(tmp_path / "t.bin", batch_size=1, seq_len=15, seed=0).batch(0)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError, match="has 0 tokens"):
        ramp_sampler(tmp_path / "empty.bin", batch_size=1, seq_len=4, seed=0)
    with pytest.raises(FileNotFoundError, match="run prepare_data"):
        ramp_sampler(tmp_path / "missing.bin", batch_size=1, seq_len=4, seed=0)


def test_invalid_utf8_is_kept_by_the_byte_tokenizer_and_counted_for_bpe(tmp_path, capsys):
    root = tmp_path / "latin"
    root.mkdir()
    raw = b"caf\xe9 cr\xe8me\n" * 20  # Latin-1, not UTF-8
    (root / "a.txt").write_bytes(raw)
    (root / "b.txt").write_text("plain text\n" * 40)
    (root / "c.txt").write_text("more plain text\n" * 40)
    train_files = [str(root / "b.txt"), str(root / "c.txt")]
    byte_info = prepare_data(tmp_path / "byte", BYTE, train_files, [str(root / "a.txt")])
    assert bytes(read_tokens(byte_info, "val")) == raw  # every byte as it is on disk
    assert byte_info.meta["splits"]["val"]["n_bytes"] == len(raw)
    assert "invalid UTF-8" not in capsys.readouterr().err
    bpe = train_bpe(["plain text caf\ufffd"] * 10, 300)
    bpe_info = prepare_data(tmp_path / "bpe", bpe, train_files, [str(root / "a.txt")])
    err = capsys.readouterr().err
    assert f"validation split: 40 bytes of invalid UTF-8 in 1 file(s), the first {root / 'a.txt'}" in err
    assert bpe_info.meta["splits"]["val"]["n_bytes"] == len(raw)
