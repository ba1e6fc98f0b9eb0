"""Typed configuration: one params.yaml section per stage, loaded into a frozen dataclass.

Each stage's module declares its own dataclass (e.g. ``IngestConfig``); this module only
converts plain YAML values into it, rejecting unknown keys and wrong types with a message
that names the full key (``train.lr: expected float, got str 'fast'``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A params value that does not fit its declared type."""


# Every top-level section a params file may hold: one per stage, plus `runs` (the train/score/
# evaluate matrix that dvc.yaml reads). Anything else is most likely a misspelling (`trian:`)
# whose values would otherwise be ignored without a word.
SECTIONS = ("ingest", "text_features", "image_features", "runs", "train", "score", "evaluate", "report", "recommend")

# YAML 1.1 (PyYAML) reads `1e-3` (no dot) as a string; users write numbers that way.
_SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: file not found (run from the project root or pass --params)")
    try:
        with path.open() as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of stage sections at the top level")
    unknown = sorted(str(k) for k in data if k not in SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown section (known: {', '.join(SECTIONS)})")
    return data


def load_section(cls: type[T], section: str, path: str | Path = "params.yaml") -> T:
    """Read ``section`` of a params file into ``cls``."""
    data = load_params(path)
    if section not in data:
        raise ConfigError(f"{path}: section '{section}' is missing")
    return from_dict(cls, data[section], section)


def from_dict(cls: type[T], data: Any, key: str) -> T:
    """Build dataclass ``cls`` from a mapping; ``key`` is the dotted name used in errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key (known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        if name in data:
            values[name] = _convert(hints[name], data[name], f"{key}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}.{name}: required key is missing")
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as err:
            raise ConfigError(f"{key}: {err}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """Plain (YAML/JSON-ready) form of a config dataclass."""
    return dataclasses.asdict(obj)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        item_type = args[0] if args else Any
        items = [_convert(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")
        return {str(k): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp in (float, int) and isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        number = float(value)
        value = int(number) if tp is int and number.is_integer() else number
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {_describe(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {_describe(value)}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {_describe(value)}")
        return value
    raise TypeError(f"{key}: unsupported config type {tp}")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"
