"""Typed, frozen dataclasses built from parsed YAML, with the checks every section shares.

An unknown key, a wrong type or a non-finite float raises `ConfigError` with one line naming the
dotted key and the value. A float field also takes a string in YAML 1.2's float syntax: PyYAML
(YAML 1.1) reads `3e-3` (no dot) as a string, while DVC (`dvc exp run -S pretrain.lr=3e-3`,
ruamel, YAML 1.2) and every other YAML 1.2 reader see a number; both must mean the same run.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any

# YAML 1.2 core schema floats PyYAML leaves as strings (`3e-3`, `1E5`): digits, no .inf/.nan
_YAML12_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


class ConfigError(ValueError):
    """A bad value in params.yaml; the message is one line naming the key."""


def _type_ok(value: Any, hint: Any) -> bool:
    """Is `value` acceptable for the annotation `hint`? (ints are accepted for floats)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def build(cls: type, data: Any, key: str, replaced: dict[str, str]) -> Any:
    """Build dataclass `cls` from a mapping, recursing into nested dataclasses. `replaced`:
    {dotted key of an older file: what took its place}, said when such a key is met."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'params'}: must be a mapping (got {data!r})")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{key}.{unknown[0]}" if key else unknown[0]
        if where in replaced:
            raise ConfigError(f"{where}: unknown key ({replaced[where]})")
        raise ConfigError(f"{where}: unknown key (allowed: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        hint, sub = hints[name], f"{key}.{name}" if key else name
        if hint is float and isinstance(value, str) and _YAML12_FLOAT.fullmatch(value):
            value = float(value)
        if dataclasses.is_dataclass(hint):
            if value is None:  # `model:` with nothing under it would silently mean the defaults
                raise ConfigError(f"{sub}: is null; give its keys, or delete the section to use "
                                  "the defaults")
            kwargs[name] = build(hint, value, sub, replaced)
        elif not _type_ok(value, hint):
            expected = getattr(hint, "__name__", str(hint).replace("typing.", ""))
            raise ConfigError(f"{sub}: expected {expected} (got {value!r})")
        elif hint is float and not _finite(value):  # YAML's .inf/.nan, `-S key=.inf`, 10**400
            raise ConfigError(f"{sub}: must be a finite number (got {value!r})")
        else:
            kwargs[name] = float(value) if hint is float else value
    return cls(**kwargs)
