"""Token shards: layout and index, a killed encoding continued, workers, Parquet and dataset inputs, and the
sampler over shards and mixtures (weights, determinism, rows of a batch)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from minigrok.train import shards
from minigrok.train.corpus import DataError
from minigrok.train.data import BatchSampler, TokenStream, prepare_data
from minigrok.train.tokenizer import byte_tokenizer, train_bpe

BYTE = byte_tokenizer()
DOCS = [f"document {i}: " + "words and more words " * (i % 5) + "\n" for i in range(40)]


def joined(tokenizer, texts: list[str]) -> list[int]:
    """The reference stream: each document's ids, joined by eos."""
    tokens = []
    for text in texts:
        tokens += ([tokenizer.eos_id] if tokens else []) + tokenizer.encode(text)
    return tokens


@pytest.fixture
def corpus(tmp_path):
    """A .jsonl training corpus of DOCS and a one-line validation file."""
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    (tmp_path / "val.txt").write_text("held out\n")
    return [str(tmp_path / "train.jsonl")], [str(tmp_path / "val.txt")]


def test_shards_are_fixed_size_cuts_of_the_stream_with_an_index(corpus, tmp_path):
    info = prepare_data(tmp_path / "data", BYTE, *corpus, shard_tokens=100)
    directory = tmp_path / "data" / "train" / "corpus"
    index = json.loads((directory / "index.json").read_text())
    expected = joined(BYTE, DOCS)
    sizes = [len(np.fromfile(directory / s["file"], np.uint16)) for s in index["shards"]]
    assert sizes == [100] * (len(expected) // 100) + [len(expected) % 100]
    assert [s["n_tokens"] for s in index["shards"]] == sizes
    assert sorted(p.name for p in directory.glob("shard-*.bin")) == [f"shard-{i:06d}.bin" for i in range(len(sizes))]
    assert index["complete"] and index["n_tokens"] == len(expected) and index["n_documents"] == len(DOCS)
    assert (index["dtype"], index["tokenizer"], index["shard_tokens"]) == ("uint16", BYTE.fingerprint(), 100)
    assert index["corpus_fingerprint"] == info.meta["splits"]["train"]["corpus_fingerprint"]
    assert info.tokens("train")[:].tolist() == expected
    assert info.tokens("train")[95:205].tolist() == expected[95:205]  # a slice across two shard boundaries


def test_a_killed_encoding_keeps_its_shards_and_continues(corpus, tmp_path, monkeypatch):
    """A process killed (os._exit, no cleanup) while writing its fourth shard, then the same call again."""
    script = (
        "import os, sys\n"
        "from minigrok.train import shards\n"
        "from minigrok.train.data import prepare_data\n"
        "from minigrok.train.tokenizer import byte_tokenizer\n"
        "real, calls = shards.atomic_write, []\n"
        "def dying(path, write):\n"
        "    calls.append(path)\n"
        "    if len(calls) == 4 and 'shard' in str(path):\n"
        "        os._exit(9)\n"
        "    real(path, write)\n"
        "shards.atomic_write = dying\n"
        "shards.BATCH_CHARS = 200\n"
        "prepare_data(sys.argv[1], byte_tokenizer(), [sys.argv[2]], [sys.argv[3]], shard_tokens=100)\n"
    )
    out = tmp_path / "data"
    killed = subprocess.run([sys.executable, "-c", script, str(out), *corpus[0], *corpus[1]], capture_output=True)
    assert killed.returncode == 9, killed.stderr
    index = json.loads((out / "train" / "corpus" / "index.json").read_text())
    assert not index["complete"] and len(index["shards"]) == 3  # three committed, the fourth never appeared
    assert not list((out / "train" / "corpus").glob("shard-000003.bin"))

    monkeypatch.setattr(shards, "BATCH_CHARS", 200)  # the batches the killed run cut
    encoded = []
    monkeypatch.setattr(
        BYTE, "encode_batch", lambda texts: encoded.extend(texts) or byte_tokenizer().encode_batch(texts)
    )
    resumed = prepare_data(out, BYTE, *corpus, shard_tokens=100)
    assert resumed.tokens("train")[:].tolist() == joined(BYTE, DOCS)
    assert DOCS[0] not in encoded and DOCS[-1] in encoded  # continued, not started over
    monkeypatch.undo()

    fresh = prepare_data(tmp_path / "fresh", BYTE, *corpus, shard_tokens=100)
    assert resumed.meta["splits"] == fresh.meta["splits"]
    (out / "train" / "corpus" / "shard-000002.bin").write_bytes(b"\0" * 10)  # truncated: encoded again from there
    (out / "train" / "corpus" / "shard-000004.bin").unlink()
    assert prepare_data(out, BYTE, *corpus, shard_tokens=100).tokens("train")[:].tolist() == joined(BYTE, DOCS)


def test_two_workers_give_the_tokens_of_one(tmp_path, monkeypatch):
    texts = [f"def f{i}(x):\n    return '<|eos|>' * {i}\n" for i in range(60)] + ["caf\udce9 cr\udce8me\n"]
    root = tmp_path / "corpus"
    root.mkdir()
    for i, text in enumerate(texts):
        (root / f"{i:03d}.py").write_bytes(text.encode("utf-8", errors="surrogateescape"))
    bpe = train_bpe(texts[:-1], vocab_size=300)
    monkeypatch.setattr(shards, "BATCH_CHARS", 300)  # several batches in flight
    one = prepare_data(tmp_path / "one", bpe, [str(root)], val_fraction=0.2, workers=1, shard_tokens=500)
    two = prepare_data(tmp_path / "two", bpe, [str(root)], val_fraction=0.2, workers=2, shard_tokens=500)
    for split in ("train", "val"):
        assert two.tokens(split)[:].tolist() == one.tokens(split)[:].tolist()
    assert one.meta == two.meta and one.meta["splits"]["train"]["sources"]["corpus"]["shards"] > 1


def test_parquet_rows_are_documents_of_the_text_field(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow", reason="the parquet extra (pyarrow) is not installed")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(40)), "body": DOCS}), tmp_path / "rows.parquet", row_group_size=7)
    val = tmp_path / "val.txt"
    val.write_text("held out\n")
    info = prepare_data(tmp_path / "data", BYTE, [str(tmp_path / "rows.parquet")], [str(val)], text_field="body")
    assert info.tokens("train")[:].tolist() == joined(BYTE, DOCS)
    with pytest.raises(DataError, match=r"rows.parquet has no text field 'text' \(it has 'id', 'body'\)"):
        prepare_data(tmp_path / "other", BYTE, [str(tmp_path / "rows.parquet")], [str(val)])
    with pytest.raises(DataError, match="column 'id' holds int64, not text"):
        prepare_data(tmp_path / "other", BYTE, [str(tmp_path / "rows.parquet")], [str(val)], text_field="id")


def test_a_saved_dataset_directory_is_read_with_its_field(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the datasets extra is not installed")
    splits = {"train": DOCS[:30], "test": DOCS[30:]}
    saved = datasets.DatasetDict({k: datasets.Dataset.from_dict({"content": v}) for k, v in splits.items()})
    saved.save_to_disk(str(tmp_path / "saved"))
    corpus = tmp_path / "corpus"  # a folder holding the saved dataset: found as one source
    corpus.mkdir()
    (tmp_path / "saved").rename(corpus / "saved")
    info = prepare_data(tmp_path / "data", BYTE, [str(corpus)], [str(corpus / "saved" / "test")], text_field="content")
    assert info.tokens("train")[:].tolist() == joined(BYTE, DOCS[:30])  # a DatasetDict gives its train split
    assert info.tokens("val")[:].tolist() == joined(BYTE, DOCS[30:])
    with pytest.raises(DataError, match="has no text field 'text'"):
        prepare_data(tmp_path / "other", BYTE, [str(corpus)], [str(corpus / "saved" / "test")])


def ramp(path, start: int, n: int, shard: int) -> TokenStream:
    """Token files holding start, start+1, ... cut every `shard` tokens."""
    path.mkdir()
    values = np.arange(start, start + n, dtype=np.uint16)
    files = []
    for number, first in enumerate(range(0, n, shard)):
        files.append(path / f"shard-{number:06d}.bin")
        values[first : first + shard].tofile(files[-1])
    return TokenStream(files, "uint16")


def test_windows_cross_shard_boundaries_as_in_one_flat_file(tmp_path):
    sharded = BatchSampler({"a": ramp(tmp_path / "sharded", 0, 5000, 37)}, batch_size=8, seq_len=50, seed=3)
    flat = BatchSampler({"a": ramp(tmp_path / "flat", 0, 5000, 5000)}, batch_size=8, seq_len=50, seed=3)
    for step in range(5):
        inputs, targets = sharded.batch(step)
        assert torch.equal(inputs, flat.batch(step)[0]) and torch.equal(targets, flat.batch(step)[1])
        assert torch.equal(inputs[:, 1:], targets[:, :-1]) and torch.equal(targets - inputs, torch.ones_like(inputs))


def test_a_mixture_draws_rows_by_weight_deterministically(tmp_path):
    streams = {"a": ramp(tmp_path / "a", 0, 3000, 1000), "b": ramp(tmp_path / "b", 10000, 2000, 700)}
    sampler = BatchSampler(streams, batch_size=8, seq_len=16, seed=5, weights={"a": 3.0, "b": 1.0})
    rows_of_a = sum(int((sampler.batch(step)[0][:, 0] < 10000).sum()) for step in range(400))
    assert abs(rows_of_a / 3200 - 0.75) < 4 * (0.75 * 0.25 / 3200) ** 0.5  # within four standard deviations
    tokens = sampler.source_tokens(range(400), micro_steps=1)
    assert tokens == {"a": rows_of_a * 16, "b": (3200 - rows_of_a) * 16}
    again = BatchSampler(streams, batch_size=8, seq_len=16, seed=5, weights={"a": 3.0, "b": 1.0})
    assert torch.equal(again.batch(7, 1)[0], sampler.batch(7, 1)[0])
    assert not torch.equal(sampler.batch(7, 1)[0], sampler.batch(8, 1)[0])


@pytest.mark.parametrize("weights", [None, {"a": 1.0, "b": 2.0}])
def test_rows_of_a_batch_concatenate_to_the_batch(tmp_path, weights):
    streams = {"a": ramp(tmp_path / "a", 0, 3000, 400)}
    if weights:
        streams["b"] = ramp(tmp_path / "b", 5000, 3000, 400)
    sampler = BatchSampler(streams, batch_size=8, seq_len=16, seed=1, weights=weights)
    for step, micro_step in [(0, 0), (3, 1)]:
        whole = sampler.batch(step, micro_step)
        parts = [sampler.batch(step, micro_step, rows=slice(r * 2, (r + 1) * 2)) for r in range(4)]
        for index in range(2):
            assert torch.equal(torch.cat([part[index] for part in parts]), whole[index])
        assert parts[0][0].shape == (2, 16) and parts[0][0].dtype == torch.int64
