"""Checking and converting configuration values against their declared (dataclass field) types.

YAML 1.1 (PyYAML) reads ``1e4`` and ``1e-3`` as strings and ``--set`` values arrive parsed the same
way, so a value is converted where the conversion is lossless and unambiguous: a ``float`` field
takes an int or a string that ``float()`` parses (``"1e4"``, ``".5"``); every other mismatch is a
:class:`TypeError` that names the key, the expected type and the value given. ``bool`` is never
taken for a number, nor a number for a ``bool``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

__all__ = ["coerce", "coerce_fields", "type_name"]


def type_name(annotation: Any) -> str:
    """``int``, ``list[int]``, ``str | None``: how a type reads in an error message."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in typing.get_args(annotation))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(arg) for arg in typing.get_args(annotation))}]"
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _mismatch(key: str, annotation: Any, value: Any) -> TypeError:
    return TypeError(f"{key}: expected {type_name(annotation)}, got {value!r} ({type(value).__name__})")


def _scalar(key: str, annotation: type, value: Any) -> Any:
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, annotation):
        return value
    raise _mismatch(key, annotation, value)


def coerce(key: str, annotation: Any, value: Any) -> Any:
    """`value` checked against `annotation` (converted where lossless, see the module docstring);
    TypeError naming `key` otherwise. Handles scalars, ``X | None`` and other unions, ``list[X]``,
    ``dict[str, X]`` and ``Any``."""
    if annotation is Any:
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(key, arg, value)
            except TypeError:
                continue
        raise _mismatch(key, annotation, value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _mismatch(key, annotation, value)
        return [coerce(f"{key}[{i}]", args[0], item) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _mismatch(key, annotation, value)
        return {k: coerce(f"{key}.{k}", args[1], v) for k, v in value.items()}
    return _scalar(key, annotation, value)


def coerce_fields(cls: type, values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """`values` (keys already known to be fields of the dataclass `cls`) checked and converted
    against the fields' types; keys are reported as ``prefix.key``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    return {name: coerce(f"{prefix}.{name}", hints[name], value) if name in fields else value for name, value in values.items()}
