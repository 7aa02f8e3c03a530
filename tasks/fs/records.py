"""Typed JSON records: frozen dataclasses that every writer and every reader of a report share.

``to_json`` gives plain JSON values; ``from_json`` rebuilds the dataclass and refuses a missing or
unknown field by name, so a renamed field fails where it is read instead of reading as None.
``write`` is atomic; ``read`` names the file and the stage that writes it when it is unusable.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Self

from tasks.errors import DataError
from tasks.fs.atomic import atomic_write_json


class RecordError(DataError):
    """A JSON record does not have the shape its dataclass declares; the message names the field."""


def utc_now() -> str:
    """The time records are stamped with: UTC, ISO 8601, whole seconds."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` could be decoded as ``tp`` (used to pick a member of a union)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if dataclasses.is_dataclass(tp):
        return isinstance(value, Mapping)
    if origin in (list, tuple):
        return isinstance(value, list | tuple)
    if origin is dict:
        return isinstance(value, Mapping)
    if origin is Literal:
        return value in typing.get_args(tp)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _decode(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(tp):
            if _matches(value, member):
                return _decode(value, member, where)
        raise RecordError(f"{where}: {value!r} is not {tp}")
    if not _matches(value, tp):
        raise RecordError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        return [_decode(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]
            return tuple(_decode(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecordError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_decode(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        _key, item = typing.get_args(tp)
        return {str(k): _decode(v, item, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        return float(value)
    return value


def _build(cls: type, raw: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise RecordError(f"{where}: unknown field {unknown[0]!r} (a {cls.__name__} has {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _decode(raw[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecordError(f"{where}: missing field {name!r} of {cls.__name__}")
    return cls(**values)


class Record:
    """Mixin for a frozen dataclass stored as JSON (a report, a card, a status)."""

    def to_json(self) -> dict[str, Any]:
        encoded: dict[str, Any] = _encode(self)
        return encoded

    @classmethod
    def from_json(cls, raw: Any, where: str | None = None) -> Self:
        where = where or cls.__name__
        if not isinstance(raw, Mapping):
            raise RecordError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        built: Self = _build(cls, raw, where)
        return built

    def write(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def read(cls, path: Path, stage: str) -> Self:
        """The record at ``path``; :class:`DataError` naming the file and the ``stage`` that writes it."""
        if not path.is_file():
            raise DataError(f"{path} not found: run the pipeline through {stage} first (visionops run or dvc repro)")
        try:
            raw = json.loads(path.read_text())
        except (ValueError, OSError) as exc:
            raise DataError(f"{path} is not readable JSON ({exc}); rerun {stage}") from exc
        try:
            return cls.from_json(raw, where=str(path))
        except RecordError as exc:
            raise RecordError(f"{exc}; it was written by another version of visionops: rerun {stage}") from exc
