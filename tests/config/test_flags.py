"""CLI flags declared from the config tree: one default, one help text, one type per option."""

import argparse
import dataclasses
import json

import pytest

from echo_ray.cli import COMMANDS, FLAGS, build_parser, command_config
from echo_ray.config.flags import Flag, add_flags, field_docs, flag_overrides, resolve_field
from echo_ray.config.overrides import from_dict
from echo_ray.config.schema import (
    ConfigError,
    DecodingConfig,
    EchoConfig,
    ReportConfig,
    ServeConfig,
)


def _parse(command: str, *argv: str) -> argparse.Namespace:
    required = {"trajectories": ["--teacher", "t", "--data", "d", "--out", "o"],
                "evaluate": ["--data", "d", "--out", "o", "--system", "a=p:ar"],
                "report": ["--checkpoint", "c", "--archive", "a", "--out", "o"],
                "serve": ["--checkpoint", "c"]}[command]
    return build_parser(command).parse_args([*required, *argv])


def test_every_config_field_has_a_docstring():
    """Docstrings are the documentation and the flags' help: none may be missing."""
    missing = []
    for section in dataclasses.fields(EchoConfig):
        if not dataclasses.is_dataclass(getattr(EchoConfig(), section.name)):
            continue
        cls = type(getattr(EchoConfig(), section.name))
        docs = field_docs(cls)
        missing += [f"{section.name}.{f.name}" for f in dataclasses.fields(cls)
                    if not docs.get(f.name)]
    assert not missing, missing


def test_every_flag_names_a_real_field_and_shows_its_default_and_doc():
    for command, flags in FLAGS.items():
        text = build_parser(command).format_help()
        for flag in flags:
            cls, fld, default = resolve_field(flag.key)  # raises for a wrong key
            assert flag.flag in text and flag.key in text, (command, flag.flag)
            if flag.help is None:
                first_words = " ".join(field_docs(cls)[fld.name].split()[:3])
                assert first_words in " ".join(text.split()), (command, flag.flag)


def test_every_argument_of_every_command_has_help():
    for command in COMMANDS:
        for action in build_parser(command)._actions:
            assert action.help, (command, action.option_strings)


def test_flags_left_out_change_nothing_and_given_flags_become_overrides():
    args = _parse("report")
    assert flag_overrides(args, FLAGS["report"]) == []
    assert command_config("report", args) == EchoConfig.from_name("tiny")
    args = _parse("report", "--batch-size", "8", "--unit-size", "32", "--fhir", "--decoding",
                  "multi-step", "--threshold", "0.8", "--since", "2024-05-31", "--actors", "3")
    config = command_config("report", args)
    assert config.report == dataclasses.replace(ReportConfig(), batch_size=8, unit_size=32,
                                                fhir=True, since="2024-05-31")
    assert config.decoding == DecodingConfig(mode="multi-step", threshold=0.8)
    assert config.pool.actors == 3


def test_set_wins_over_a_flag_and_a_flag_over_the_preset():
    args = _parse("report", "--batch-size", "8", "--set", "report.batch_size=4")
    assert command_config("report", args).report.batch_size == 4
    args = _parse("serve", "--preset", "base-7b", "--gpus-per-replica", "0")
    config = command_config("serve", args)
    assert config.serve.num_gpus == 0.0 and config.serve.num_cpus == 4.0  # the rest: preset


def test_unit_conversion_bools_tuples_and_none():
    config = command_config("serve", _parse("serve", "--batch-wait-ms", "20", "--insecure"))
    assert config.serve.batch_wait_timeout_s == pytest.approx(0.02) and config.serve.insecure
    config = command_config("evaluate", _parse("evaluate", "--no-ratescore", "--steps", "4"))
    assert config.evaluate.ratescore is False and config.decoding.steps == 4
    config = command_config("trajectories", _parse("trajectories", "--splits", "train"))
    assert config.trajectories.splits == ("train",)
    config = command_config("report", _parse("report", "--max-new-tokens", "none"))
    assert config.decoding.max_new_tokens is None


def test_a_bad_flag_value_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="report.unit_size"):
        command_config("report", _parse("report", "--batch-size", "32", "--unit-size", "16"))
    with pytest.raises(ConfigError, match="decoding.mode"):
        command_config("serve", _parse("serve", "--decoding", "greedy"))
    with pytest.raises(ConfigError, match="report.since"):
        command_config("report", _parse("report", "--since", "last tuesday"))
    with pytest.raises(SystemExit):  # argparse rejects a non-number before any config work
        _parse("report", "--batch-size", "many")


def test_add_flags_reads_type_and_default_from_the_field():
    parser = argparse.ArgumentParser()
    add_flags(parser, [Flag("--port", "serve.port"), Flag("--model-id", "serve.model_id")])
    args = parser.parse_args(["--port", "9000"])
    assert args.cfg__serve__port == 9000  # an int, parsed by argparse
    assert flag_overrides(args, [Flag("--port", "serve.port")]) == ["serve.port=9000"]
    assert "default 8000" in " ".join(parser.format_help().split())
    with pytest.raises(ConfigError, match="no config field"):
        add_flags(parser, [Flag("--nope", "serve.nope")])


def test_checkpoints_record_only_the_run_sections():
    config = EchoConfig()
    saved = json.loads(config.to_json(run_only=True))
    assert set(saved) == {"name", "data", "tokenizer", "model", "train"}
    assert from_dict(saved) == config  # the other sections take their defaults


def test_a_saved_config_with_model_freeze_vision_loads_into_train():
    data = EchoConfig().run_dict()
    data["model"]["freeze_vision"] = True
    assert from_dict(data).train.freeze_vision is True
    data["train"]["freeze_vision"] = False  # a value already at the new place wins
    assert from_dict(data).train.freeze_vision is False


def test_serve_defaults_are_the_serve_config_defaults():
    args = _parse("serve")
    assert command_config("serve", args).serve == ServeConfig()
