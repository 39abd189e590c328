"""Type checks of a config dataclass's fields against its annotations, for configs read from model files,
checkpoints and the command line: a string "192", a bool where an int belongs, "false" for a bool or a
NaN/inf float is a clear error naming the field, never a silent misread."""

from __future__ import annotations

import dataclasses
import math
import types
import typing


def _matches(value, kind) -> bool:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:  # ints are floats here (JSON writes 1000.0 as 1000 in some writers)
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if origin in (tuple, list):
        args = typing.get_args(kind)
        if not isinstance(value, tuple | list):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return all(_matches(v, args[0]) for v in value) if args else True
    return isinstance(value, kind)


def _describe(kind) -> str:
    if kind is float:
        return "a finite number"
    if kind is type(None):
        return "None"
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(kind))
    return str(kind) if typing.get_args(kind) else kind.__name__


def check_fields(config) -> None:
    """ValueError naming the first field of dataclass `config` whose value does not match its annotation."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not _matches(value, hints[field.name]):
            raise ValueError(f"{type(config).__name__}.{field.name} must be {_describe(hints[field.name])}, "
                             f"got {value!r}")


def from_dict(cls, values: dict):
    """`cls(**values)` for a dict read from a file: unknown keys and wrong types are ValueErrors naming them."""
    if not isinstance(values, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {values!r}")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
    return cls(**values)
