"""Declare a setting once: dataclass fields with metadata feed validation, CLI flags,
ComfyUI node inputs and export metadata.

A field's metadata may hold:
    help     one line for users (CLI --help, node tooltip)
    min/max  inclusive numeric bounds, checked by :func:`validate`
    gt       exclusive lower bound (e.g. lr > 0)
    choices  allowed values
    cli      False to keep a field off the command line
    node     False to keep a field off the ComfyUI node
    ui_step  a float node widget's step, when 1e-4 is too coarse (the frontend rounds to it)
    essential  True: a widget on the main ComfyUI node; otherwise (the default) it sits on that
             node's options node, connected by a typed socket. The CLI shows every field either way.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from .errors import VAEFTError


def option(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with a default and user-facing metadata."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def is_essential(field: dataclasses.Field) -> bool:
    """Whether a field is a widget on the main node (else on its options node)."""
    return bool(field.metadata.get("essential"))


def field_type(cls: type, field: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    return hints[field.name]


def base_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, optional?) for int, float, str, bool and `X | None`."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        return inner, True
    return tp, False


def validate(obj: Any) -> None:
    """Raise VAEFTError naming the first field that breaks its metadata."""
    cls = type(obj)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        tp, optional = base_type(field_type(cls, f))
        name = f.name
        if value is None:
            if optional:
                continue
            raise VAEFTError(f"{cls.__name__}.{name} must be set")
        if tp is bool:
            if not isinstance(value, bool):
                raise VAEFTError(f"{name} must be true or false, got {value!r}")
            continue
        if tp in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise VAEFTError(f"{name} must be a number, got {value!r}")
            if tp is int and int(value) != value:
                raise VAEFTError(f"{name} must be a whole number, got {value!r}")
            if value != value or value in (float("inf"), float("-inf")):
                raise VAEFTError(f"{name} must be finite, got {value!r}")
            lo, hi, gt = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("gt")
            if lo is not None and value < lo:
                raise VAEFTError(f"{name} must be at least {lo}, got {value}")
            if hi is not None and value > hi:
                raise VAEFTError(f"{name} must be at most {hi}, got {value}")
            if gt is not None and not value > gt:
                raise VAEFTError(f"{name} must be greater than {gt}, got {value}")
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise VAEFTError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def to_metadata(obj: Any, prefix: str) -> dict[str, str]:
    """Flat string metadata {prefix.field: value} for safetensors headers."""
    return {f"{prefix}.{f.name}": str(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
