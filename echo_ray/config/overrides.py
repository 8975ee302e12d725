"""Building and changing a config: from a dict (a JSON file, a preset), and `key=value`
overrides (`--set model.image_size=224`).

Overrides address fields by dotted path and are parsed to the field's declared type. Unknown
keys and values of the wrong type are errors that name the key and list what is allowed, in
the spirit of nanoGPT's configurator but without `exec`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from echo_ray.config.schema import ConfigError, EchoConfig

# Keys an older saved config may hold, and where their value lives now.
_MOVED_KEYS = {("model", "freeze_vision"): ("train", "freeze_vision")}


def from_dict(data: Mapping[str, Any], cls: type = EchoConfig) -> Any:
    """Build a config dataclass from a (nested) dict, rejecting unknown keys and wrong types."""
    if cls is EchoConfig:
        data = _migrate(data)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} for {cls.__name__}; allowed keys: {sorted(known)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key} must be a mapping of {hint.__name__} fields")
            kwargs[key] = from_dict(value, hint)
        else:
            kwargs[key] = _coerce(value, hint, key)
    obj = cls(**kwargs)
    if cls is EchoConfig:
        obj.validate()
    return obj


def _migrate(data: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config's moved keys at their current place (a value already set there wins)."""
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for (old_section, old_key), (section, key) in _MOVED_KEYS.items():
        old = data.get(old_section)
        if isinstance(old, dict) and old_key in old:
            value = old.pop(old_key)
            target = data.setdefault(section, {})
            if isinstance(target, dict) and target.get(key) is None:
                target[key] = value
    return data


def apply_overrides(config: EchoConfig, overrides: Iterable[str]) -> EchoConfig:
    """Return a copy of `config` with `section.key=value` overrides applied and validated.

    Values are parsed to the declared field type: `true/false` for bools, comma-separated
    lists for tuples (`data.modalities=CR,DX`), `none` for optional fields.
    """
    data = config.to_dict()
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node: dict[str, Any] = data
        node_cls: type = EchoConfig
        parts = key.split(".")
        for depth, part in enumerate(parts):
            known = {f.name for f in dataclasses.fields(node_cls)}
            if part not in known:
                where = ".".join(parts[:depth]) or "the top level"
                raise ConfigError(
                    f"unknown config key {key!r}: {part!r} is not a field of {where}; "
                    f"allowed: {sorted(known)}"
                )
            hint = typing.get_type_hints(node_cls)[part]
            if depth == len(parts) - 1:
                if dataclasses.is_dataclass(hint):
                    raise ConfigError(f"{key!r} is a section; set one of its fields, e.g. {key}.X=")
                node[part] = _parse_text(raw.strip(), hint, key)
            else:
                if not dataclasses.is_dataclass(hint):
                    raise ConfigError(f"{'.'.join(parts[: depth + 1])!r} is not a section")
                node, node_cls = node[part], hint
    return from_dict(data)


def _parse_text(raw: str, hint: Any, key: str) -> Any:
    """Parse override text into a value of type `hint`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse_text(raw, inner, key)
    if origin is tuple:
        items = [s.strip() for s in raw.split(",") if s.strip()] if raw else []
        inner = args[0]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse_text(s, inner, key) for s in items)
        if len(items) != len(args):
            raise ConfigError(f"{key} needs {len(args)} comma-separated values, got {raw!r}")
        return tuple(_parse_text(s, a, key) for s, a in zip(items, args, strict=True))
    if hint is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key} must be true or false, got {raw!r}")
    if hint in (int, float):
        try:
            return hint(raw)
        except ValueError:
            raise ConfigError(f"{key} must be {hint.__name__}, got {raw!r}") from None
    if hint is str:
        return raw
    raise ConfigError(f"{key}: cannot parse a value of type {hint}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a Python value against `hint` (lists become tuples; ints are accepted as floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key} needs {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (
        type(value) is not hint
    ):
        raise ConfigError(f"{key} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_config(
    preset: str = "tiny", overrides: Iterable[str] = (), path: str | None = None
) -> EchoConfig:
    """The config a command runs with: a JSON file (e.g. a run's config.json) or a preset,
    then the overrides."""
    if path is not None:
        with open(path) as f:
            config = from_dict(json.load(f))
    else:
        from echo_ray.config.presets import preset as named

        config = named(preset)
    return apply_overrides(config, overrides)
