"""Curation before encoding: each quality filter, exact and near deduplication (across files, sources and against
the training split), an outcome independent of file order, curation.json, and re-encoding when a setting changes."""

import hashlib
import json
import random
import sys

import pytest

from minigrok.config import ConfigError
from minigrok.train.config import TrainConfig
from minigrok.train.corpus import CorpusSplit, DataError, Source
from minigrok.train.curate import Curation, curate, non_text_fraction, normalise, repeated_line_fraction
from minigrok.train.data import prepare_data
from minigrok.train.tokenizer import byte_tokenizer

BYTE = byte_tokenizer()


def words(seed: int, count: int = 300) -> list[str]:
    rng = random.Random(seed)
    return [
        f"{rng.choice(['alpha', 'beta', 'gamma', 'delta', 'omega', 'sigma'])}{rng.randint(0, 99)}" for _ in range(count)
    ]


def text(seed: int) -> str:
    return " ".join(words(seed))


def edited(seed: int, changes: int = 3) -> str:
    """The document of `seed` with `changes` words replaced, spread over it."""
    changed = words(seed)
    for index in range(changes):
        changed[(index + 1) * len(changed) // (changes + 1)] = f"edit{index}"
    return " ".join(changed)


def jsonl(path, texts: list[str]):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def kept(splits: dict, curation: Curation) -> dict:
    """{split: {source: [kept texts]}}."""
    curated, _ = curate(splits, curation)
    return {split: {name: list(part.documents()) for name, part in parts.items()} for split, parts in curated.items()}


def one_split(tmp_path, train: list[list[str]], val: list[str] | None = None) -> dict:
    """Splits of one corpus "corpus": a .jsonl file per list of training documents, and a validation file."""
    files = [jsonl(tmp_path / f"train{i}.jsonl", docs) for i, docs in enumerate(train)]
    splits = {"train": {"corpus": CorpusSplit(tuple(Source(f) for f in files))}, "val": {}}
    if val is not None:
        splits["val"]["corpus"] = CorpusSplit((Source(jsonl(tmp_path / "val.jsonl", val)),))
    return splits


def test_the_line_and_character_measures_on_crafted_documents():
    assert repeated_line_fraction("a\na\nb\n\n\n  a  \n") == 0.5  # 4 non-blank lines, 2 repeat an earlier one
    assert repeated_line_fraction("one\ntwo\n") == 0 and repeated_line_fraction("\n\n") == 0
    assert non_text_fraction("ab\x00d\ufffd\udc80\t\n\r\x85xyz") == pytest.approx(4 / 13)
    assert non_text_fraction("plain text\twith tab\r\n") == 0
    assert normalise("  Ｈｅｌｌｏ\tWORLD\n ﬁne ") == "hello world fine"


@pytest.mark.parametrize(
    ("setting", "dropped", "survivor"),
    [
        ({"min_doc_chars": 20}, "short text", "a text of twenty-one"),
        ({"max_repeated_line_fraction": 0.4}, "x\nx\nx\ny\n", "x\ny\nz\nx\n"),  # 0.5 > 0.4 >= 0.25
        ({"max_non_text_fraction": 0.1}, "ab\x00\x01\x02cdefgh", "abcdefgh\ufffdij"),  # 0.3 > 0.1 >= 1/11
    ],
)
def test_each_quality_filter_drops_what_crosses_its_threshold_and_reports_it(tmp_path, setting, dropped, survivor):
    splits = one_split(tmp_path, [[dropped, survivor]])
    curation = Curation(**setting)
    assert kept(splits, curation)["train"]["corpus"] == [survivor]
    assert kept(splits, Curation())["train"]["corpus"] == [dropped, survivor]
    report = curate(splits, curation)[1].report()["splits"]["train"]["corpus"]
    (reason,) = report["dropped"]
    assert report["dropped"][reason]["documents"] == 1
    assert report["dropped"][reason]["bytes"] == len(dropped.encode())
    assert report["dropped"][reason]["examples"] == [{"text": dropped}]


def test_exact_dedup_compares_normalised_text_across_files(tmp_path):
    original = text(1)
    variant = "  " + original.upper().replace(" ", "\n\t ", 3) + "\n"  # the same once normalised
    splits = one_split(tmp_path, [[original, text(2)], [variant, text(3)]])
    kept_texts = kept(splits, Curation(dedup="exact"))["train"]["corpus"]
    assert len(kept_texts) == 3 and {text(2), text(3)} < set(kept_texts)
    assert (original in kept_texts) != (variant in kept_texts)


def test_near_dedup_drops_a_few_words_changed_and_keeps_a_different_document(tmp_path):
    pytest.importorskip("datasketch")
    splits = one_split(tmp_path, [[text(1), edited(1), text(2)]])
    first = min(text(1), edited(1), key=lambda t: hashlib.sha256(t.encode()).digest())  # judged in this order
    assert kept(splits, Curation(dedup="near", near_dup_threshold=0.8))["train"]["corpus"] == [
        t for t in (text(1), edited(1), text(2)) if t in (first, text(2))
    ]
    assert len(kept(splits, Curation(dedup="exact"))["train"]["corpus"]) == 3  # not an exact duplicate
    # with 10 words changed of 300 it is no longer 80% similar: LSH's bands offer it as a candidate, and the
    # estimated similarity (0.76) turns it down
    assert len(kept(one_split(tmp_path, [[text(1), edited(1, 10)]]), Curation(dedup="near"))["train"]["corpus"]) == 2


def test_near_dedup_without_datasketch_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasketch", None)  # import fails as if it were not installed
    splits = one_split(tmp_path, [[text(1), text(2)]])
    with pytest.raises(DataError, match=r"train.dedup=near .* pip install 'minigrok\[curate\]'"):
        kept(splits, Curation(dedup="near"))
    assert len(kept(splits, Curation(dedup="exact"))["train"]["corpus"]) == 2  # exact needs nothing extra


def test_the_kept_set_and_report_do_not_depend_on_file_or_document_order(tmp_path):
    pytest.importorskip("datasketch")
    docs = [text(1), edited(1, 1), edited(1, 2), text(2), text(2).upper(), text(3), "short", edited(3)]
    curation = Curation(dedup="near", min_doc_chars=10)
    outcomes = []
    for order in range(3):
        shuffled = docs[:]
        random.Random(order).shuffle(shuffled)
        directory = tmp_path / f"order{order}"
        directory.mkdir()
        splits = one_split(directory, [shuffled[:4], shuffled[4:]] if order % 2 else [shuffled[5:], shuffled[:5]])
        report = curate(splits, curation)[1].report()
        del report["key"]  # the key names the files, which differ
        outcomes.append((sorted(kept(splits, curation)["train"]["corpus"]), report))
    assert outcomes[0] == outcomes[1] == outcomes[2]
    assert len(outcomes[0][0]) == 3  # text(1), text(2), text(3), each kept once


def test_a_mixture_is_deduplicated_across_its_sources_and_validation_against_training(tmp_path):
    pytest.importorskip("datasketch")
    (tmp_path / "code").mkdir()
    (tmp_path / "prose").mkdir()
    splits = {
        "train": {
            "code": CorpusSplit((Source(jsonl(tmp_path / "code" / "a.jsonl", [text(1), text(2)])),)),
            "prose": CorpusSplit((Source(jsonl(tmp_path / "prose" / "a.jsonl", [text(1), text(3)])),)),
        },
        "val": {"corpus": CorpusSplit((Source(jsonl(tmp_path / "val.jsonl", [edited(3), text(4), text(2)])),))},
    }
    curation = Curation(dedup="near")
    assert kept(splits, curation) == {
        "train": {"code": [text(1), text(2)], "prose": [text(3)]},  # the same text: the first source by name keeps it
        "val": {"corpus": [text(4)]},
    }
    report = curate(splits, curation)[1].report()["splits"]
    assert report["train"]["prose"]["dropped"]["exact_duplicate"]["documents"] == 1
    assert report["train"]["code"]["dropped"]["exact_duplicate"]["documents"] == 0
    val = report["val"]["corpus"]["dropped"]
    assert val["exact_duplicate"]["examples"][0]["duplicate_of"] == {"split": "train", "source": "code",
                                                                     "text": text(2)[:80] + "..."}  # fmt: skip
    assert val["near_duplicate"]["examples"][0]["duplicate_of"]["source"] == "prose"
    assert report["val"]["corpus"]["kept"] == {"documents": 1, "bytes": len(text(4))}


def test_prepare_data_writes_curation_json_and_encodes_again_when_a_setting_changes(tmp_path):
    (tmp_path / "corpus").mkdir()
    jsonl(tmp_path / "corpus" / "a.jsonl", [text(1), "tiny", text(2)])
    jsonl(tmp_path / "corpus" / "b.jsonl", [text(1).title(), text(3)])
    val = [str(jsonl(tmp_path / "val.jsonl", [text(3), text(4)]))]
    out, corpus = tmp_path / "data", [str(tmp_path / "corpus")]

    plain = prepare_data(out, BYTE, corpus, val)
    assert (plain.meta["splits"]["train"]["n_documents"], plain.meta["splits"]["val"]["n_documents"]) == (5, 2)
    assert not (out / "curation.json").exists() and "curation" not in plain.meta

    curation = Curation(dedup="exact", min_doc_chars=10)
    curated = prepare_data(out, BYTE, corpus, val, curation=curation)
    assert (curated.meta["splits"]["train"]["n_documents"], curated.meta["splits"]["val"]["n_documents"]) == (3, 1)
    assert bytes(curated.tokens("val")[:].tolist()) == text(4).encode()
    assert curated.meta["curation"] == curation.settings()
    report = json.loads((out / "curation.json").read_text())
    assert report["settings"] == {"dedup": "exact", "min_doc_chars": 10, "max_repeated_line_fraction": 1.0,
                                  "max_non_text_fraction": 1.0}  # fmt: skip
    train = report["splits"]["train"]["corpus"]
    assert train["read"] == {"documents": 5, "bytes": plain.meta["splits"]["train"]["n_bytes"]}
    assert train["dropped"]["too_short"] == {"documents": 1, "bytes": 4, "examples": [{"text": "tiny"}]}
    assert train["dropped"]["exact_duplicate"]["documents"] == 1
    assert train["kept"]["bytes"] == curated.meta["splits"]["train"]["n_bytes"]
    assert (
        report["splits"]["val"]["corpus"]["dropped"]["exact_duplicate"]["examples"][0]["duplicate_of"]["split"]
        == "train"
    )

    shard = out / "train" / "corpus" / "shard-000000.bin"
    stamp = shard.stat().st_mtime_ns
    prepare_data(out, BYTE, corpus, val, curation=curation)  # the same curation: nothing encoded again
    assert shard.stat().st_mtime_ns == stamp
    looser = prepare_data(out, BYTE, corpus, val, curation=Curation(dedup="exact"))
    assert looser.meta["splits"]["train"]["n_documents"] == 4
    assert json.loads((out / "curation.json").read_text())["settings"]["min_doc_chars"] == 0
    assert prepare_data(out, BYTE, corpus, val).meta == plain.meta  # back to no curation: all of it
    assert not (out / "curation.json").exists()


def test_changed_validation_files_encode_validation_again_and_training_not(tmp_path):
    corpus = [str(jsonl(tmp_path / "a.jsonl", [text(1), text(2)]))]
    val = [str(jsonl(tmp_path / "val.jsonl", [text(1), text(3)]))]
    out, curation = tmp_path / "data", Curation(dedup="exact")
    assert prepare_data(out, BYTE, corpus, val, curation=curation).meta["splits"]["val"]["n_documents"] == 1
    stamp = (out / "train" / "corpus" / "shard-000000.bin").stat().st_mtime_ns
    jsonl(tmp_path / "val.jsonl", [text(2), text(3), text(4)])
    assert prepare_data(out, BYTE, corpus, val, curation=curation).meta["splits"]["val"]["n_documents"] == 2
    assert (out / "train" / "corpus" / "shard-000000.bin").stat().st_mtime_ns == stamp


def test_a_curation_that_drops_a_whole_split_says_so(tmp_path):
    val = [str(jsonl(tmp_path / "val.jsonl", ["tiny"]))]
    with pytest.raises(DataError, match="validation split is empty after curation .*curation.json"):
        prepare_data(tmp_path / "data", BYTE, [str(jsonl(tmp_path / "a.jsonl", [text(1)]))], val,
                     curation=Curation(min_doc_chars=10))  # fmt: skip
    assert (tmp_path / "data" / "curation.json").is_file()


def test_the_bpe_tokenizer_learns_from_the_curated_training_text(tmp_path, monkeypatch):
    from minigrok.train import run

    learned = []

    def learn(spec, texts, vocab_size):
        learned.extend(texts())
        return byte_tokenizer()

    monkeypatch.setattr(run, "load_or_train_tokenizer", learn)
    corpus = [str(jsonl(tmp_path / "a.jsonl", [text(1), text(1).upper(), "tiny", text(2)]))]
    val = [str(jsonl(tmp_path / "val.jsonl", [text(3)]))]
    config = TrainConfig(max_steps=1, batch_size=2, seq_len=32, dtype="fp32", peak_flops=1e11, device="cpu",
                         dedup="exact", min_doc_chars=10)  # fmt: skip
    model = {"dim": 32, "n_layers": 1, "n_heads": 2, "ffn_dim": 64, "max_seq_len": 64}
    run.start_run(tmp_path / "run", model, config, corpus, val, "bpe", progress=False)
    first = min(text(1), text(1).upper(), key=lambda t: hashlib.sha256(t.encode()).digest())
    assert learned == [first, text(2)]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dedup", "fuzzy", "train.dedup='fuzzy' is unknown: choose one of ('none', 'exact', 'near')"),
        ("near_dup_threshold", 1.0, "train.near_dup_threshold=1.0 must lie in (0, 1)"),
        ("near_dup_threshold", 0, "train.near_dup_threshold=0 must lie in (0, 1)"),
        ("min_doc_chars", -1, "train.min_doc_chars=-1 must be an integer >= 0"),
        ("min_doc_chars", 2.5, "train.min_doc_chars=2.5 must be an integer >= 0"),
        ("max_repeated_line_fraction", 1.5, "train.max_repeated_line_fraction=1.5 must lie in [0, 1]"),
        ("max_non_text_fraction", "low", "train.max_non_text_fraction='low' must lie in [0, 1]"),
    ],
)
def test_bad_curation_settings_are_refused_naming_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        TrainConfig(max_steps=1, **{field: value})


def test_the_config_fields_make_the_curation_and_default_to_none():
    config = TrainConfig(max_steps=1, dedup="near", near_dup_threshold=0.7, min_doc_chars=1e3)
    assert Curation.of(config) == Curation("near", 0.7, 1000, 1.0, 1.0)
    assert not Curation.of(TrainConfig(max_steps=1)).active
