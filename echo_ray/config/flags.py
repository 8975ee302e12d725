"""CLI flags declared from the config tree: each flag names a config field, and its type,
default and help text come from that field (the help is the field's docstring).

A sub-command lists its flags as `Flag("--batch-size", "report.batch_size")`; `add_flags`
puts them on an argparse parser, and `flag_overrides` turns the flags a user gave into
`key=value` overrides, applied on top of the preset or `--config` file and before `--set`.
Flags left out change nothing, so a preset's values stand.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from echo_ray.config.schema import ConfigError, EchoConfig


@dataclass(frozen=True)
class Flag:
    """A command-line flag for the config field at dotted `key`.

    Args:
        flag: the option string, e.g. "--batch-size".
        key: the field, e.g. "report.batch_size".
        help: replaces the field's docstring where the command needs its own words.
        to_config: converts the parsed value to the field's unit (e.g. ms -> s); `metavar`
            and `type` then describe the flag's own unit.
        type: the flag's value type when `to_config` changes the unit.
    """

    flag: str
    key: str
    help: str | None = None
    to_config: Callable[[Any], Any] | None = None
    type: type | None = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return "cfg__" + self.key.replace(".", "__")


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings of a dataclass's fields (the string literal under each field)."""
    return _field_docs(cls)


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def resolve_field(key: str) -> tuple[type, dataclasses.Field, Any]:
    """(section class, field, default value) of the dotted config key, e.g. "report.since"."""
    cls: type = EchoConfig
    default: Any = EchoConfig()
    parts = key.split(".")
    for depth, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise ConfigError(f"no config field {key!r}")
        hint = typing.get_type_hints(cls)[part]
        default = getattr(default, part)
        if depth == len(parts) - 1:
            return cls, fields[part], default
        cls = hint
    raise ConfigError(f"no config field {key!r}")  # pragma: no cover - loop returns


def _value_type(hint: Any) -> tuple[Any, bool]:
    """(scalar type to parse, whether the field is optional)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    optional = False
    if origin in (typing.Union, types.UnionType):
        optional = type(None) in args
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    return (tuple if origin is tuple else hint), optional


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if value is None:
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


@functools.cache
def _preset_values() -> tuple[str, dict[str, EchoConfig]]:
    """(the preset a command runs with when given none, every preset by name)."""
    from echo_ray.config.presets import PRESETS, preset

    return EchoConfig().name, {name: preset(name) for name in PRESETS}


def _value_of(config: EchoConfig, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def default_text(key: str) -> str:
    """How `--help` shows the default of config field `key`: the value of the default preset,
    then the other presets' values where they differ, presets of one value named together,
    e.g. "default 500; base-7b, base-3b: 5000"."""
    base_name, presets = _preset_values()
    base = _value_of(presets[base_name], key)
    others: dict[str, list[str]] = {}  # shown value -> presets, in preset order
    for name, config in presets.items():
        if name != base_name and (value := _value_of(config, key)) != base:
            others.setdefault(_show(value), []).append(name)
    return "; ".join([f"default {_show(base)}",
                      *(f"{', '.join(names)}: {shown}" for shown, names in others.items())])


def add_flags(parser: argparse.ArgumentParser, flags: Sequence[Flag]) -> None:
    """Declare `flags` on `parser`. A bool field becomes an on/off pair (`--fhir` /
    `--no-fhir`); a tuple field takes comma-separated values; an optional one takes `none`.
    The help is the field's docstring, then the field's key and default (`default_text`)."""
    for spec in flags:
        cls, fld, _ = resolve_field(spec.key)
        hint = typing.get_type_hints(cls)[fld.name]
        kind, optional = _value_type(hint)
        doc = spec.help or field_docs(cls).get(fld.name, "")
        shown = f"{spec.key}; {default_text(spec.key)}"
        if kind is bool and spec.to_config is None:
            parser.add_argument(spec.flag, dest=spec.dest, default=None,
                                action=argparse.BooleanOptionalAction,
                                help=f"{doc} ({shown})")
            continue
        if spec.metavar:
            metavar = spec.metavar
        elif kind is tuple:
            metavar = "A,B,..."
        else:
            metavar = (fld.name if kind is str else kind.__name__).upper()
        parser.add_argument(spec.flag, dest=spec.dest, default=None, metavar=metavar,
                            type=spec.type or (str if kind in (tuple, str) or optional else kind),
                            help=f"{doc} ({shown})")


def flag_overrides(args: argparse.Namespace, flags: Iterable[Flag]) -> list[str]:
    """`key=value` overrides for the flags given on the command line (left-out flags: none)."""
    out = []
    for spec in flags:
        value = getattr(args, spec.dest, None)
        if value is None:
            continue
        if spec.to_config is not None:
            value = spec.to_config(value)
        out.append(f"{spec.key}={_show(value)}")
    return out
