"""TrainConfig and the run configs built from a preset and --set overrides; every field documented."""

import dataclasses

import pytest

from minigrok.config import field_docs
from minigrok.train.config import RUN_SECTIONS, build_run_configs


def test_overrides_read_numbers_in_exponent_form():
    _, train, _, overrides = build_run_configs("tiny", ["train.lr=6e-3", "train.max_tokens=1e6", "model.norm_eps=1e-6"])
    assert train.lr == 0.006 and train.max_tokens == 1_000_000 and isinstance(train.max_tokens, int)
    assert overrides["model"] == {"norm_eps": 1e-6}


@pytest.mark.parametrize("section", list(RUN_SECTIONS))
def test_every_field_has_a_one_line_meaning(section):
    cls = RUN_SECTIONS[section]
    docs = field_docs(cls)
    assert list(docs) == [field.name for field in dataclasses.fields(cls)]
    assert all(doc.strip() and "\n" not in doc for doc in docs.values()), docs
