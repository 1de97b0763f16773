"""Typed options: frozen dataclasses built from untyped mappings (YAML, `--set key=value`,
JSON, keyword arguments), with one-line errors that name the key and the valid choices.

Method options, trainer options and experiment configs all go through `parse`, so a wrong key
or type reads the same everywhere.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from jdecode.config import ConfigError


def option(default: Any, help: str) -> Any:
    """A documented field of an options dataclass (`jdecode methods` prints `help`)."""
    return dataclasses.field(default=default, metadata={"help": help})


def type_name(tp: Any) -> str:
    """A reader's name for an annotation: `int`, `'a' | 'b'`, `float | null`, `list of int`."""
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is tuple:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value converted to `tp`) for values as YAML, JSON or Python callers give them.

    An int is a fine float (`lr: 1` in YAML); a bool is neither an int nor a float; a list is a
    tuple.
    """
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp), value
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        for arm in typing.get_args(tp):
            ok, out = coerce(value, arm)
            if ok:
                return True, out
        return False, value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        inner = typing.get_args(tp)[0]
        items = [coerce(v, inner) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if tp is Any:
        return True, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if tp is dict or origin is dict:
        return isinstance(value, Mapping), dict(value) if isinstance(value, Mapping) else value
    return isinstance(value, tp), value


def fields_of(cls: type) -> dict[str, tuple[Any, Any, str]]:
    """name -> (type, default, help) of an options dataclass (default MISSING if required)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else
                   dataclasses.MISSING)
        out[f.name] = (hints[f.name], default, f.metadata.get("help", ""))
    return out


def parse(cls: type, raw: Mapping[str, Any] | Any | None, what: str) -> Any:
    """Builds `cls` from a mapping; an instance of `cls` passes through unchanged.

    Args:
      cls: a dataclass. raw: the values. what: names the thing in errors, e.g.
        "method 'speculative'" or "experiment configs/experiments/x.yaml".
    Raises:
      ConfigError naming the unknown key, the mistyped value or the failed range check.
    """
    if isinstance(raw, cls):
        return raw
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"{what}: expected a mapping of options, got {raw!r}")
    raw = dict(raw or {})
    fields = fields_of(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        valid = ", ".join(fields) or "none"
        raise ConfigError(f"{what} has no option {unknown[0]!r}; valid options are: {valid}")
    missing = [k for k, (_, d, _) in fields.items() if d is dataclasses.MISSING and k not in raw]
    if missing:
        raise ConfigError(f"{what}: {missing[0]!r} is required")
    values = {}
    for key, value in raw.items():
        tp = fields[key][0]
        ok, values[key] = coerce(value, tp)
        if not ok:
            raise ConfigError(f"{what}: {key}={value!r} must be {type_name(tp)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # the dataclass's own range checks
        raise ConfigError(f"{what}: {e}") from None


def to_dict(options: Any) -> dict[str, Any]:
    """JSON-ready values of an options dataclass (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(options).items()}


def split_overrides(items: list[str] | tuple[str, ...], groups: dict[str, type]
                    ) -> dict[str, dict[str, Any]]:
    """Routes `--set key=value` items to the dataclass that has the key.

    Args:
      items: "key=value" strings (values parsed as YAML). groups: name -> dataclass; a key may
        also be written "name.key" to pick a group explicitly.
    Returns:
      name -> {key: value} per group.
    Raises:
      ConfigError for a key no group has, listing every valid key.
    """
    from jdecode.config import parse_override

    out: dict[str, dict[str, Any]] = {name: {} for name in groups}
    for item in items:
        key, value = parse_override(item)
        group, _, field = key.rpartition(".")
        if group:
            if group not in groups or field not in fields_of(groups[group]):
                raise ConfigError(f"--set {item}: unknown key {key!r}")
            out[group][field] = value
            continue
        owners = [name for name, cls in groups.items() if key in fields_of(cls)]
        if not owners:
            valid = sorted({k for cls in groups.values() for k in fields_of(cls)})
            raise ConfigError(f"--set {item}: unknown key {key!r}; valid keys are: "
                              f"{', '.join(valid)}")
        out[owners[0]][key] = value
    return out
