import json

import pytest

from echo_ray.config.overrides import apply_overrides, from_dict, load_config
from echo_ray.config.presets import PRESETS
from echo_ray.config.schema import ConfigError, DataConfig, EchoConfig


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_and_round_trips(name):
    config = EchoConfig.from_name(name)
    assert config.name == name
    again = from_dict(json.loads(config.to_json()))
    assert again == config


def test_presets_differ_where_declared():
    assert EchoConfig.from_name("base-7b").data.rows_per_shard == 512
    assert EchoConfig.from_name("tiny").data.rows_per_shard == DataConfig().rows_per_shard


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match="available presets: tiny, base-7b"):
        EchoConfig.from_name("huge")


def test_overrides_parse_to_declared_types():
    config = apply_overrides(
        EchoConfig.from_name("tiny"),
        [
            "data.max_dimension=4096",
            "data.include_phi=true",
            "data.modalities=CR,DX",
            "data.num_cpus_per_task=1",
            "data.split_fractions=0.7,0.2,0.1",
            "tokenizer.vocab_size=4000",
        ],
    )
    assert config.data.max_dimension == 4096
    assert config.data.include_phi is True
    assert config.data.modalities == ("CR", "DX")
    assert config.data.num_cpus_per_task == 1.0 and isinstance(config.data.num_cpus_per_task, float)
    assert config.data.split_fractions == (0.7, 0.2, 0.1)
    assert config.tokenizer.vocab_size == 4000


def test_overrides_do_not_mutate_the_input():
    base = EchoConfig.from_name("tiny")
    apply_overrides(base, ["data.max_dimension=64"])
    assert base.data.max_dimension == DataConfig().max_dimension


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.maxdim=9", r"unknown config key 'data.maxdim'.*allowed: \[.*'max_dimension'"),
        ("nope.x=1", r"'nope' is not a field of the top level"),
        ("data.max_dimension=big", r"data.max_dimension must be int, got 'big'"),
        ("data.max_dimension=1.5", r"must be int"),
        ("data.include_phi=maybe", r"must be true or false"),
        ("data.split_fractions=0.5,0.5", r"needs 3 comma-separated values"),
        ("data.split_fractions=0.5,0.5,0.5", r"summing to 1"),
        ("data.max_dimension=0", r"data.max_dimension must be >= 1"),
        ("data=3", r"'data' is a section"),
        ("data.max_dimension", r"not of the form key=value"),
        ("data.max_dimension.x=1", r"'data.max_dimension' is not a section"),
    ],
)
def test_bad_overrides_fail_with_a_clear_message(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(EchoConfig.from_name("tiny"), [override])


def test_from_dict_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict({"data": {"image_sise": 3}})
    with pytest.raises(ConfigError, match="max_dimension must be int"):
        from_dict({"data": {"max_dimension": "128"}})
    with pytest.raises(ConfigError, match="must be int"):
        from_dict({"data": {"max_dimension": True}})  # bool is not an int here


def test_load_config_from_file_then_overrides(tmp_path):
    path = tmp_path / "config.json"
    config = apply_overrides(EchoConfig.from_name("tiny"), ["data.max_dimension=96"])
    path.write_text(config.to_json())
    loaded = load_config(path=str(path), overrides=["tokenizer.vocab_size=512"])
    assert loaded.data.max_dimension == 96
    assert loaded.tokenizer.vocab_size == 512
