"""ModelConfig validation, presets and YAML round trips: every bad value gets a message with the fix."""

import pytest

from minigrok import ConfigError, MiniGrok, ModelConfig
from minigrok.config import preset_names

BASE = dict(vocab_size=100, dim=64, n_layers=4, n_heads=8)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(n_kv_heads=3), r"n_kv_heads=3 does not divide n_heads=8: choose n_kv_heads from \[1, 2, 4, 8\]"),
        (dict(dim=60), "dim=60 is not divisible by n_heads=8.*set head_dim"),
        (dict(head_dim=7), "head_dim=7 is odd"),
        (dict(share="half"), "share='half' is unknown"),
        (dict(share="immediate", n_unique_layers=3), "n_unique_layers=3 does not divide n_layers=4"),
        (dict(share="all", n_unique_layers=2), "does not fit share='all'"),
        (dict(share="none", n_unique_layers=2), "does not fit share='none'"),
        (dict(share="cycle", n_layers=5), "odd n_layers=5 has no default n_unique_layers"),
        (dict(vocab_size=0), "vocab_size=0 must be a positive integer"),
        (dict(dim=-64), "dim=-64 must be a positive integer"),
        (dict(n_layers=2.5), "n_layers=2.5 must be a positive integer"),
        (dict(max_seq_len=0), "max_seq_len=0"),
        (dict(norm_eps=0), "norm_eps=0 must be a positive number"),
        (dict(backend="cuda"), "backend='cuda' is unknown"),
    ],
)
def test_invalid_configs_are_rejected_with_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**(BASE | overrides))


def test_derived_fields_are_resolved():
    config = ModelConfig(**BASE)
    assert (config.n_kv_heads, config.head_dim, config.ffn_dim) == (8, 8, 192)  # 8/3 * 64 = 170.7 -> 192
    assert ModelConfig(**BASE, share="immediate").n_unique_layers == 2
    assert ModelConfig(**BASE, head_dim=10).head_dim == 10  # explicit head_dim frees dim from n_heads


def test_dict_round_trip_and_unknown_keys():
    config = ModelConfig(**BASE, n_kv_heads=2, share="cycle", n_unique_layers=2)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown ModelConfig field 'n_head'.*did you mean 'n_heads'"):
        ModelConfig.from_dict(BASE | {"n_head": 4})


def test_presets_load_and_match_their_descriptions():
    assert {"tiny", "demo-cpu", "mobile-125m", "mobile-350m"} <= set(preset_names())
    tiny = ModelConfig.from_yaml("tiny")
    assert MiniGrok(tiny).report().unique_params < 1_000_000
    m125, m350 = ModelConfig.from_yaml("mobile-125m"), ModelConfig.from_yaml("mobile-350m")
    assert (m125.n_layers, m125.dim, m125.n_heads, m125.n_kv_heads) == (30, 576, 9, 3)
    assert (m350.n_layers, m350.dim, m350.n_heads, m350.n_kv_heads) == (32, 960, 15, 5)
    assert m125.tie_embeddings and m350.tie_embeddings


def test_yaml_files_and_errors(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  vocab_size: 50\n  dim: 32\n  n_layers: 2\n  n_heads: 4\n  n_kv_heads: 1\n")
    assert ModelConfig.from_yaml(path).n_kv_heads == 1
    with pytest.raises(ConfigError, match="unknown preset 'giant'"):
        ModelConfig.from_yaml("giant")
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_yaml(tmp_path / "missing.yaml")
    path.write_text("model:\n  vocab_size: 50\n  dimm: 32\n")
    with pytest.raises(ConfigError, match="'dimm'.*did you mean 'dim'"):
        ModelConfig.from_yaml(path)


def test_a_yaml_alias_bomb_gives_a_short_error(tmp_path):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10**9 leaves
    (tmp_path / "bomb.yaml").write_text(
        "\n".join(levels) + "\nmodel:\n  vocab_size: 64\n  dim: *a8\n  n_layers: 2\n  n_heads: 2\n"
    )
    with pytest.raises(ConfigError) as error:
        ModelConfig.from_yaml(tmp_path / "bomb.yaml")
    assert "dim=" in str(error.value) and len(str(error.value)) < 200


def test_absurd_sizes_get_their_error_at_once():
    with pytest.raises(ConfigError, match="the divisors of 1000000000000"):
        ModelConfig(vocab_size=64, dim=64, n_layers=10**12, n_heads=2, share="cycle", n_unique_layers=7)
